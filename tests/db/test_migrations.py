"""The migration runner against a real server: spec objects, up/down/up, locking, checks."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from db.migrations import MIGRATIONS_DIR, load_function_files, load_migrations
from db.runner import MIGRATION_LOCK_KEY, MigrationError, Migrator

pytestmark = pytest.mark.db

REPO = Path(__file__).resolve().parents[2]

SPEC_TABLES = {
    "users",
    "threads",
    "messages",
    "thread_participants",
    "message_attachments",
    "archived_messages",
    "archived_threads",
}
SPEC_INDEXES = {
    "idx_users_email",
    "idx_users_username",
    "idx_threads_last_message",
    "idx_messages_thread",
    "idx_messages_user",
    "idx_messages_parent",
    "idx_thread_participants_user",
    "idx_message_attachments",
    "idx_messages_metadata",
}
# Foreign keys and their ON DELETE rule ('c' cascade, 'n' set null), per the spec.
SPEC_FOREIGN_KEYS = {
    ("messages", "thread_id"): "c",
    ("messages", "user_id"): "c",
    ("messages", "parent_id"): "n",
    ("thread_participants", "thread_id"): "c",
    ("thread_participants", "user_id"): "c",
    ("message_attachments", "message_id"): "c",
}

CATALOG_QUERIES = {
    "columns": """
        SELECT table_name, column_name, data_type, character_maximum_length,
               is_nullable, column_default, ordinal_position
        FROM information_schema.columns WHERE table_schema = 'public'
        ORDER BY table_name, column_name""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' ORDER BY tablename, indexname""",
    "constraints": """
        SELECT conrelid::regclass::text AS tbl, conname, contype,
               pg_get_constraintdef(oid) AS def
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace
        ORDER BY 1, 2""",
    "functions": """
        SELECT proname, pg_get_function_identity_arguments(oid) AS args, md5(prosrc) AS body
        FROM pg_proc WHERE pronamespace = 'public'::regnamespace ORDER BY 1, 2""",
    "triggers": """
        SELECT tgrelid::regclass::text AS tbl, tgname, pg_get_triggerdef(oid) AS def
        FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2""",
}


async def catalog_dump(conn: asyncpg.Connection) -> dict[str, list[tuple[object, ...]]]:
    return {
        name: [tuple(row) for row in await conn.fetch(query)]
        for name, query in CATALOG_QUERIES.items()
    }


def run_db_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "db", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_schema_has_every_spec_object(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        indexes = {
            r["indexname"]
            for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"
            )
        }
        constraints = {
            r["conname"]: r["contype"]
            for r in await conn.fetch(
                "SELECT conname, contype::text FROM pg_constraint "
                "WHERE connamespace = 'public'::regnamespace"
            )
        }
        fks = await conn.fetch(
            """
            SELECT c.conrelid::regclass::text AS tbl, a.attname AS col, c.confdeltype::text AS rule
            FROM pg_constraint c
            JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
            WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace
            """
        )
        metadata_index = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'idx_messages_metadata'"
        )
    finally:
        await conn.close()
    assert tables >= SPEC_TABLES
    assert indexes >= SPEC_INDEXES
    assert constraints["uq_users_email"] == "u"
    assert constraints["uq_users_username"] == "u"
    assert constraints["fk_message_thread"] == "f"
    assert constraints["fk_participant_thread"] == "f"
    fk_rules = {(r["tbl"], r["col"]): r["rule"] for r in fks}
    # Exactly one foreign key per column: named once, not duplicated inline.
    assert len(fks) == len(fk_rules)
    for key, rule in SPEC_FOREIGN_KEYS.items():
        assert fk_rules[key] == rule, key
    assert "USING gin (metadata)" in metadata_index


async def test_up_down_up_leaves_identical_schema(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        migrator = Migrator(conn, load_migrations())
        await migrator.up()
        first = await catalog_dump(conn)
        rolled_back = await migrator.down(0)
        assert [m.version for m in rolled_back] == sorted(
            (m.version for m in load_migrations()), reverse=True
        )
        leftover = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename NOT IN ('schema_migrations', 'schema_functions')"
        )
        assert leftover == []
        # The function files' functions go too (helpers no down part knows of).
        functions = await conn.fetch(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
        )
        assert functions == []
        await migrator.up()
        second = await catalog_dump(conn)
    finally:
        await conn.close()
    assert first == second
    assert {row[1] for row in first["indexes"]} >= SPEC_INDEXES


async def test_cli_up_status_down(empty_database_url: str) -> None:
    latest = load_migrations()[-1]
    up = await asyncio.to_thread(run_db_cli, empty_database_url, "up")
    assert up.returncode == 0, up.stderr
    assert f"applied {latest.filename}" in up.stdout
    again = await asyncio.to_thread(run_db_cli, empty_database_url, "up")
    assert again.returncode == 0 and "up to date" in again.stdout
    status = await asyncio.to_thread(run_db_cli, empty_database_url, "status")
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    assert len(lines) == len(load_migrations()) + len(load_function_files())
    assert all(" applied " in line for line in lines)
    down = await asyncio.to_thread(run_db_cli, empty_database_url, "down", "--to", "1")
    assert down.returncode == 0, down.stderr
    status = await asyncio.to_thread(run_db_cli, empty_database_url, "status")
    assert " applied " in status.stdout.splitlines()[0]
    # Function files are pending again: the next `up` to the latest re-applies them.
    assert all(line.endswith("pending") for line in status.stdout.splitlines()[1:])


async def test_validate_refuses_an_edited_applied_migration(
    empty_database_url: str, tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    dir_args = ("--migrations-dir", str(migrations))
    assert (
        await asyncio.to_thread(run_db_cli, empty_database_url, *dir_args, "up")
    ).returncode == 0
    ok = await asyncio.to_thread(run_db_cli, empty_database_url, *dir_args, "validate")
    assert ok.returncode == 0 and ok.stdout.startswith("ok:")

    edited = migrations / "0001_initial_schema.sql"
    edited.write_text(edited.read_text() + "\n-- a harmless-looking edit\n")
    bad = await asyncio.to_thread(run_db_cli, empty_database_url, *dir_args, "validate")
    assert bad.returncode == 1
    assert "0001_initial_schema.sql was changed after it was applied" in bad.stderr
    # `up` refuses to run on top of an edited history, naming the file too.
    refused = await asyncio.to_thread(run_db_cli, empty_database_url, *dir_args, "up")
    assert refused.returncode == 1
    assert "0001_initial_schema.sql" in refused.stderr
    assert "Traceback" not in refused.stderr


async def test_two_runners_at_once_both_succeed(empty_database_url: str) -> None:
    first, second = await asyncio.gather(
        asyncio.to_thread(run_db_cli, empty_database_url, "up"),
        asyncio.to_thread(run_db_cli, empty_database_url, "up"),
    )
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    conn = await asyncpg.connect(empty_database_url)
    try:
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [r["version"] for r in versions] == [m.version for m in load_migrations()]


async def test_runner_waits_for_the_lock_holder(empty_database_url: str) -> None:
    holder = await asyncpg.connect(empty_database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "db",
            "up",
            cwd=REPO,
            env={**os.environ, "DATABASE_URL": empty_database_url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), timeout=60)
        assert b"waiting" in line  # it found the lock taken and waits ...
        assert await holder.fetchval("SELECT to_regclass('users')") is None  # ... applying nothing
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode == 0, stderr
        assert await holder.fetchval("SELECT to_regclass('users')") is not None
    finally:
        await holder.close()


async def test_failed_migration_applies_nothing(empty_database_url: str, tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    bad_version = len(load_migrations()) + 1
    (migrations / f"{bad_version:04d}_broken.sql").write_text(
        "-- migrate:up\nCREATE TABLE half_done (id int);\nSELECT no_such_function();\n"
        "-- migrate:down\nDROP TABLE half_done;\n"
    )
    conn = await asyncpg.connect(empty_database_url)
    try:
        migrator = Migrator(conn, load_migrations(migrations))
        with pytest.raises(MigrationError, match=f"{bad_version:04d}_broken.sql"):
            await migrator.up()
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
        applied = [m.version for m in await migrator.applied()]
        assert applied == list(range(1, bad_version))
    finally:
        await conn.close()


async def test_no_transaction_migration_runs_concurrent_index(
    empty_database_url: str, tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    version = len(load_migrations()) + 1
    (migrations / f"{version:04d}_concurrent_index.sql").write_text(
        "-- migrate:no-transaction\n-- migrate:up\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_probe ON users (created_at);\n"
        "-- migrate:down\nDROP INDEX CONCURRENTLY IF EXISTS idx_probe;\n"
    )
    conn = await asyncpg.connect(empty_database_url)
    try:
        migrator = Migrator(conn, load_migrations(migrations))
        await migrator.up()
        assert await conn.fetchval("SELECT to_regclass('idx_probe')") is not None
        await migrator.down(version - 1)
        assert await conn.fetchval("SELECT to_regclass('idx_probe')") is None
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://nobody@127.0.0.1:1/chat",  # nothing listens on port 1
        "mysql://root@localhost/chat",  # not a PostgreSQL URL
    ],
)
async def test_unreachable_database_is_one_clear_line(url: str) -> None:
    result = await asyncio.to_thread(run_db_cli, url, "status")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("db: error: ")
