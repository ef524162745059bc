"""SQL for threads and thread_participants. Every function takes a connection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from services.common.access import THREAD_COLUMNS, ParticipantRow, ThreadRow, thread_row
from services.common.errors import NotFound
from services.common.rows import column_list, masked_update, row_of
from services.common.statement_names import named
from services.common.types import DbConnection

# Unread counts are exact, read from counters (db/functions/unread.sql,
# migration 0014): a thread's unread count for a participant is
# threads.message_count - thread_participants.read_count, the others' messages
# after their read mark, not deleted. Two integers per thread, whatever the
# backlog; nothing is counted on a read.


@dataclass(frozen=True)
class InboxRow:
    thread: ThreadRow
    participant: ParticipantRow
    unread: int  # exact
    activity_at: datetime


# One shape of a thread row for every service (access reads it too).
_thread = thread_row
PARTICIPANT_COLUMNS = column_list(ParticipantRow)


def _participant(record: asyncpg.Record) -> ParticipantRow:
    return row_of(ParticipantRow, record)


# The ownership rule (db/functions/ownership.sql) after members join.
ENSURE_OWNER = named("threads.ensure_owner", "SELECT chat_ensure_owner($1, NULL)")
# The users a membership change names, locked FOR KEY SHARE (in id order) for the
# rest of the transaction, before any thread row: a racing DeleteUser (which locks
# the user, then their threads) then waits for this change or makes it NOT_FOUND,
# never a foreign-key violation or a deadlock. Deactivation is not blocked.
LOCK_USERS = named(
    "threads.lock_users",
    "SELECT id FROM users WHERE id = ANY($1::uuid[]) ORDER BY id FOR KEY SHARE",
)
INSERT_GROUP = named(
    "threads.insert_group",
    f"INSERT INTO threads (name) VALUES ($1) RETURNING {THREAD_COLUMNS}",  # noqa: S608
)
INSERT_DIRECT = named(
    "threads.insert_direct",
    f"""
    INSERT INTO threads (is_direct, direct_key) VALUES (true, $1)
    ON CONFLICT (direct_key) DO NOTHING
    RETURNING {THREAD_COLUMNS}
    """,  # noqa: S608
)
DIRECT_BY_KEY = named(
    "threads.direct_by_key",
    f"SELECT {THREAD_COLUMNS} FROM threads WHERE direct_key = $1",  # noqa: S608
)
ADD_PARTICIPANTS = named(
    "threads.add_participants",
    """
    INSERT INTO thread_participants (thread_id, user_id, role)
    SELECT $1, u.id, u.role FROM unnest($2::uuid[], $3::text[]) AS u(id, role)
    ON CONFLICT (thread_id, user_id) DO NOTHING
    """,
)
PARTICIPANTS_OF = named(
    "threads.participants_of",
    f"""
    SELECT {PARTICIPANT_COLUMNS}
    FROM thread_participants WHERE thread_id = $1 AND user_id = ANY ($2::uuid[])
    ORDER BY user_id
    """,  # noqa: S608
)
MEMBERSHIP = named(
    "threads.membership",
    f"""
    SELECT {PARTICIPANT_COLUMNS}
    FROM thread_participants WHERE thread_id = $1 AND user_id = $2
    """,  # noqa: S608
)
UPDATE = named("threads.update", masked_update("threads", ["name", "is_archived"], THREAD_COLUMNS))
DELETE = named("threads.delete", "DELETE FROM threads WHERE id = $1")
NOTIFY = named("threads.notify_membership", "SELECT chat_notify_membership($1, $2)")
LEAVE_REASON = named("threads.leave_reason", "SELECT set_config('chat.leave_reason', $1, true)")
USER_ACTIVE = named(
    "threads.user_active", "SELECT coalesce((SELECT is_active FROM users WHERE id = $1), false)"
)
# A participant is typing: a notification only (db/functions/notify.sql).
NOTIFY_TYPING = named("threads.notify_typing", "SELECT chat_notify_typing($1, $2, $3)")
REMOVE = named(
    "threads.remove_participant",
    "DELETE FROM thread_participants WHERE thread_id = $1 AND user_id = $2",
)
# Owners who can act (active users), other than $2: an inactive owner manages
# nothing, so it does not count towards the last-owner rule.
OTHER_ACTIVE_OWNERS = named(
    "threads.other_active_owners",
    """
    SELECT count(*) FROM thread_participants p JOIN users u ON u.id = p.user_id
    WHERE p.thread_id = $1 AND p.role = 'owner' AND u.is_active AND p.user_id <> $2
    """,
)
SET_ROLE = named(
    "threads.set_role",
    f"""
    UPDATE thread_participants SET role = $3 WHERE thread_id = $1 AND user_id = $2
    RETURNING {PARTICIPANT_COLUMNS}
    """,  # noqa: S608
)
LIST_PARTICIPANTS = named(
    "threads.list_participants",
    f"""
    SELECT {PARTICIPANT_COLUMNS}
    FROM thread_participants
    WHERE thread_id = $1 AND ($2::uuid IS NULL OR user_id > $2)
    ORDER BY user_id
    LIMIT $3
    """,  # noqa: S608
)
# The read mark only moves forward, and never past the thread's newest committed
# message: read under a share lock on the thread row, which waits for any send in
# flight (a send holds that row for update until it commits). Sends stamp
# created_at under that lock in commit order, so the mark covers exactly what was
# committed when MarkRead ran; a message acknowledged after MarkRead returned is
# newer than the mark, hence unread. A given read_at is capped there too (a clock
# reading could cover a send stamped earlier but committed later). A mark that
# moves gets its read_count counted again by a trigger (db/functions/unread.sql),
# under the same lock, so the unread count matches the mark it returns.
MARK_READ = named(
    "threads.mark_read",
    f"""
    WITH newest AS (
        SELECT coalesce(last_message_at, '-infinity'::timestamptz) AS at
        FROM threads WHERE id = $1
        FOR SHARE
    )
    UPDATE thread_participants p
    SET last_read_at = greatest(
        p.last_read_at,
        nullif(least(coalesce($3::timestamptz, 'infinity'), newest.at), '-infinity'))
    FROM newest
    WHERE p.thread_id = $1 AND p.user_id = $2
    RETURNING {column_list(ParticipantRow, alias="p")}
    """,  # noqa: S608
)
# The inbox: the user's memberships, newest activity first, each with its exact
# unread count from the counters.
INBOX = named(
    "threads.inbox",
    f"""
    SELECT {column_list(ThreadRow, alias="t")},
           coalesce(t.last_message_at, t.created_at) AS activity_at,
           p.thread_id, p.user_id, p.role, p.last_read_at, p.created_at AS joined_at,
           greatest(t.message_count - p.read_count, 0) AS unread
    FROM thread_participants p
    JOIN threads t ON t.id = p.thread_id
    WHERE p.user_id = $1
      AND (NOT t.is_archived OR $2)
      AND ($3::timestamptz IS NULL
           OR (coalesce(t.last_message_at, t.created_at), t.id) < ($3, $4))
    ORDER BY coalesce(t.last_message_at, t.created_at) DESC, t.id DESC
    LIMIT $5
    """,  # noqa: S608
)
# The exact counts summed over the user's non-archived threads with unread
# messages: one row of each of their memberships and threads, nothing counted.
UNREAD_TOTALS = named(
    "threads.unread_totals",
    """
    SELECT coalesce(sum(t.message_count - p.read_count), 0) AS total, count(*) AS threads
    FROM thread_participants p
    JOIN threads t ON t.id = p.thread_id
    WHERE p.user_id = $1 AND NOT t.is_archived AND t.message_count > p.read_count
    """,
)


async def lock_users(conn: DbConnection, user_ids: Sequence[UUID]) -> None:
    """Lock the users a membership change names (see LOCK_USERS): call it before
    locking a thread (users first, then threads, the order DeleteUser takes).
    NOT_FOUND unless every one exists."""
    found = {row["id"] for row in await conn.fetch(LOCK_USERS, list(user_ids))}
    missing = [user_id for user_id in user_ids if user_id not in found]
    if missing:
        names = ", ".join(map(str, missing))
        raise NotFound("user", names, f"unknown users: {names}")


async def create_group(
    conn: DbConnection, name: str | None, members: Mapping[UUID, str]
) -> tuple[ThreadRow, list[ParticipantRow]]:
    """Thread and participants in the caller's transaction; `members` maps user -> role."""
    record = await conn.fetchrow(INSERT_GROUP, name)
    assert record is not None  # INSERT ... RETURNING returns the row
    thread = _thread(record)
    await add_participants(conn, thread.id, members)
    return thread, await participants_of(conn, thread.id, list(members))


async def get_or_create_direct(
    conn: DbConnection, first: UUID, second: UUID
) -> tuple[ThreadRow, bool]:
    low, high = sorted((first, second))
    key = f"{low}:{high}"
    inserted = await conn.fetchrow(INSERT_DIRECT, key)
    if inserted is not None:
        thread = _thread(inserted)
        await add_participants(conn, thread.id, {low: "member", high: "member"})
        return thread, True
    # Another call created it (if it was concurrent, ON CONFLICT waited for its commit).
    existing = await conn.fetchrow(DIRECT_BY_KEY, key)
    assert existing is not None
    return _thread(existing), False


async def add_participants(
    conn: DbConnection, thread_id: UUID, members: Mapping[UUID, str]
) -> None:
    """Add in the caller's transaction; then the group has an active owner if it can
    (an active user joining a group whose owners are all inactive becomes its owner,
    by the rule of db/functions/ownership.sql)."""
    ids = list(members)
    await conn.execute(ADD_PARTICIPANTS, thread_id, ids, [members[i] for i in ids])
    await conn.execute(ENSURE_OWNER, thread_id)


async def participants_of(
    conn: DbConnection, thread_id: UUID, user_ids: Sequence[UUID]
) -> list[ParticipantRow]:
    return [_participant(r) for r in await conn.fetch(PARTICIPANTS_OF, thread_id, list(user_ids))]


async def membership(conn: DbConnection, thread_id: UUID, user_id: UUID) -> ParticipantRow | None:
    record = await conn.fetchrow(MEMBERSHIP, thread_id, user_id)
    return None if record is None else _participant(record)


async def update_thread(
    conn: DbConnection,
    thread_id: UUID,
    *,
    name: tuple[bool, str | None],
    archived: tuple[bool, bool],
) -> ThreadRow:
    record = await conn.fetchrow(UPDATE, thread_id, name[0], name[1], archived[0], archived[1])
    if record is None:
        raise NotFound("thread", str(thread_id))
    if archived[0] and archived[1]:
        # An archived thread has no live stream: open ones end (THREAD_ARCHIVED).
        await notify_membership(conn, thread_id, None)
    return _thread(record)


async def notify_membership(conn: DbConnection, thread_id: UUID, user_id: UUID | None) -> None:
    """Tell every messages-service process (after commit) to end affected streams."""
    await conn.execute(NOTIFY, thread_id, user_id)


async def delete_thread(conn: DbConnection, thread_id: UUID) -> None:
    if await conn.execute(DELETE, thread_id) == "DELETE 0":
        raise NotFound("thread", str(thread_id))
    await notify_membership(conn, thread_id, None)


async def remove_participant(
    conn: DbConnection, thread_id: UUID, user_id: UUID, *, by_themselves: bool
) -> None:
    """Remove in the caller's transaction; the user's stream says whether they left
    or were removed (chat.leave_reason, read by db/functions/events.sql)."""
    await conn.execute(LEAVE_REASON, "left" if by_themselves else "removed")
    await conn.execute(REMOVE, thread_id, user_id)
    await notify_membership(conn, thread_id, user_id)


async def other_active_owners(conn: DbConnection, thread_id: UUID, user_id: UUID) -> int:
    return int(await conn.fetchval(OTHER_ACTIVE_OWNERS, thread_id, user_id))


async def set_role(conn: DbConnection, thread_id: UUID, user_id: UUID, role: str) -> ParticipantRow:
    record = await conn.fetchrow(SET_ROLE, thread_id, user_id, role)
    if record is None:
        raise NotFound("participant", f"{thread_id}/{user_id}")
    return _participant(record)


async def list_participants(
    conn: DbConnection, thread_id: UUID, after: UUID | None, limit: int
) -> list[ParticipantRow]:
    return [_participant(r) for r in await conn.fetch(LIST_PARTICIPANTS, thread_id, after, limit)]


async def mark_read(
    conn: DbConnection, thread_id: UUID, user_id: UUID, read_at: datetime | None
) -> ParticipantRow:
    record = await conn.fetchrow(MARK_READ, thread_id, user_id, read_at)
    if record is None:
        raise NotFound("thread", str(thread_id))
    return _participant(record)


async def inbox(
    conn: DbConnection,
    user_id: UUID,
    *,
    include_archived: bool,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[InboxRow]:
    rows = await conn.fetch(
        INBOX,
        user_id,
        include_archived,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [
        InboxRow(
            thread=_thread(r),
            participant=row_of(ParticipantRow, r, renamed={"created_at": "joined_at"}),
            unread=int(r["unread"]),
            activity_at=r["activity_at"],
        )
        for r in rows
    ]


async def unread_totals(conn: DbConnection, user_id: UUID) -> tuple[int, int]:
    """(total unread, threads with unread), exact."""
    row = await conn.fetchrow(UNREAD_TOTALS, user_id)
    assert row is not None
    return int(row["total"]), int(row["threads"])


async def notify_typing(
    conn: DbConnection, thread_id: UUID, user_id: UUID, expire_time: datetime
) -> None:
    await conn.execute(NOTIFY_TYPING, thread_id, user_id, expire_time)


async def user_active(conn: DbConnection, user_id: UUID) -> bool:
    return bool(await conn.fetchval(USER_ACTIVE, user_id))
