"""SQL for the user streams' log (thread_events, db/functions/events.sql).

Every function takes a connection. Events are read only once positioned (the
sequencer numbered them after they committed), in position order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from services.common.rows import Record, row_of
from services.common.statement_names import named
from services.common.types import DbConnection

# The columns every read of the log returns. `redacted`: a message event whose
# message has since been deleted or left history, served without its content.
_EVENT = """
    e.position, e.thread_id, e.kind, e.user_id, e.payload,
    (e.message_id IS NOT NULL AND e.kind <> 'message_deleted' AND NOT EXISTS (
        SELECT 1 FROM messages m WHERE m.id = e.message_id AND m.status <> 'deleted'))
        AS redacted
"""
STATE = named("log.state", "SELECT last_position, retained_after FROM event_log")
SEQUENCE = named("log.sequence", "SELECT chat_sequence_events($1)")
PRUNE = named("log.prune", "SELECT chat_prune_events(make_interval(secs => $1), $2)")
# The whole log after $1, at most $2 events and, past the first, about $3 bytes
# of payload (as stored): what one process's follower reads for every stream.
AFTER = named(
    "log.after",
    f"""
    SELECT * FROM (
        SELECT {_EVENT},
               sum(pg_column_size(e.payload)) OVER (ORDER BY e.position)
                   - pg_column_size(e.payload) AS bytes_before
        FROM thread_events e
        WHERE e.position > $1
        ORDER BY e.position
        LIMIT $2
    ) page
    WHERE bytes_before < $3
    ORDER BY position
    """,  # noqa: S608 (constant columns)
)
# Some threads' events in (after, upto]: a resumed stream's replay.
THREADS_AFTER = named(
    "log.threads_after",
    f"""
    SELECT {_EVENT}
    FROM thread_events e
    WHERE e.thread_id = ANY ($1::uuid[]) AND e.position > $2 AND e.position <= $3
    ORDER BY e.position
    LIMIT $4
    """,  # noqa: S608 (constant columns)
)
# In one snapshot: the users' memberships now, their joins and leaves that came
# later than position $2 (positioned after it, or not positioned yet), newest
# first, and the log's retention. Undoing those from the memberships gives the
# memberships at $2: every membership change writes its event in its own
# transaction, so the two always agree.
MEMBERSHIP = named(
    "log.membership",
    """
    SELECT 'member' AS kind, p.user_id, p.thread_id, NULL::bigint AS id
    FROM thread_participants p WHERE p.user_id = ANY ($1::uuid[])
    UNION ALL
    SELECT e.kind, e.user_id, e.thread_id, e.id
    FROM thread_events e
    WHERE e.user_id = ANY ($1::uuid[])
      AND e.kind IN ('participant_joined', 'participant_left')
      AND (e.position IS NULL OR e.position > $2)
    UNION ALL
    SELECT 'retained_after', NULL, NULL, retained_after FROM event_log
    """,
)
ACTIVE = named("log.active_users", "SELECT id FROM users WHERE id = ANY ($1::uuid[]) AND is_active")


@dataclass(frozen=True, slots=True)
class LogEvent:
    position: int
    thread_id: UUID
    kind: str  # thread_events.kind
    user_id: UUID | None  # the member a membership or read-mark event is about
    payload: dict[str, Any]
    redacted: bool  # the message was deleted since: serve it without content


@dataclass(frozen=True, slots=True)
class LogState:
    last_position: int
    retained_after: int  # a cursor before this is expired


@dataclass(slots=True)
class Memberships:
    """Each user's threads at one position, and the threads they join after it."""

    at: dict[UUID, set[UUID]] = field(default_factory=dict)
    joined_later: dict[UUID, set[UUID]] = field(default_factory=dict)
    retained_after: int = 0


def _event(record: Record) -> LogEvent:
    return row_of(LogEvent, record)


async def state(conn: DbConnection) -> LogState:
    record = await conn.fetchrow(STATE)
    assert record is not None  # migration 0013 inserts the row
    return LogState(record["last_position"], record["retained_after"])


async def sequence(conn: DbConnection, limit: int) -> int | None:
    """Number the committed events that wait (at most `limit`); None if another
    sequencer is at work. Returns the log's last position."""
    value = await conn.fetchval(SEQUENCE, limit)
    return None if value is None else int(value)


async def prune(conn: DbConnection, keep_s: float, limit: int) -> int:
    """Drop at most `limit` events older than `keep_s`; returns retained_after."""
    return int(await conn.fetchval(PRUNE, keep_s, limit))


async def after(conn: DbConnection, position: int, limit: int, max_bytes: int) -> list[LogEvent]:
    return [_event(r) for r in await conn.fetch(AFTER, position, limit, max_bytes)]


async def threads_after(
    conn: DbConnection, threads: Sequence[UUID], position: int, upto: int, limit: int
) -> list[LogEvent]:
    records = await conn.fetch(THREADS_AFTER, list(threads), position, upto, limit)
    return [_event(r) for r in records]


async def memberships(conn: DbConnection, users: Sequence[UUID], position: int) -> Memberships:
    """Each of `users`' threads at `position` (see MEMBERSHIP)."""
    result = Memberships(at={user: set() for user in users})
    for user in users:
        result.joined_later[user] = set()
    changes = []
    for record in await conn.fetch(MEMBERSHIP, list(users), position):
        kind = record["kind"]
        if kind == "retained_after":
            result.retained_after = int(record["id"])
        elif kind == "member":
            result.at[record["user_id"]].add(record["thread_id"])
        else:
            changes.append(record)
    # Undo the later joins and leaves, newest first.
    for record in sorted(changes, key=lambda r: -int(r["id"])):
        threads = result.at[record["user_id"]]
        if record["kind"] == "participant_joined":
            threads.discard(record["thread_id"])
            result.joined_later[record["user_id"]].add(record["thread_id"])
        else:
            threads.add(record["thread_id"])
    return result


async def active_users(conn: DbConnection, users: Sequence[UUID]) -> set[UUID]:
    return {r["id"] for r in await conn.fetch(ACTIVE, list(users))}
