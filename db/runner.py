"""Applies and rolls back migrations, recording each in `schema_migrations`.

Every mutating run holds a PostgreSQL advisory lock, so several runners started at
once (three services, replicas, a `migrate` container) apply each migration once:
the first takes the lock, the others wait for it and then find nothing to do.

After the migrations, when the database is at the latest one, `up` applies the
function files (`db/functions/*.sql`) whose text is not the one recorded in
`schema_functions`, in file-name order, each in its own transaction, under the
same lock. Any migration run (up or down) clears that record: a migration may
replace or drop functions, so the next `up` to the latest re-applies every file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from db.migrations import FunctionFile, Migration, load_function_files

log = logging.getLogger(__name__)

# Arbitrary constant naming this project's migration lock (pg_advisory_lock key).
MIGRATION_LOCK_KEY = 0x63686174_6D696772  # "chatmigr"
LOCK_POLL_INTERVAL_S = 0.2

# The session setting a down part reads to learn whether it may destroy data:
# `current_setting('chat.allow_data_loss', true) = 'on'` only under
# `python -m db down --allow-data-loss`; 'off' for every other run.
ALLOW_DATA_LOSS_SETTING = "chat.allow_data_loss"

_CREATE_HISTORY = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    char(64)    NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms integer     NOT NULL
)
"""
# Bookkeeping, like schema_migrations: which text of each function file is live.
# `definitions` fingerprints the functions' catalog definitions right after the
# file ran, so a function changed by hand later shows as drift.
_CREATE_FUNCTIONS_RECORD = """
CREATE TABLE IF NOT EXISTS schema_functions (
    file        text        PRIMARY KEY,
    checksum    char(64)    NOT NULL,
    definitions char(32)    NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms integer     NOT NULL
)
"""
# md5 of the named functions' definitions as the catalog prints them (every overload).
_DEFINITIONS = """
SELECT md5(coalesce(string_agg(pg_get_functiondef(p.oid), E'\\n'
                               ORDER BY p.oid::regprocedure::text), ''))
FROM pg_proc p
WHERE p.pronamespace = current_schema()::regnamespace AND p.proname = ANY ($1::text[])
"""


class MigrationError(RuntimeError):
    """A migration cannot be applied or rolled back; the message says which and why."""


@dataclass(frozen=True)
class AppliedMigration:
    version: int
    name: str
    checksum: str
    applied_at: datetime


@dataclass(frozen=True)
class AppliedFunctions:
    file: str
    checksum: str
    definitions: str
    applied_at: datetime


@dataclass(frozen=True)
class FunctionStatus:
    file: str
    applied_at: datetime | None  # None: pending (new, changed, or not at the latest migration)
    problem: str | None


@dataclass(frozen=True)
class StatusRow:
    version: int
    name: str
    applied_at: datetime | None
    problem: str | None


class Migrator:
    def __init__(
        self,
        conn: asyncpg.Connection,
        migrations: list[Migration],
        *,
        functions: list[FunctionFile] | None = None,
        lock_timeout: str = "10s",
        statement_timeout: str = "15min",
    ) -> None:
        self._conn = conn
        self._migrations = {m.version: m for m in migrations}
        self._functions = load_function_files() if functions is None else functions
        self._lock_timeout = lock_timeout
        self._statement_timeout = statement_timeout
        self._waiting_logged = False
        self._allow_data_loss = False

    @property
    def connection(self) -> asyncpg.Connection:
        return self._conn

    @property
    def latest_version(self) -> int:
        return max(self._migrations, default=0)

    async def applied(self) -> list[AppliedMigration]:
        exists = await self._conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not exists:
            return []
        rows = await self._conn.fetch(
            "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
        )
        return [AppliedMigration(**dict(row)) for row in rows]

    async def problems(self) -> list[str]:
        """Applied migrations whose file is missing or was edited after it was applied.

        An amended file (`-- migrate:supersedes <checksum>`) is no problem for a
        database that applied the text it supersedes.
        """
        found = []
        for record in await self.applied():
            migration = self._migrations.get(record.version)
            label = f"{record.version:04d}_{record.name}.sql"
            if migration is None:
                found.append(f"{label} was applied but its file is missing")
            elif (
                migration.checksum != record.checksum
                and record.checksum not in migration.supersedes
            ):
                found.append(
                    f"{migration.filename} was changed after it was applied "
                    f"(recorded checksum {record.checksum[:12]}, file now "
                    f"{migration.checksum[:12]}); restore it and add a new migration instead"
                )
        return found

    async def status(self) -> list[StatusRow]:
        applied = {r.version: r for r in await self.applied()}
        problems = await self.problems()
        rows = []
        for version in sorted(set(self._migrations) | set(applied)):
            migration, record = self._migrations.get(version), applied.get(version)
            name = migration.name if migration else record.name if record else "?"
            problem = next((p for p in problems if p.startswith(f"{version:04d}_")), None)
            rows.append(StatusRow(version, name, record.applied_at if record else None, problem))
        return rows

    async def at_latest(self) -> bool:
        """Every migration is applied (function files apply only then)."""
        return {r.version for r in await self.applied()} >= set(self._migrations)

    async def applied_functions(self) -> list[AppliedFunctions]:
        exists = await self._conn.fetchval("SELECT to_regclass('schema_functions') IS NOT NULL")
        if not exists:
            return []
        rows = await self._conn.fetch(
            "SELECT file, checksum, definitions, applied_at FROM schema_functions ORDER BY file"
        )
        return [AppliedFunctions(**dict(row)) for row in rows]

    async def function_status(self) -> list[FunctionStatus]:
        """Each function file (and each recorded one whose file is gone), file-name order.

        Problems (what `validate` reports): a file changed since it was applied
        (`up` applies it), a recorded file that is gone, and drift: the database's
        definitions of a file's functions differ from what the file made (changed
        by hand; `up` puts the file's back).
        """
        recorded = {r.file: r for r in await self.applied_functions()}
        files = {f.filename: f for f in self._functions}
        rows = []
        for name in sorted(set(files) | set(recorded)):
            file, record = files.get(name), recorded.get(name)
            problem = None
            if record is None:
                pass  # pending: new, or records cleared by a migration run
            elif file is None:
                problem = (
                    f"functions/{name} was applied but its file is missing "
                    "(its functions stay until a migration or another file drops them)"
                )
            elif file.checksum != record.checksum:
                problem = (
                    f"functions/{name} changed since it was applied (recorded checksum "
                    f"{record.checksum[:12]}, file now {file.checksum[:12]}); "
                    "`python -m db up` applies it"
                )
            elif await self._definitions(file) != record.definitions:
                problem = (
                    f"functions/{name}: the database's definition of "
                    f"{', '.join(file.functions)} differs from what the file made "
                    "(changed outside the runner); `python -m db up` re-applies the file"
                )
            rows.append(FunctionStatus(name, record.applied_at if record else None, problem))
        return rows

    async def up(self, to: int | None = None) -> list[Migration | FunctionFile]:
        """Apply pending migrations up to `to` (default: the latest), in order; then,
        at the latest migration, every function file not live in its current text."""
        target = self.latest_version if to is None else to
        if target > self.latest_version:
            raise MigrationError(f"no migration {target:04d} (latest is {self.latest_version:04d})")
        async with self._locked():
            done = {r.version for r in await self.applied()}
            pending = [
                m for v, m in sorted(self._migrations.items()) if v <= target and v not in done
            ]
            for migration in pending:
                await self._run(migration, "up")
            functions = await self._apply_functions() if await self.at_latest() else []
        return [*pending, *functions]

    async def _apply_functions(self) -> list[FunctionFile]:
        recorded = {r.file: r for r in await self.applied_functions()}
        applied = []
        for file in self._functions:
            record = recorded.get(file.filename)
            if (
                record is not None
                and record.checksum == file.checksum
                and record.definitions == await self._definitions(file)
            ):
                continue
            await self._run_functions(file)
            applied.append(file)
        for name in set(recorded) - {f.filename for f in self._functions}:
            log.warning("functions/%s is gone; the functions it made stay", name)
            await self._conn.execute("DELETE FROM schema_functions WHERE file = $1", name)
        return applied

    async def _run_functions(self, file: FunctionFile) -> None:
        started = time.perf_counter()
        log.debug("applying functions/%s", file.filename)
        try:
            async with self._conn.transaction():
                await self._set_timeouts(local=True)
                await self._conn.execute(file.sql)
                await self._conn.execute(
                    "INSERT INTO schema_functions (file, checksum, definitions, duration_ms)"
                    " VALUES ($1, $2, $3, $4)"
                    " ON CONFLICT (file) DO UPDATE SET checksum = EXCLUDED.checksum,"
                    " definitions = EXCLUDED.definitions, applied_at = now(),"
                    " duration_ms = EXCLUDED.duration_ms",
                    file.filename,
                    file.checksum,
                    await self._definitions(file),
                    int((time.perf_counter() - started) * 1000),
                )
        except asyncpg.PostgresError as exc:
            raise MigrationError(
                f"functions/{file.filename} failed: {exc.__class__.__name__}: {exc}; "
                "nothing from it was applied"
            ) from exc

    async def _definitions(self, file: FunctionFile) -> str:
        return str(await self._conn.fetchval(_DEFINITIONS, list(file.functions)))

    async def _drop_functions(self) -> None:
        """At version 0 nothing of the schema is left: neither are the functions the
        files made (those no down part dropped, e.g. helpers only the files define)."""
        names = [name for file in self._functions for name in file.functions]
        async with self._conn.transaction():
            await self._set_timeouts(local=True)
            for signature in await self._conn.fetch(
                "SELECT p.oid::regprocedure::text FROM pg_proc p"
                " WHERE p.pronamespace = current_schema()::regnamespace"
                " AND p.proname = ANY ($1::text[])",
                names,
            ):
                await self._conn.execute(f"DROP FUNCTION {signature[0]}")
            await self._conn.execute("DELETE FROM schema_functions")

    async def down(self, to: int, *, allow_data_loss: bool = False) -> list[Migration]:
        """Roll back applied migrations newer than `to`, newest first (`to=0`: all).

        A down part that would destroy data (rows, or values its up part cannot
        rebuild) refuses unless `allow_data_loss`, which it reads from the session
        setting `chat.allow_data_loss` ('on' or 'off'). Rolling back stops at the
        first refusal; the steps before it are rolled back (they lost nothing).
        """
        if to < 0:
            raise MigrationError("--to must be 0 or a migration version")
        self._allow_data_loss = allow_data_loss
        try:
            return await self._down(to)
        finally:
            self._allow_data_loss = False

    async def _down(self, to: int) -> list[Migration]:
        async with self._locked():
            done = sorted((r.version for r in await self.applied()), reverse=True)
            rolled_back = []
            for version in (v for v in done if v > to):
                migration = self._migrations[version]  # problems() proved the file exists
                await self._run(migration, "down")
                rolled_back.append(migration)
            if to == 0 and rolled_back:
                await self._drop_functions()
        return rolled_back

    @asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        # Poll rather than block in pg_advisory_lock(): a session blocked inside a
        # statement holds a snapshot, and CREATE INDEX CONCURRENTLY in the lock
        # holder's migration waits for every such snapshot: a deadlock.
        while not await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY):
            if not self._waiting_logged:
                log.info("another migration runner holds the lock; waiting for it")
                self._waiting_logged = True
            await asyncio.sleep(LOCK_POLL_INTERVAL_S)
        try:
            await self._conn.execute(_CREATE_HISTORY)
            await self._conn.execute(_CREATE_FUNCTIONS_RECORD)
            problems = await self.problems()
            if problems:
                raise MigrationError("; ".join(problems))
            yield
        finally:
            await self._conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)

    async def _run(self, migration: Migration, direction: str) -> None:
        started = time.perf_counter()
        log.debug("%s %s", "applying" if direction == "up" else "rolling back", migration.filename)
        try:
            if migration.transactional:
                async with self._conn.transaction():
                    await self._set_timeouts(local=True)
                    await self._conn.execute(
                        migration.up_sql if direction == "up" else migration.down_sql
                    )
                    await self._record(migration, direction, started)
            else:
                await self._set_timeouts(local=False)
                try:
                    for statement in migration.statements(direction):
                        await self._conn.execute(statement)
                finally:
                    await self._conn.execute(
                        "SELECT set_config($1, 'off', false)", ALLOW_DATA_LOSS_SETTING
                    )
                await self._record(migration, direction, started)
        except asyncpg.PostgresError as exc:
            atomic = (
                "nothing from it was applied"
                if migration.transactional
                else ("it runs outside a transaction, so earlier statements may have applied")
            )
            raise MigrationError(
                f"{migration.filename} ({direction}) failed: {exc.__class__.__name__}: "
                f"{exc}; {atomic}"
            ) from exc

    async def _set_timeouts(self, *, local: bool) -> None:
        """The timeouts, and whether a down part may destroy data (see `down`)."""
        await self._conn.execute(
            "SELECT set_config('lock_timeout', $1, $3), set_config('statement_timeout', $2, $3),"
            " set_config($4, $5, $3)",
            self._lock_timeout,
            self._statement_timeout,
            local,
            ALLOW_DATA_LOSS_SETTING,
            "on" if self._allow_data_loss else "off",
        )

    async def _record(self, migration: Migration, direction: str, started: float) -> None:
        if direction == "up":
            await self._conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum, duration_ms) "
                "VALUES ($1, $2, $3, $4)",
                migration.version,
                migration.name,
                migration.checksum,
                int((time.perf_counter() - started) * 1000),
            )
        else:
            await self._conn.execute(
                "DELETE FROM schema_migrations WHERE version = $1", migration.version
            )
        # What a migration did to functions is not what the files say any more.
        await self._conn.execute("DELETE FROM schema_functions")
