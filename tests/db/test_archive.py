"""Archival: whole threads move to the archive tables and come back exactly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from typing import Any

import asyncpg
import pytest

from db.archive import ArchiveError, archive_older_than, restore_thread
from tests.db.test_migrations import REPO, run_db_cli

pytestmark = pytest.mark.db

LIVE_AND_ARCHIVE = [
    ("threads", "archived_threads"),
    ("messages", "archived_messages"),
    ("thread_participants", "archived_thread_participants"),
    ("message_attachments", "archived_message_attachments"),
]


async def seed_thread(conn: asyncpg.Connection, *, days_old: int, messages: int) -> uuid.UUID:
    """A thread with two participants, `messages` messages (with a reply and an attachment)."""
    users = [
        await conn.fetchval(
            "INSERT INTO users (email, username) VALUES ($1, $1) RETURNING id",
            f"u{uuid.uuid4().hex[:12]}",
        )
        for _ in range(2)
    ]
    thread: uuid.UUID = await conn.fetchval(
        "INSERT INTO threads (name, created_at, last_message_at) "
        "VALUES ('t', now() - make_interval(days => $1 + 1), now() - make_interval(days => $1)) "
        "RETURNING id",
        days_old,
    )
    await conn.executemany(
        "INSERT INTO thread_participants (thread_id, user_id, role) VALUES ($1, $2, $3)",
        [(thread, users[0], "owner"), (thread, users[1], "member")],
    )
    first = None
    for i in range(messages):
        message = await conn.fetchval(
            "INSERT INTO messages (thread_id, user_id, content, parent_id, metadata, created_at) "
            "VALUES ($1, $2, $3, $4, $5, now() - make_interval(days => $6) "
            "+ make_interval(secs => $7)) RETURNING id",
            thread,
            users[i % 2],
            f"message {i}",
            first,
            json.dumps({"i": i}),
            days_old + 1,
            i,
        )
        if first is None:
            first = message
            await conn.execute(
                "INSERT INTO message_attachments (message_id, url, type, name, size) "
                "VALUES ($1, 'https://x.io/a.png', 'image/png', 'a.png', 123)",
                message,
            )
    return thread


# Unread counters (db/functions/unread.sql) count live messages: archived rows
# hold 0, and a restored thread is counted again.
COUNTERS = {"message_count", "read_count"}


async def rows_of(
    conn: asyncpg.Connection, thread: uuid.UUID, *, archived: bool, counters: bool = True
) -> dict[str, Any]:
    """Every row of `thread` in the live (or archive) tables, as sorted tuples
    (without the unread counters unless `counters`)."""
    i = 1 if archived else 0
    queries = {
        "threads": f"SELECT * FROM {LIVE_AND_ARCHIVE[0][i]} WHERE id = $1",
        "messages": f"SELECT * FROM {LIVE_AND_ARCHIVE[1][i]} WHERE thread_id = $1",
        "participants": f"SELECT * FROM {LIVE_AND_ARCHIVE[2][i]} WHERE thread_id = $1",
        "attachments": f"SELECT a.* FROM {LIVE_AND_ARCHIVE[3][i]} a "
        f"JOIN {LIVE_AND_ARCHIVE[1][i]} m ON m.id = a.message_id WHERE m.thread_id = $1",
    }
    return {
        name: sorted(
            tuple(str(v) for k, v in row.items() if counters or k not in COUNTERS)
            for row in await conn.fetch(sql, thread)
        )
        for name, sql in queries.items()
    }


async def test_archive_tables_mirror_the_live_tables(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for live, archive in LIVE_AND_ARCHIVE:
            columns = [
                await conn.fetch(
                    "SELECT column_name, data_type, ordinal_position "
                    "FROM information_schema.columns WHERE table_name = $1 "
                    "ORDER BY ordinal_position",
                    table,
                )
                for table in (live, archive)
            ]
            assert [tuple(r) for r in columns[0]] == [tuple(r) for r in columns[1]], live
    finally:
        await conn.close()


async def test_archive_then_restore_gives_back_identical_rows(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        old = await seed_thread(conn, days_old=120, messages=5)
        recent = await seed_thread(conn, days_old=10, messages=3)
        before = await rows_of(conn, old, archived=False)
        uncounted = await rows_of(conn, old, archived=False, counters=False)
        cutoff = await conn.fetchval("SELECT now() - interval '90 days'")

        progress = await archive_older_than(conn, cutoff, batch_messages=100)
        assert (progress.threads, progress.messages) == (1, 5)
        assert await rows_of(conn, old, archived=True, counters=False) == uncounted
        archived_counters = await conn.fetchval(
            "SELECT (SELECT message_count FROM archived_threads WHERE id = $1)"
            " + (SELECT sum(read_count) FROM archived_thread_participants"
            "    WHERE thread_id = $1)",
            old,
        )
        assert archived_counters == 0
        gone = await rows_of(conn, old, archived=False)
        assert all(rows == [] for rows in gone.values())
        assert (await rows_of(conn, recent, archived=False))["messages"]  # untouched

        assert (await restore_thread(conn, old)).messages == 5
        assert await rows_of(conn, old, archived=False) == before
        assert all(rows == [] for rows in (await rows_of(conn, old, archived=True)).values())
        with pytest.raises(ArchiveError):
            await restore_thread(conn, old)  # live again, nothing to restore
    finally:
        await conn.close()


async def test_interrupted_archive_leaves_no_thread_half_moved(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        threads = [await seed_thread(conn, days_old=200, messages=4) for _ in range(6)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "db",
            "archive",
            "--older-than",
            "90d",
            "--batch",
            "1",
            cwd=REPO,
            env={**os.environ, "DATABASE_URL": database_url},
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        assert first.startswith(b"batch 1:")
        proc.send_signal(signal.SIGKILL)  # killed between (or during) batches
        await proc.wait()

        for thread in threads:
            live = await rows_of(conn, thread, archived=False)
            archived = await rows_of(conn, thread, archived=True)
            live_count = sum(map(len, live.values()))
            archived_count = sum(map(len, archived.values()))
            assert live_count == 0 or archived_count == 0, "a thread is half-moved"

        # Running again finishes the job.
        result = await asyncio.to_thread(run_db_cli, database_url, "archive", "--older-than", "90d")
        assert result.returncode == 0, result.stderr
        assert await conn.fetchval("SELECT count(*) FROM threads") == 0
        assert await conn.fetchval("SELECT count(*) FROM archived_messages") == 24
        assert await conn.fetchval("SELECT count(*) FROM archived_message_attachments") == 6
    finally:
        await conn.close()


async def test_dry_run_moves_nothing(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await seed_thread(conn, days_old=100, messages=2)
        result = await asyncio.to_thread(
            run_db_cli, database_url, "archive", "--older-than", "90d", "--dry-run"
        )
        assert result.returncode == 0, result.stderr
        assert "would archive 1 thread(s) with 2 message(s)" in result.stdout
        assert await conn.fetchval("SELECT count(*) FROM archived_threads") == 0
    finally:
        await conn.close()
