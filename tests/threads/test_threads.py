"""chat.v1.ThreadsService: threads, participants, roles, direct threads."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import TYPE_CHECKING

import asyncpg
import grpc
from chat.v1 import threads_pb2
from google.protobuf import field_mask_pb2

from tests.rpc_errors import as_user, error_of, violated_fields
from tests.threads.conftest import new_users

if TYPE_CHECKING:
    from tests.threads.conftest import Stub

OWNER = threads_pb2.PARTICIPANT_ROLE_OWNER
ADMIN = threads_pb2.PARTICIPANT_ROLE_ADMIN
MEMBER = threads_pb2.PARTICIPANT_ROLE_MEMBER


async def group(threads: Stub, creator: str, *others: str, name: str = "team") -> str:
    reply = await threads.CreateThread(
        threads_pb2.CreateThreadRequest(name=name, creator_id=creator, participant_ids=others)
    )
    return reply.thread.id


async def counts(db: asyncpg.Pool) -> tuple[int, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM threads) AS t, "
        "(SELECT count(*) FROM thread_participants) AS p"
    )
    assert row is not None
    return row["t"], row["p"]


async def test_create_group_roles_and_visibility(threads: Stub, db_pool: asyncpg.Pool) -> None:
    owner, a, b, outsider = await new_users(db_pool, 4)
    reply = await threads.CreateThread(
        threads_pb2.CreateThreadRequest(
            name="launch", creator_id=owner, participant_ids=[a, b, a, owner]
        ),
        metadata=as_user(owner),
    )
    assert reply.thread.name == "launch" and not reply.thread.is_direct
    roles = {p.user_id: p.role for p in reply.participants}
    assert roles == {owner: OWNER, a: MEMBER, b: MEMBER}

    got = await threads.GetThread(
        threads_pb2.GetThreadRequest(id=reply.thread.id), metadata=as_user(a)
    )
    assert got.thread == reply.thread
    for call in (
        threads.GetThread(
            threads_pb2.GetThreadRequest(id=reply.thread.id), metadata=as_user(outsider)
        ),
        threads.ListParticipants(
            threads_pb2.ListParticipantsRequest(thread_id=reply.thread.id),
            metadata=as_user(outsider),
        ),
        threads.GetThread(threads_pb2.GetThreadRequest(id=str(uuid.uuid4()))),
    ):
        assert (await error_of(call)).code() == grpc.StatusCode.NOT_FOUND


async def test_create_refusals_write_nothing(threads: Stub, db_pool: asyncpg.Pool) -> None:
    owner, other = await new_users(db_pool, 2)
    ghost = str(uuid.uuid4())
    err = await error_of(
        threads.CreateThread(
            threads_pb2.CreateThreadRequest(name="x", creator_id=owner, participant_ids=[ghost])
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND and ghost in (err.details() or "")
    err = await error_of(
        threads.CreateThread(threads_pb2.CreateThreadRequest(name="n" * 256, creator_id=owner))
    )
    assert violated_fields(err) == {"name"}
    err = await error_of(
        threads.CreateThread(
            threads_pb2.CreateThreadRequest(
                creator_id=owner, participant_ids=[str(uuid.uuid4()) for _ in range(1001)]
            )
        )
    )
    assert violated_fields(err) == {"participant_ids"}
    err = await error_of(
        threads.CreateThread(
            threads_pb2.CreateThreadRequest(creator_id=owner, participant_ids=["nope"])
        )
    )
    assert violated_fields(err) == {"participant_ids[0]"}
    err = await error_of(
        threads.CreateThread(
            threads_pb2.CreateThreadRequest(creator_id=owner), metadata=as_user(other)
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await counts(db_pool) == (0, 0)
    ok = await threads.CreateThread(
        threads_pb2.CreateThreadRequest(name="n" * 255, creator_id=owner)
    )
    assert len(ok.thread.name) == 255


async def test_direct_thread_is_one_per_pair_even_under_races(
    threads: Stub, db_pool: asyncpg.Pool
) -> None:
    ada, bob, eve = await new_users(db_pool, 3)
    replies = await asyncio.gather(
        *(
            threads.GetOrCreateDirectThread(
                threads_pb2.GetOrCreateDirectThreadRequest(
                    user_ids=[ada, bob] if i % 2 else [bob, ada]
                )
            )
            for i in range(20)
        )
    )
    assert len({r.thread.id for r in replies}) == 1
    assert sum(r.created for r in replies) == 1
    thread_id = replies[0].thread.id
    assert replies[0].thread.is_direct
    members = await db_pool.fetch(
        "SELECT user_id FROM thread_participants WHERE thread_id = $1", uuid.UUID(thread_id)
    )
    assert {str(m["user_id"]) for m in members} == {ada, bob}

    err = await error_of(
        threads.AddParticipants(
            threads_pb2.AddParticipantsRequest(thread_id=thread_id, user_ids=[eve])
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = await error_of(
        threads.RemoveParticipant(
            threads_pb2.RemoveParticipantRequest(thread_id=thread_id, user_id=ada),
            metadata=as_user(ada),
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    for user_ids in ([ada], [ada, ada], [ada, bob, eve], [ada, "bad"]):
        err = await error_of(
            threads.GetOrCreateDirectThread(
                threads_pb2.GetOrCreateDirectThreadRequest(user_ids=user_ids)
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = await error_of(
        threads.GetOrCreateDirectThread(
            threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[ada, bob]), metadata=as_user(eve)
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await counts(db_pool)) == (1, 2)


async def test_participant_management_rules(threads: Stub, db_pool: asyncpg.Pool) -> None:
    owner, admin, member, newcomer, later = await new_users(db_pool, 5)
    thread_id = await group(threads, owner, admin, member)
    await threads.UpdateParticipant(
        threads_pb2.UpdateParticipantRequest(thread_id=thread_id, user_id=admin, role=ADMIN),
        metadata=as_user(owner),
    )
    # Members cannot add; admins add members but not owners.
    err = await error_of(
        threads.AddParticipants(
            threads_pb2.AddParticipantsRequest(thread_id=thread_id, user_ids=[newcomer]),
            metadata=as_user(member),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await error_of(
        threads.AddParticipants(
            threads_pb2.AddParticipantsRequest(
                thread_id=thread_id, user_ids=[newcomer], role=OWNER
            ),
            metadata=as_user(admin),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await counts(db_pool))[1] == 3
    added = await threads.AddParticipants(
        threads_pb2.AddParticipantsRequest(thread_id=thread_id, user_ids=[newcomer, later]),
        metadata=as_user(admin),
    )
    assert {p.user_id: p.role for p in added.participants} == {newcomer: MEMBER, later: MEMBER}

    # Admins cannot remove the owner; members cannot remove others; anyone leaves.
    err = await error_of(
        threads.RemoveParticipant(
            threads_pb2.RemoveParticipantRequest(thread_id=thread_id, user_id=owner),
            metadata=as_user(admin),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await error_of(
        threads.RemoveParticipant(
            threads_pb2.RemoveParticipantRequest(thread_id=thread_id, user_id=newcomer),
            metadata=as_user(member),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    await threads.RemoveParticipant(
        threads_pb2.RemoveParticipantRequest(thread_id=thread_id, user_id=member),
        metadata=as_user(member),
    )
    await threads.RemoveParticipant(
        threads_pb2.RemoveParticipantRequest(thread_id=thread_id, user_id=later),
        metadata=as_user(admin),
    )

    # The last owner can neither leave nor step down until someone else owns it.
    for call in (
        threads.RemoveParticipant(
            threads_pb2.RemoveParticipantRequest(thread_id=thread_id, user_id=owner),
            metadata=as_user(owner),
        ),
        threads.UpdateParticipant(
            threads_pb2.UpdateParticipantRequest(thread_id=thread_id, user_id=owner, role=MEMBER),
            metadata=as_user(owner),
        ),
    ):
        err = await error_of(call)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = await error_of(
        threads.UpdateParticipant(
            threads_pb2.UpdateParticipantRequest(thread_id=thread_id, user_id=admin, role=OWNER),
            metadata=as_user(admin),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED  # only owners grant ownership
    await threads.UpdateParticipant(
        threads_pb2.UpdateParticipantRequest(thread_id=thread_id, user_id=admin, role=OWNER),
        metadata=as_user(owner),
    )
    await threads.RemoveParticipant(
        threads_pb2.RemoveParticipantRequest(thread_id=thread_id, user_id=owner),
        metadata=as_user(owner),
    )
    listed = await threads.ListParticipants(
        threads_pb2.ListParticipantsRequest(thread_id=thread_id, page_size=1),
        metadata=as_user(admin),
    )
    everyone = list(listed.participants)
    token = listed.next_page_token
    while token:
        page = await threads.ListParticipants(
            threads_pb2.ListParticipantsRequest(thread_id=thread_id, page_size=1, page_token=token),
            metadata=as_user(admin),
        )
        everyone += page.participants
        token = page.next_page_token
    assert {p.user_id: p.role for p in everyone} == {admin: OWNER, newcomer: MEMBER}
    err = await error_of(
        threads.UpdateParticipant(
            threads_pb2.UpdateParticipantRequest(
                thread_id=thread_id,
                user_id=admin,
                role=99,  # type: ignore[arg-type]  # an unknown enum value
            ),
        )
    )
    assert violated_fields(err) == {"role"}


async def test_update_archive_and_delete(threads: Stub, db_pool: asyncpg.Pool) -> None:
    owner, member = await new_users(db_pool, 2)
    thread_id = await group(threads, owner, member)
    err = await error_of(
        threads.UpdateThread(
            threads_pb2.UpdateThreadRequest(
                thread=threads_pb2.Thread(id=thread_id, name="renamed"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            metadata=as_user(member),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    renamed = await threads.UpdateThread(
        threads_pb2.UpdateThreadRequest(
            thread=threads_pb2.Thread(id=thread_id, name="renamed", is_archived=True),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        metadata=as_user(owner),
    )
    assert renamed.thread.name == "renamed" and not renamed.thread.is_archived
    archived = await threads.UpdateThread(
        threads_pb2.UpdateThreadRequest(
            thread=threads_pb2.Thread(id=thread_id, is_archived=True),
            update_mask=field_mask_pb2.FieldMask(paths=["is_archived"]),
        )
    )
    assert archived.thread.is_archived and archived.thread.name == "renamed"

    err = await error_of(
        threads.DeleteThread(
            threads_pb2.DeleteThreadRequest(id=thread_id), metadata=as_user(member)
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    await threads.DeleteThread(
        threads_pb2.DeleteThreadRequest(id=thread_id), metadata=as_user(owner)
    )
    assert await counts(db_pool) == (0, 0)


async def test_membership_changes_are_announced(
    threads: Stub, db_pool: asyncpg.Pool, database_url: str
) -> None:
    owner, member = await new_users(db_pool, 2)
    thread_id = await group(threads, owner, member)
    listener = await asyncpg.connect(database_url)
    received: asyncio.Queue[dict[str, str | None]] = asyncio.Queue()
    await listener.add_listener(
        "chat_membership", lambda *args: received.put_nowait(json.loads(args[3]))
    )
    try:
        await threads.RemoveParticipant(
            threads_pb2.RemoveParticipantRequest(thread_id=thread_id, user_id=member),
            metadata=as_user(owner),
        )
        assert await asyncio.wait_for(received.get(), 10) == {
            "thread_id": thread_id,
            "user_id": member,
        }
        await threads.DeleteThread(threads_pb2.DeleteThreadRequest(id=thread_id))
        assert await asyncio.wait_for(received.get(), 10) == {
            "thread_id": thread_id,
            "user_id": None,
        }
    finally:
        await listener.close()
