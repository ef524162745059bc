"""Changes to threads and their participants, each in one transaction.

The order is the rule, the same for every change: lock what the change waits on
(the users it adds before the thread, the lock order of store.lock_users), ask
policy.py whether the caller may, then write. Every check is made under the
thread's lock, so it still holds at commit. Reads that need a permission too
(a thread's participants) are here for the same reason: one place composes
policy and store, the servicer only parses and converts.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from services.common.access import ParticipantRow, Role, ThreadRow
from services.common.identity import Caller
from services.common.types import DbConnection
from services.threads import policy, store


async def create_group(
    conn: DbConnection, name: str | None, members: dict[UUID, Role]
) -> tuple[ThreadRow, list[ParticipantRow]]:
    async with conn.transaction():
        await store.lock_users(conn, list(members))
        return await store.create_group(conn, name, members)


async def open_direct(conn: DbConnection, user_ids: Sequence[UUID]) -> tuple[ThreadRow, bool]:
    """The direct thread of two users, created unless it exists (and whether it was)."""
    async with conn.transaction():
        await store.lock_users(conn, user_ids)
        return await store.get_or_create_direct(conn, user_ids[0], user_ids[1])


async def update_thread(
    conn: DbConnection,
    caller: Caller,
    thread_id: UUID,
    *,
    name: tuple[bool, str | None],
    archived: tuple[bool, bool],
) -> ThreadRow:
    """Each field is (whether to set it, its value)."""
    async with conn.transaction():
        await policy.may_update_thread(
            conn,
            caller,
            thread_id,
            renames=name[0],
            unarchives=archived[0] and not archived[1],
        )
        return await store.update_thread(conn, thread_id, name=name, archived=archived)


async def delete_thread(conn: DbConnection, caller: Caller, thread_id: UUID) -> None:
    async with conn.transaction():
        await policy.may_delete_thread(conn, caller, thread_id)
        await store.delete_thread(conn, thread_id)


async def add_participants(
    conn: DbConnection, caller: Caller, thread_id: UUID, user_ids: list[UUID], role: Role
) -> list[ParticipantRow]:
    """The named users' memberships after the call (those already in keep their role)."""
    async with conn.transaction():
        await store.lock_users(conn, user_ids)  # before the thread: the lock order
        await policy.may_add_participants(conn, caller, thread_id, role)
        await store.add_participants(conn, thread_id, dict.fromkeys(user_ids, role))
        return await store.participants_of(conn, thread_id, user_ids)


async def remove_participant(
    conn: DbConnection, caller: Caller, thread_id: UUID, user_id: UUID
) -> None:
    async with conn.transaction():
        await policy.may_remove_participant(conn, caller, thread_id, user_id)
        await store.remove_participant(
            conn, thread_id, user_id, by_themselves=caller.is_user(user_id)
        )


async def set_role(
    conn: DbConnection, caller: Caller, thread_id: UUID, user_id: UUID, role: Role
) -> ParticipantRow:
    async with conn.transaction():
        await policy.may_set_role(conn, caller, thread_id, user_id, role)
        return await store.set_role(conn, thread_id, user_id, role)


async def participants(
    conn: DbConnection, caller: Caller, thread_id: UUID, after: UUID | None, limit: int
) -> list[ParticipantRow]:
    """A page of the thread's participants, for a caller who may read the thread."""
    await policy.readable(conn, caller, thread_id)
    return await store.list_participants(conn, thread_id, after, limit)
