"""Migrations round-trip on real data; a down part that would destroy data refuses."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from db.migrations import MIGRATIONS_DIR, load_migrations
from db.runner import MigrationError, Migrator
from tests.db.test_migrations import run_db_cli

pytestmark = pytest.mark.db

# A down part guarded the documented way (db/README.md).
_GUARDED = """\
-- migrate:up
CREATE TABLE probe_rows (id int);
-- migrate:down
DO $$
DECLARE v_rows bigint;
BEGIN
    SELECT count(*) INTO v_rows FROM probe_rows;
    IF v_rows > 0 AND current_setting('chat.allow_data_loss', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'rolling back would drop probe_rows (% rows); '
            'rerun with --allow-data-loss to drop them', v_rows;
    END IF;
END $$;
DROP TABLE probe_rows;
"""


async def test_allow_data_loss_reaches_the_down_part(
    empty_database_url: str, tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    version = len(load_migrations()) + 1
    (migrations / f"{version:04d}_guarded.sql").write_text(_GUARDED)
    dir_args = ("--migrations-dir", str(migrations))
    conn = await asyncpg.connect(empty_database_url)
    try:
        migrator = Migrator(conn, load_migrations(migrations))
        await migrator.up()
        await conn.execute("INSERT INTO probe_rows VALUES (1), (2)")

        with pytest.raises(MigrationError, match=r"would drop probe_rows \(2 rows\)"):
            await migrator.down(version - 1)
        refused = await asyncio.to_thread(
            run_db_cli, empty_database_url, *dir_args, "down", "--to", str(version - 1)
        )
        assert refused.returncode == 1
        assert "--allow-data-loss" in refused.stderr and "Traceback" not in refused.stderr
        assert await conn.fetchval("SELECT count(*) FROM probe_rows") == 2
        # The setting never leaks into the session: 'off' outside a flagged down.
        assert await conn.fetchval("SELECT current_setting('chat.allow_data_loss', true)") in (
            None,
            "",
            "off",
        )

        allowed = await asyncio.to_thread(
            run_db_cli,
            empty_database_url,
            *dir_args,
            "down",
            "--to",
            str(version - 1),
            "--allow-data-loss",
        )
        assert allowed.returncode == 0, allowed.stderr
        assert await conn.fetchval("SELECT to_regclass('probe_rows')") is None
    finally:
        await conn.close()
