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

import asyncpg

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
    # after commit, every messages-service process hears it (services/messages/streams/).
    "SELECT chat_notify_membership(id, NULL) FROM unnest($1::uuid[]) AS id",
)

# Restore, in one transaction (restore_thread), by the rules of db/README.md
# ("Restoring after the world moved on"). $1 is the thread's id throughout.

_ARCHIVED_THREAD = """
SELECT id, is_direct, direct_key, last_seq FROM archived_threads WHERE id = $1 FOR UPDATE
"""
# The authors and participants who still exist, locked so that a deletion
# waits for the restore (it locks the user's row before removing anything).
_LOCK_PRESENT_USERS = """
SELECT u.id FROM users u
WHERE u.id IN (SELECT user_id FROM archived_thread_participants WHERE thread_id = $1
               UNION SELECT user_id FROM archived_messages WHERE thread_id = $1)
ORDER BY u.id
FOR KEY SHARE
"""
# A direct thread's key as its participants make it (services/threads/store.py):
# "<smaller uuid>:<larger uuid>", or its own id when it has not two of them.
_PAIR_KEY = """
SELECT coalesce(
    (SELECT min(user_id::text COLLATE "C") || ':' || max(user_id::text COLLATE "C")
     FROM archived_thread_participants WHERE thread_id = $1 HAVING count(*) = 2),
    $1::text)
"""
_DIRECT_BY_KEY = "SELECT id FROM threads WHERE direct_key = $1"
_SET_KEY = "UPDATE archived_threads SET direct_key = $2 WHERE id = $1"
_RESTORE_THREAD = """
WITH moved AS (DELETE FROM archived_threads WHERE id = $1 RETURNING *)
INSERT INTO threads SELECT * FROM moved
"""
# Participants who were deleted since are dropped, as their deletion dropped them
# from live threads (ON DELETE CASCADE).
_DROP_GONE_PARTICIPANTS = """
DELETE FROM archived_thread_participants a
WHERE a.thread_id = $1 AND NOT EXISTS (SELECT 1 FROM users u WHERE u.id = a.user_id)
"""
_RESTORE_PARTICIPANTS = """
WITH moved AS (DELETE FROM archived_thread_participants WHERE thread_id = $1 RETURNING *)
INSERT INTO thread_participants SELECT * FROM moved
"""
# Messages by deleted authors follow chat_forget_user_messages (migration 0008),
# at positions after the thread's last one ($2): first each reply by someone who
# still exists to such a message loses its parent (an `updated` event), then
# each such message leaves history with a removal record (a `removed` event),
# both in seq order; their attachments go with them.
_ORPHAN_REPLIES = """
WITH orphans AS (
    SELECT r.id, row_number() OVER (ORDER BY r.seq) AS n
    FROM archived_messages r JOIN archived_messages p ON p.id = r.parent_id
    WHERE r.thread_id = $1
      AND EXISTS (SELECT 1 FROM users u WHERE u.id = r.user_id)
      AND NOT EXISTS (SELECT 1 FROM users u WHERE u.id = p.user_id)
)
UPDATE archived_messages m
SET parent_id = NULL, change_seq = $2 + o.n,
    updated_at = greatest(now(), m.updated_at + interval '1 microsecond')
FROM orphans o WHERE m.id = o.id
"""
_RECORD_REMOVALS = """
INSERT INTO message_removals (thread_id, position, message_id, user_id)
SELECT $1, $2 + row_number() OVER (ORDER BY m.seq), m.id, m.user_id
FROM archived_messages m
WHERE m.thread_id = $1 AND NOT EXISTS (SELECT 1 FROM users u WHERE u.id = m.user_id)
"""
_DROP_GONE_ATTACHMENTS = """
DELETE FROM archived_message_attachments a USING archived_messages m
WHERE a.message_id = m.id AND m.thread_id = $1
  AND NOT EXISTS (SELECT 1 FROM users u WHERE u.id = m.user_id)
"""
_DROP_GONE_MESSAGES = """
DELETE FROM archived_messages m
WHERE m.thread_id = $1 AND NOT EXISTS (SELECT 1 FROM users u WHERE u.id = m.user_id)
"""
_SET_LAST_SEQ = "UPDATE threads SET last_seq = $2 WHERE id = $1"
# Foreign keys are checked at the end of each statement, so replies and their
# parents come back in one INSERT.
_RESTORE_MESSAGES = """
WITH moved AS (DELETE FROM archived_messages WHERE thread_id = $1 RETURNING *)
INSERT INTO messages SELECT * FROM moved
"""
_RESTORE_ATTACHMENTS = """
WITH moved AS (
    DELETE FROM archived_message_attachments a USING messages m
    WHERE a.message_id = m.id AND m.thread_id = $1
    RETURNING a.*
) INSERT INTO message_attachments SELECT * FROM moved
"""
_RESTORE_REMOVALS = """
WITH moved AS (DELETE FROM archived_message_removals WHERE thread_id = $1 RETURNING *)
INSERT INTO message_removals SELECT * FROM moved
"""
# A group whose owners were deleted (or deactivated) since gets one by the rule
# of live threads (chat_ensure_owner, migration 0011), when that rule exists.
_HAS_OWNER_RULE = "SELECT to_regprocedure('chat_ensure_owner(uuid, uuid)') IS NOT NULL"
_ENSURE_OWNER = "SELECT chat_ensure_owner($1, NULL)"


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


@dataclass(frozen=True)
class Restored:
    """What `restore_thread` brought back, and what the rules dropped on the way."""

    messages: int  # messages restored
    removed_messages: int  # messages by deleted authors, now removal records
    orphaned_replies: int  # replies that lost their parent (a deleted author's message)
    dropped_participants: int  # participants deleted since archival
    new_owner: UUID | None  # who became owner, when no active owner was left


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[1])


async def restore_thread(conn: DbConnection, thread_id: UUID) -> Restored:
    """Bring an archived thread back (same ids, rows, timestamps), in one transaction.

    Deleted participants are dropped, messages by deleted authors leave history as
    a deletion of their author would have made them (removal records), and a group
    left without an active owner gets one; a direct thread whose pair has another
    direct thread now is refused. On any refusal or error nothing changes: the
    archive keeps the thread exactly.
    """
    try:
        return await _restore(conn, thread_id)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "uq_threads_direct_key":
            raise
        # The pair's new direct thread committed after our check: say which it is.
        key = await conn.fetchval(
            "SELECT direct_key FROM archived_threads WHERE id = $1", thread_id
        ) or await conn.fetchval(_PAIR_KEY, thread_id)
        existing = await conn.fetchval(_DIRECT_BY_KEY, key)
        raise _pair_taken(thread_id, key, existing) from None


def _pair_taken(thread_id: UUID, key: str, existing: UUID | None) -> ArchiveError:
    return ArchiveError(
        f"archived direct thread {thread_id} cannot be restored: its two users "
        f"({key.replace(':', ' and ')}) have direct thread {existing} now; "
        "the archive is unchanged (delete or archive that thread first to restore this one)"
    )


async def _restore(conn: DbConnection, thread_id: UUID) -> Restored:
    async with conn.transaction():
        if await conn.fetchval("SELECT 1 FROM threads WHERE id = $1", thread_id):
            raise ArchiveError(f"thread {thread_id} is live, not archived")
        thread = await conn.fetchrow(_ARCHIVED_THREAD, thread_id)
        if thread is None:
            raise ArchiveError(f"no archived thread {thread_id}")
        await conn.execute(_LOCK_PRESENT_USERS, thread_id)
        if thread["is_direct"]:
            # A key lost in a rolled-back migration (0003) comes back from the pair.
            key = thread["direct_key"] or await conn.fetchval(_PAIR_KEY, thread_id)
            existing = await conn.fetchval(_DIRECT_BY_KEY, key)
            if existing is not None:
                raise _pair_taken(thread_id, key, existing)
            if thread["direct_key"] is None:
                await conn.execute(_SET_KEY, thread_id, key)
        await conn.execute(_RESTORE_THREAD, thread_id)

        dropped = _count(await conn.execute(_DROP_GONE_PARTICIPANTS, thread_id))
        await conn.execute(_RESTORE_PARTICIPANTS, thread_id)

        base = int(thread["last_seq"])
        orphaned = _count(await conn.execute(_ORPHAN_REPLIES, thread_id, base))
        removed = _count(await conn.execute(_RECORD_REMOVALS, thread_id, base + orphaned))
        if removed:  # (a reply is orphaned only by a removed message)
            await conn.execute(_DROP_GONE_ATTACHMENTS, thread_id)
            await conn.execute(_DROP_GONE_MESSAGES, thread_id)
            await conn.execute(_SET_LAST_SEQ, thread_id, base + orphaned + removed)
        messages = _count(await conn.execute(_RESTORE_MESSAGES, thread_id))
        await conn.execute(_RESTORE_ATTACHMENTS, thread_id)
        await conn.execute(_RESTORE_REMOVALS, thread_id)

        new_owner = None
        if not thread["is_direct"] and await conn.fetchval(_HAS_OWNER_RULE):
            new_owner = await conn.fetchval(_ENSURE_OWNER, thread_id)
    # No stream can be open on an archived thread; its positions (last_seq, the
    # messages' seq/change_seq, the removals) come back unchanged, and those the
    # rules add come after them, so a cursor handed out before archival resumes
    # exactly where it left off and then sees what changed.
    return Restored(messages, removed, orphaned, dropped, new_owner)
