"""No ownerless group thread: a last owner's deletion or deactivation hands ownership on.

The rule (migration 0011): the remaining participant who is active, an admin
rather than a member, and the longest in the thread becomes owner; an inactive
one only when the group would otherwise have no owner at all.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from chat.v1 import threads_pb2, threads_pb2_grpc, users_pb2, users_pb2_grpc
from google.protobuf import field_mask_pb2

from services.common.settings import ServiceSettings
from services.users.service import DEFINITION as USERS
from tests.conftest import running
from tests.rpc_errors import as_user
from tests.threads.conftest import new_users

if TYPE_CHECKING:
    Threads = threads_pb2_grpc.ThreadsServiceAsyncStub
    Users = users_pb2_grpc.UsersServiceAsyncStub


@pytest.fixture
async def users(service_settings: ServiceSettings) -> AsyncIterator[Users]:
    async with running(USERS, service_settings) as (_, channel):
        yield users_pb2_grpc.UsersServiceStub(channel)


async def group(db: asyncpg.Pool, members: dict[str, str]) -> str:
    """A group whose members joined a minute apart, in the order given."""
    thread = await db.fetchval("INSERT INTO threads (name) VALUES ('g') RETURNING id")
    start = datetime.now(UTC) - timedelta(hours=1)
    for i, (user, role) in enumerate(members.items()):
        await db.execute(
            "INSERT INTO thread_participants (thread_id, user_id, role, created_at) "
            "VALUES ($1, $2, $3, $4)",
            thread,
            uuid.UUID(user),
            role,
            start + timedelta(minutes=i),
        )
    return str(thread)


async def roles(db: asyncpg.Pool, thread: str) -> dict[str, str]:
    rows = await db.fetch(
        "SELECT user_id, role FROM thread_participants WHERE thread_id = $1", uuid.UUID(thread)
    )
    return {str(r["user_id"]): r["role"] for r in rows}


async def deactivate(users: Users, user: str) -> None:
    await users.UpdateUser(
        users_pb2.UpdateUserRequest(
            user=users_pb2.User(id=user, is_active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["is_active"]),
        )
    )


async def delete(users: Users, user: str) -> None:
    await users.DeleteUser(users_pb2.DeleteUserRequest(id=user), metadata=as_user(user))


async def test_deleting_the_last_owner_makes_the_senior_admin_owner(
    users: Users, threads: Threads, db_pool: asyncpg.Pool
) -> None:
    owner, early_member, admin, late_admin = await new_users(db_pool, 4)
    thread = await group(
        db_pool,
        {owner: "owner", early_member: "member", admin: "admin", late_admin: "admin"},
    )
    await delete(users, owner)
    assert await roles(db_pool, thread) == {
        early_member: "member",
        admin: "owner",
        late_admin: "admin",
    }
    # The new owner manages the thread: renames it and can make others owners.
    await threads.UpdateThread(
        threads_pb2.UpdateThreadRequest(
            thread=threads_pb2.Thread(id=thread, name="renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        metadata=as_user(admin),
    )
    await threads.UpdateParticipant(
        threads_pb2.UpdateParticipantRequest(
            thread_id=thread, user_id=early_member, role=threads_pb2.PARTICIPANT_ROLE_OWNER
        ),
        metadata=as_user(admin),
    )


async def test_deactivating_the_last_owner_prefers_active_then_seniority(
    users: Users, db_pool: asyncpg.Pool
) -> None:
    owner, inactive_admin, first, second = await new_users(db_pool, 4)
    await db_pool.execute(
        "UPDATE users SET is_active = false WHERE id = $1", uuid.UUID(inactive_admin)
    )
    thread = await group(
        db_pool, {owner: "owner", inactive_admin: "admin", first: "member", second: "member"}
    )
    await deactivate(users, owner)
    assert await roles(db_pool, thread) == {
        owner: "owner",
        inactive_admin: "admin",
        first: "owner",
        second: "member",
    }


async def test_another_active_owner_means_no_change(users: Users, db_pool: asyncpg.Pool) -> None:
    owner, co_owner, member = await new_users(db_pool, 3)
    thread = await group(db_pool, {owner: "owner", co_owner: "owner", member: "member"})
    await delete(users, owner)
    assert await roles(db_pool, thread) == {co_owner: "owner", member: "member"}


async def test_only_inactive_members_left_one_of_them_is_promoted(
    users: Users, db_pool: asyncpg.Pool
) -> None:
    owner, sleeper, later_sleeper = await new_users(db_pool, 3)
    await db_pool.execute(
        "UPDATE users SET is_active = false WHERE id = ANY($1::uuid[])",
        [uuid.UUID(sleeper), uuid.UUID(later_sleeper)],
    )
    thread = await group(db_pool, {owner: "owner", sleeper: "member", later_sleeper: "member"})
    await delete(users, owner)
    assert await roles(db_pool, thread) == {sleeper: "owner", later_sleeper: "member"}
    # With an (inactive) owner left, deactivating nobody else changes nothing more.
    await users.UpdateUser(
        users_pb2.UpdateUserRequest(
            user=users_pb2.User(id=later_sleeper, is_active=True),
            update_mask=field_mask_pb2.FieldMask(paths=["is_active"]),
        )
    )
    assert (await roles(db_pool, thread))[later_sleeper] == "member"


async def test_a_group_owned_by_its_only_member_just_empties(
    users: Users, db_pool: asyncpg.Pool
) -> None:
    (owner,) = await new_users(db_pool, 1)
    thread = await group(db_pool, {owner: "owner"})
    await delete(users, owner)
    assert await roles(db_pool, thread) == {}


async def test_direct_threads_are_left_alone(users: Users, db_pool: asyncpg.Pool) -> None:
    ada, bob = await new_users(db_pool, 2)
    thread = await db_pool.fetchval(
        "INSERT INTO threads (is_direct, direct_key) VALUES (true, $1) RETURNING id",
        ":".join(sorted([ada, bob])),
    )
    await db_pool.execute(
        "INSERT INTO thread_participants (thread_id, user_id) VALUES ($1, $2), ($1, $3)",
        thread,
        uuid.UUID(ada),
        uuid.UUID(bob),
    )
    await deactivate(users, ada)
    assert set((await roles(db_pool, str(thread))).values()) == {"member"}


@pytest.mark.parametrize("how", ["deactivate", "delete", "mixed"])
async def test_two_owners_leaving_at_once_leave_an_owner(
    users: Users, db_pool: asyncpg.Pool, how: str
) -> None:
    """Each leaving owner sees the other as the remaining owner unless the rule runs
    under the thread's lock, serialised: 30 rounds per kind of departure."""
    for _ in range(30):
        first, second, member, other = await new_users(db_pool, 4)
        thread = await group(
            db_pool, {first: "owner", second: "owner", member: "member", other: "member"}
        )
        leave = {
            "deactivate": (deactivate, deactivate),
            "delete": (delete, delete),
            "mixed": (deactivate, delete),
        }[how]
        await asyncio.gather(leave[0](users, first), leave[1](users, second))
        active_owners = await db_pool.fetchval(
            "SELECT count(*) FROM thread_participants p JOIN users u ON u.id = p.user_id "
            "WHERE p.thread_id = $1 AND p.role = 'owner' AND u.is_active",
            uuid.UUID(thread),
        )
        assert active_owners == 1
        assert (await roles(db_pool, thread))[member] == "owner"


async def test_an_end_user_cannot_deactivate_someone_else_to_take_over(
    users: Users, db_pool: asyncpg.Pool
) -> None:
    owner, member = await new_users(db_pool, 2)
    thread = await group(db_pool, {owner: "owner", member: "member"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.UpdateUser(
            users_pb2.UpdateUserRequest(
                user=users_pb2.User(id=owner, is_active=False),
                update_mask=field_mask_pb2.FieldMask(paths=["is_active"]),
            ),
            metadata=as_user(member),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await roles(db_pool, thread) == {owner: "owner", member: "member"}


async def test_an_active_user_joining_a_group_of_inactive_owners_becomes_owner(
    threads: Threads, db_pool: asyncpg.Pool
) -> None:
    """Owners deactivated before the rule existed (or all members gone inactive): the
    first active user added is the one who can manage the group."""
    owner, newcomer = await new_users(db_pool, 2)
    thread = await group(db_pool, {owner: "owner"})
    await db_pool.execute("UPDATE users SET is_active = false WHERE id = $1", uuid.UUID(owner))
    await threads.AddParticipants(
        threads_pb2.AddParticipantsRequest(thread_id=thread, user_ids=[newcomer])
    )
    assert await roles(db_pool, thread) == {owner: "owner", newcomer: "owner"}
    # With an active owner in place, a newcomer joins as what they were added as.
    (later,) = await new_users(db_pool, 1)
    await threads.AddParticipants(
        threads_pb2.AddParticipantsRequest(thread_id=thread, user_ids=[later])
    )
    assert (await roles(db_pool, thread))[later] == "member"
