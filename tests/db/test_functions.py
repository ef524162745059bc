"""Function files (db/functions/*.sql): applied at the latest migration, re-applied
only when their text (or the database's copy) changed, once with several runners,
reset by any migration run, reported by status and validate."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import asyncpg
import pytest

from db.migrations import (
    FUNCTIONS_DIR,
    FunctionFile,
    MigrationFileError,
    load_function_files,
    load_migrations,
)
from db.runner import MigrationError, Migrator
from tests.db.test_migrations import run_db_cli

pytestmark = pytest.mark.db

# A probe file: it counts its own runs, so "applied once" is observable.
PROBE = """\
CREATE TABLE IF NOT EXISTS probe_runs (n serial PRIMARY KEY);
INSERT INTO probe_runs DEFAULT VALUES;
CREATE OR REPLACE FUNCTION chat_probe() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 1 $$;
"""

LIVE_DEFINITIONS = """
SELECT proname, md5(pg_get_functiondef(oid)) FROM pg_proc
WHERE pronamespace = 'public'::regnamespace ORDER BY 1, 2
"""


def copy_functions(tmp_path: Path) -> Path:
    functions = tmp_path / "functions"
    shutil.copytree(FUNCTIONS_DIR, functions)
    return functions


def migrator(conn: asyncpg.Connection, functions: Path = FUNCTIONS_DIR) -> Migrator:
    return Migrator(conn, load_migrations(), functions=load_function_files(functions))


def names(applied: Sequence[object]) -> list[str]:
    return [a.filename for a in applied if isinstance(a, FunctionFile)]


async def applied_at(conn: asyncpg.Connection) -> dict[str, datetime]:
    return {r["file"]: r["applied_at"] for r in await conn.fetch("SELECT * FROM schema_functions")}


async def runs(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM probe_runs"))


async def test_a_fresh_up_applies_every_file_and_every_function_lives_in_one(
    empty_database_url: str,
) -> None:
    files = load_function_files()
    conn = await asyncpg.connect(empty_database_url)
    try:
        applied = await Migrator(conn, load_migrations()).up()
        assert names(applied) == [f.filename for f in files]  # after the migrations, in order
        assert applied[-len(files) - 1].filename == load_migrations()[-1].filename
        recorded = await conn.fetch("SELECT file, checksum FROM schema_functions ORDER BY file")
        assert [tuple(r) for r in recorded] == [(f.filename, f.checksum) for f in files]
        live = {
            r["proname"]
            for r in await conn.fetch(
                "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
            )
        }
    finally:
        await conn.close()
    # Every server-side function has its current body in db/functions, and only there.
    assert live == {name for f in files for name in f.functions}
    assert {"chat_send_message", "chat_hand_on_ownership", "chat_assign_message_seq"} <= live


async def test_reapplied_only_when_changed(empty_database_url: str, tmp_path: Path) -> None:
    functions = copy_functions(tmp_path)
    (functions / "zz_probe.sql").write_text(PROBE)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await migrator(conn, functions).up()
        assert await runs(conn) == 1
        stamps = await applied_at(conn)
        # Nothing changed: nothing runs.
        assert await migrator(conn, functions).up() == []
        assert await runs(conn) == 1
        # One file changed: that file alone runs again, with its new body.
        (functions / "zz_probe.sql").write_text(PROBE.replace("SELECT 1", "SELECT 2"))
        assert names(await migrator(conn, functions).up()) == ["zz_probe.sql"]
        assert await conn.fetchval("SELECT chat_probe()") == 2
        assert await runs(conn) == 2
        after = await applied_at(conn)
        assert {f: t for f, t in after.items() if f != "zz_probe.sql"} == {
            f: t for f, t in stamps.items() if f != "zz_probe.sql"
        }
        # A comment is a change too (the checksum is of the text).
        send = functions / "send.sql"
        send.write_text(send.read_text() + "\n-- reviewed\n")
        assert names(await migrator(conn, functions).up()) == ["send.sql"]
        assert await migrator(conn, functions).up() == []
        # A function replaced outside the runner is put back by the next `up`.
        await conn.execute(
            "CREATE OR REPLACE FUNCTION chat_probe() RETURNS integer"
            " LANGUAGE sql IMMUTABLE AS $$ SELECT 3 $$"
        )
        assert names(await migrator(conn, functions).up()) == ["zz_probe.sql"]
        assert await conn.fetchval("SELECT chat_probe()") == 2
    finally:
        await conn.close()


async def test_concurrent_runners_apply_each_file_once(
    empty_database_url: str, tmp_path: Path
) -> None:
    functions = copy_functions(tmp_path)
    (functions / "zz_probe.sql").write_text(PROBE)
    conns = [await asyncpg.connect(empty_database_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrator(c, functions).up() for c in conns))
        assert sorted(len(names(r)) for r in results) == [0, 0, len(load_function_files()) + 1]
        assert await runs(conns[0]) == 1
        # A changed file with runners racing again: one applies it, the others wait.
        (functions / "zz_probe.sql").write_text(PROBE.replace("SELECT 1", "SELECT 2"))
        results = await asyncio.gather(*(migrator(c, functions).up() for c in conns))
        assert sorted(names(r) for r in results) == [[], [], ["zz_probe.sql"]]
        assert await runs(conns[0]) == 2
    finally:
        for conn in conns:
            await conn.close()


async def test_any_migration_run_resets_them_and_the_next_up_reapplies(
    empty_database_url: str,
) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        runner = Migrator(conn, load_migrations())
        await runner.up()
        fresh = await conn.fetch(LIVE_DEFINITIONS)
        # 0010's down part puts 0008's chat_send_message back, as it always did.
        await runner.down(9)
        assert await conn.fetchval("SELECT count(*) FROM schema_functions") == 0
        assert await conn.fetch(LIVE_DEFINITIONS) != fresh
        statuses = await runner.function_status()
        assert all(s.applied_at is None and s.problem is None for s in statuses)
        # Below the latest migration the files wait.
        assert names(await runner.up(10)) == []
        applied = await runner.up()
        assert names(applied) == [f.filename for f in load_function_files()]
        assert await conn.fetch(LIVE_DEFINITIONS) == fresh
    finally:
        await conn.close()


async def test_validate_and_status_report_drift(empty_database_url: str, tmp_path: Path) -> None:
    functions = copy_functions(tmp_path)
    dirs = ("--functions-dir", str(functions))

    async def cli(*args: str) -> tuple[int, str, str]:
        done = await asyncio.to_thread(run_db_cli, empty_database_url, *dirs, *args)
        return done.returncode, done.stdout, done.stderr

    code, out, err = await cli("up")
    assert code == 0, err
    assert "applied functions/send.sql" in out
    code, out, _ = await cli("validate")
    assert code == 0 and out.startswith("ok:") and "function file(s)" in out

    # The file changed after it was applied.
    owners = functions / "ownership.sql"
    owners.write_text(owners.read_text() + "\n-- edited\n")
    code, _, err = await cli("validate")
    assert code == 1
    assert "functions/ownership.sql changed since it was applied" in err
    code, out, _ = await cli("status")
    assert code == 1 and "!! functions/ownership.sql changed" in out
    code, out, err = await cli("up")
    assert code == 0 and out.strip() == "applied functions/ownership.sql", out + err
    assert (await cli("validate"))[0] == 0

    # A function changed in the database, outside the runner.
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(
            "CREATE OR REPLACE FUNCTION chat_message_attachments(p_message_id uuid)"
            " RETURNS jsonb LANGUAGE sql STABLE AS $$ SELECT '[]'::jsonb $$"
        )
    finally:
        await conn.close()
    code, _, err = await cli("validate")
    assert code == 1
    assert "functions/send.sql: the database's definition of" in err
    assert "chat_message_attachments" in err
    code, out, _ = await cli("up")
    assert code == 0 and out.strip() == "applied functions/send.sql"

    # A file removed after it was applied: its functions stay, validate says so.
    (functions / "ownership.sql").unlink()
    code, _, err = await cli("validate")
    assert code == 1 and "functions/ownership.sql was applied but its file is missing" in err
    code, _, err = await cli("up")
    assert code == 0, err
    assert (await cli("validate"))[0] == 0


async def test_a_failing_file_applies_nothing(empty_database_url: str, tmp_path: Path) -> None:
    functions = copy_functions(tmp_path)
    (functions / "zz_probe.sql").write_text(PROBE + "SELECT no_such_function();\n")
    conn = await asyncpg.connect(empty_database_url)
    try:
        with pytest.raises(MigrationError, match=r"functions/zz_probe\.sql failed"):
            await migrator(conn, functions).up()
        assert await conn.fetchval("SELECT to_regclass('probe_runs')") is None
        assert await conn.fetchval("SELECT to_regproc('chat_probe')") is None
        recorded = {r["file"] for r in await conn.fetch("SELECT file FROM schema_functions")}
        assert recorded == {f.filename for f in load_function_files()}  # those before it ran
    finally:
        await conn.close()


def test_malformed_function_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text(PROBE)
    (tmp_path / "b.sql").write_text(PROBE)
    with pytest.raises(MigrationFileError, match=r"chat_probe is already defined in a\.sql"):
        load_function_files(tmp_path)
    (tmp_path / "b.sql").write_text("SELECT 1;\n")
    with pytest.raises(MigrationFileError, match="defines no function"):
        load_function_files(tmp_path)
    (tmp_path / "b.sql").unlink()
    (tmp_path / "Bad-Name.sql").write_text(PROBE)
    with pytest.raises(MigrationFileError, match="lower_snake_case"):
        load_function_files(tmp_path)
