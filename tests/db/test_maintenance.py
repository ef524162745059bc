"""`python -m db maintain`: vacuum, bloat estimates, concurrent reindex."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from db.maintenance import estimate_bloat, maintain
from tests.db.test_migrations import run_db_cli

pytestmark = pytest.mark.db


async def _bloat_users_index(conn: asyncpg.Connection) -> None:
    """Fill users, delete 90% of them and vacuum: the index keeps its pages."""
    await conn.execute(
        "INSERT INTO users (email, username) SELECT 'u' || g || '@x.io', 'user' || g "
        "FROM generate_series(1, 40000) g"
    )
    await conn.execute("DELETE FROM users WHERE right(username, 1) <> '0'")
    await conn.execute("VACUUM (ANALYZE) users")


async def test_maintain_rebuilds_only_bloated_indexes(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await _bloat_users_index(conn)
        before = {b.index: b for b in await estimate_bloat(conn)}
        bloated = before["idx_users_username"]
        assert bloated.ratio > 0.5, bloated

        report = await maintain(conn, threshold=0.5, min_index_bytes=64 * 1024)
        assert "users" in report.vacuumed and "messages" in report.vacuumed
        assert "idx_users_username" in report.rebuilt
        # Empty tables' indexes are never worth it: under the size floor.
        assert "idx_messages_thread" not in report.rebuilt

        after = {b.index: b for b in await estimate_bloat(conn)}
        assert after["idx_users_username"].actual_bytes < bloated.actual_bytes / 2
        assert after["idx_users_username"].ratio < 0.5
        last = await conn.fetchrow(
            "SELECT last_vacuum, last_analyze FROM pg_stat_user_tables WHERE relname = 'messages'"
        )
        assert last is not None and last["last_vacuum"] is not None
    finally:
        await conn.close()


async def test_maintain_command_dry_run_changes_nothing(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await _bloat_users_index(conn)
        size = await conn.fetchval("SELECT pg_relation_size('idx_users_username')")
        result = await asyncio.to_thread(
            run_db_cli, database_url, "maintain", "--dry-run", "--min-index-bytes", "65536"
        )
        assert result.returncode == 0, result.stderr
        assert "would rebuild idx_users_username" in result.stdout
        assert "index bloat estimates" in result.stdout
        assert await conn.fetchval("SELECT pg_relation_size('idx_users_username')") == size
    finally:
        await conn.close()
