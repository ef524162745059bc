"""Thread visibility: the one rule every service applies before a thread is touched.

Invariant: a call acting for a user (x-user-id) sees a thread only while that
user participates in it; to anyone else it does not exist (NOT_FOUND, the same
answer as for a thread that never existed, so existence does not leak). A
trusted call sees every thread. Every service's policy module gets a thread
through `visible_thread` and decides roles from the `ThreadAccess` it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from uuid import UUID

from services.common.errors import NotFound
from services.common.identity import Caller
from services.common.rows import Record, column_list, row_of
from services.common.statement_names import named
from services.common.types import DbConnection


class Role(StrEnum):
    """A participant's role, spelled as the `thread_participants.role` column holds it."""

    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"


# Roles that manage a group: rename it, add and remove participants, change roles.
MANAGERS = frozenset({Role.OWNER, Role.ADMIN})


@dataclass(frozen=True)
class ThreadRow:
    id: UUID
    name: str | None
    is_direct: bool
    is_archived: bool
    last_message_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ParticipantRow:
    thread_id: UUID
    user_id: UUID
    role: str
    last_read_at: datetime | None
    created_at: datetime


# Every statement returning threads selects these, in any service.
THREAD_COLUMNS = column_list(ThreadRow)


@dataclass(frozen=True)
class ThreadAccess:
    """A thread as the caller may see it, and the caller's part in it."""

    thread: ThreadRow
    caller: Caller
    # The caller's role; None only for a trusted call (which may do everything).
    role: Role | None

    @property
    def trusted(self) -> bool:
        return self.caller.trusted


# Unlocked: the thread and the caller's role in one statement (a null $2, a
# trusted call, matches no participant).
THREAD_AND_ROLE = named(
    "access.thread_and_role",
    f"""
    SELECT {column_list(ThreadRow, alias="t")}, p.role
    FROM threads t
    LEFT JOIN thread_participants p ON p.thread_id = t.id AND p.user_id = $2
    WHERE t.id = $1
    """,  # noqa: S608 (columns from ThreadRow)
)
# Locked: the thread row FOR UPDATE for the rest of the transaction (membership
# changes of one thread serialise on it), then the role by a second statement.
# Not one join: a statement that waited for the lock still reads the joined
# participant row as it was when the statement began, so a caller removed (or
# demoted) by the transaction it waited for would keep their old role.
LOCK_THREAD = named(
    "access.lock_thread",
    f"SELECT {THREAD_COLUMNS} FROM threads WHERE id = $1 FOR UPDATE",  # noqa: S608
)
ROLE = named(
    "access.role",
    "SELECT role FROM thread_participants WHERE thread_id = $1 AND user_id = $2",
)


def thread_row(record: Record) -> ThreadRow:
    return row_of(ThreadRow, record)


async def visible_thread(
    conn: DbConnection, caller: Caller, thread_id: UUID, *, lock: bool = False
) -> ThreadAccess:
    """The thread and the caller's role in it; NOT_FOUND unless it participates (or
    is trusted). `lock`: hold the thread row FOR UPDATE (inside a transaction)."""
    if lock:
        record = await conn.fetchrow(LOCK_THREAD, thread_id)
        role = (
            None
            if record is None or caller.user_id is None
            else await conn.fetchval(ROLE, thread_id, caller.user_id)
        )
    else:
        record = await conn.fetchrow(THREAD_AND_ROLE, thread_id, caller.user_id)
        role = None if record is None else record["role"]
    if record is None or (caller.user_id is not None and role is None):
        raise NotFound("thread", str(thread_id))
    return ThreadAccess(
        thread=thread_row(record), caller=caller, role=None if role is None else Role(role)
    )
