"""Data archival: move whole threads older than a cutoff into the archive tables.

A thread moves with its participants, messages, attachments and stream
removal records (its positions move with it, so cursors stay valid), in one
transaction per batch: a batch takes threads (oldest activity first) until their
messages reach the batch size (at least one thread per batch, so a thread is
never split across transactions and never half-moved). Each move is
`DELETE ... RETURNING` feeding `INSERT`. Interrupted runs resume by running
again: whatever committed is archived, the rest is still live. Each batch ends
the open streams of its threads (a `chat_membership` notification, sent at commit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from services.common.types import DbConnection

log = logging.getLogger(__name__)

DEFAULT_BATCH_MESSAGES = 5000

# Candidates: inactive since the cutoff, oldest activity first. SKIP LOCKED lets
# two archivers run at once without blocking each other or moving a thread twice.
_PICK_BATCH = """
WITH candidates AS (
    SELECT t.id, coalesce(t.last_message_at, t.created_at) AS active_at,
           (SELECT count(*) FROM messages m WHERE m.thread_id = t.id) AS n_messages
    FROM threads t
    WHERE coalesce(t.last_message_at, t.created_at) < $1
    ORDER BY active_at, t.id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), running AS (
    SELECT id, n_messages,
           sum(n_messages) OVER (ORDER BY active_at, id) - n_messages AS before
    FROM candidates
)
SELECT id, n_messages FROM running WHERE before < $2 OR before = 0 ORDER BY before
"""

_MOVE = (
    """
    WITH moved AS (
        DELETE FROM message_attachments a USING messages m
        WHERE a.message_id = m.id AND m.thread_id = ANY ($1::uuid[])
        RETURNING a.*
    ) INSERT INTO archived_message_attachments SELECT * FROM moved
    """,
    """
    WITH moved AS (
        DELETE FROM messages WHERE thread_id = ANY ($1::uuid[]) RETURNING *
    ) INSERT INTO archived_messages SELECT * FROM moved
    """,
    """
    WITH moved AS (
        DELETE FROM thread_participants WHERE thread_id = ANY ($1::uuid[]) RETURNING *
    ) INSERT INTO archived_thread_participants SELECT * FROM moved
    """,
    """
    WITH moved AS (
        DELETE FROM message_removals WHERE thread_id = ANY ($1::uuid[]) RETURNING *
    ) INSERT INTO archived_message_removals SELECT * FROM moved
    """,
    """
    WITH moved AS (
        DELETE FROM threads WHERE id = ANY ($1::uuid[]) RETURNING *
    ) INSERT INTO archived_threads SELECT * FROM moved
    """,
    # Open streams of the moved threads end (NOT_FOUND, as for a deleted thread):
    # after commit, every messages-service process hears it (services/messages/hub.py).
    """
    SELECT pg_notify('chat_membership',
                     json_build_object('thread_id', id, 'user_id', NULL)::text)
    FROM unnest($1::uuid[]) AS id
    """,
)

# Restore in dependency order; foreign keys are checked at the end of each
# statement, so replies and their parents can come back in one INSERT.
_RESTORE = (
    """
    WITH moved AS (DELETE FROM archived_threads WHERE id = $1 RETURNING *)
    INSERT INTO threads SELECT * FROM moved
    """,
    """
    WITH moved AS (DELETE FROM archived_thread_participants WHERE thread_id = $1 RETURNING *)
    INSERT INTO thread_participants SELECT * FROM moved
    """,
    """
    WITH moved AS (DELETE FROM archived_messages WHERE thread_id = $1 RETURNING *)
    INSERT INTO messages SELECT * FROM moved
    """,
    """
    WITH moved AS (
        DELETE FROM archived_message_attachments a USING messages m
        WHERE a.message_id = m.id AND m.thread_id = $1
        RETURNING a.*
    ) INSERT INTO message_attachments SELECT * FROM moved
    """,
    """
    WITH moved AS (DELETE FROM archived_message_removals WHERE thread_id = $1 RETURNING *)
    INSERT INTO message_removals SELECT * FROM moved
    """,
)

_DRY_RUN = """
SELECT count(*) AS threads,
       coalesce(sum((SELECT count(*) FROM messages m WHERE m.thread_id = t.id)), 0) AS messages
FROM threads t
WHERE coalesce(t.last_message_at, t.created_at) < $1
"""


@dataclass
class ArchiveProgress:
    batches: int = 0
    threads: int = 0
    messages: int = 0


class ArchiveError(RuntimeError):
    pass


async def count_archivable(conn: DbConnection, cutoff: datetime) -> tuple[int, int]:
    row = await conn.fetchrow(_DRY_RUN, cutoff)
    assert row is not None
    return int(row["threads"]), int(row["messages"])


async def archive_batch(
    conn: DbConnection, cutoff: datetime, batch_messages: int, max_threads: int = 1000
) -> tuple[int, int]:
    """Move one batch in one transaction; returns (threads, messages) moved."""
    async with conn.transaction():
        picked = await conn.fetch(_PICK_BATCH, cutoff, batch_messages, max_threads)
        if not picked:
            return 0, 0
        ids = [row["id"] for row in picked]
        for statement in _MOVE:
            await conn.execute(statement, ids)
    return len(ids), sum(int(row["n_messages"]) for row in picked)


async def archive_older_than(
    conn: DbConnection,
    cutoff: datetime,
    *,
    batch_messages: int = DEFAULT_BATCH_MESSAGES,
    on_batch: Callable[[ArchiveProgress], None] | None = None,
) -> ArchiveProgress:
    progress = ArchiveProgress()
    while True:
        threads, messages = await archive_batch(conn, cutoff, batch_messages)
        if threads == 0:
            return progress
        progress.batches += 1
        progress.threads += threads
        progress.messages += messages
        if on_batch is not None:
            on_batch(progress)


async def restore_thread(conn: DbConnection, thread_id: UUID) -> int:
    """Bring an archived thread back exactly (same ids, rows, timestamps); returns messages."""
    async with conn.transaction():
        if await conn.fetchval("SELECT 1 FROM threads WHERE id = $1", thread_id):
            raise ArchiveError(f"thread {thread_id} is live, not archived")
        restored = await conn.execute(_RESTORE[0], thread_id)
        if restored.endswith(" 0"):
            raise ArchiveError(f"no archived thread {thread_id}")
        await conn.execute(_RESTORE[1], thread_id)
        status = await conn.execute(_RESTORE[2], thread_id)
        await conn.execute(_RESTORE[3], thread_id)
        await conn.execute(_RESTORE[4], thread_id)
    # No stream can be open on an archived thread; its positions (last_seq, the
    # messages' seq/change_seq, the removals) come back unchanged, so a cursor
    # handed out before archival resumes exactly where it left off.
    return int(status.rsplit(" ", 1)[1])
