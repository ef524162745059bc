"""request_id means one request (AIP-155): a retry must repeat the original exactly.

A used request_id with anything else (another thread, content, parent, metadata
or attachments) is INVALID_ARGUMENT naming request_id (reason REQUEST_ID_REUSED)
and writes nothing; a sender who left the thread gets the thread's refusal, never
the stored message.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from chat.v1 import messages_pb2
from google.protobuf import struct_pb2

from tests.messages.conftest import Room, new_room
from tests.rpc_errors import as_user, error_info, error_of, violated_fields

if TYPE_CHECKING:
    from tests.messages.conftest import Stub


def _request(room: Room, request_id: str, **fields: Any) -> messages_pb2.SendMessageRequest:
    base: dict[str, Any] = {"thread_id": room.thread_id, "user_id": room.member, "content": "hi"}
    base.update(fields)
    return messages_pb2.SendMessageRequest(request_id=request_id, **base)


async def _send(messages: Stub, request: messages_pb2.SendMessageRequest) -> messages_pb2.Message:
    reply = await messages.SendMessage(request, metadata=as_user(request.user_id))
    return reply.message


async def _state(db: asyncpg.Pool) -> tuple[int, int, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM message_attachments), "
        "(SELECT coalesce(sum(last_seq), 0) FROM threads)"
    )
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def _meta(**values: Any) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(values)
    return value


def _attachment(name: str) -> messages_pb2.Attachment:
    return messages_pb2.Attachment(url=f"https://x.io/{name}", type="image/png", name=name, size=5)


async def _assert_reused(messages: Stub, request: messages_pb2.SendMessageRequest) -> None:
    err = await error_of(messages.SendMessage(request, metadata=as_user(request.user_id)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert violated_fields(err) == {"request_id"}
    assert error_info(err).reason == "REQUEST_ID_REUSED"


async def test_a_retry_must_repeat_the_original_request(
    messages: Stub, room: Room, db_pool: asyncpg.Pool
) -> None:
    parent = await _send(messages, _request(room, str(uuid.uuid4()), content="parent"))
    rid = str(uuid.uuid4())
    original = _request(
        room,
        rid,
        content="original",
        parent_id=parent.id,
        metadata=_meta(kind="photo", n=1),
        attachments=[_attachment("a.png")],
    )
    sent = await _send(messages, original)
    before = await _state(db_pool)

    # The same request, however often: the original, nothing written.
    for _ in range(3):
        assert (await _send(messages, original)).id == sent.id
    # Metadata keys in another order are the same request.
    reordered = _request(
        room,
        rid,
        content="original",
        parent_id=parent.id,
        metadata=_meta(n=1, kind="photo"),
        attachments=[_attachment("a.png")],
    )
    assert (await _send(messages, reordered)).id == sent.id

    variants: dict[str, dict[str, Any]] = {
        "content": {"content": "changed"},
        "parent": {"parent_id": ""},
        "metadata": {"metadata": _meta(kind="photo", n=2)},
        "no metadata": {"metadata": None},
        "attachments": {"attachments": [_attachment("b.png")]},
        "more attachments": {"attachments": [_attachment("a.png"), _attachment("b.png")]},
        "no attachments": {"attachments": []},
    }
    for name, change in variants.items():
        fields: dict[str, Any] = {
            "content": "original",
            "parent_id": parent.id,
            "metadata": _meta(kind="photo", n=1),
            "attachments": [_attachment("a.png")],
        }
        fields.update(change)
        fields = {k: v for k, v in fields.items() if v is not None}
        await _assert_reused(messages, _request(room, rid, **fields))
        assert await _state(db_pool) == before, name


async def test_a_request_id_reused_in_another_thread_is_refused(
    messages: Stub, room: Room, db_pool: asyncpg.Pool
) -> None:
    other = await new_room(db_pool)
    # The member of `room` joins the other thread too.
    await db_pool.execute(
        "INSERT INTO thread_participants (thread_id, user_id, role) VALUES ($1, $2, 'member')",
        uuid.UUID(other.thread_id),
        uuid.UUID(room.member),
    )
    rid = str(uuid.uuid4())
    await _send(messages, _request(room, rid, content="in A"))
    before = await _state(db_pool)
    elsewhere = _request(room, rid, content="in A", thread_id=other.thread_id)
    await _assert_reused(messages, elsewhere)
    assert await _state(db_pool) == before


async def test_after_leaving_a_retry_reads_nothing_of_the_thread(
    messages: Stub, room: Room, db_pool: asyncpg.Pool
) -> None:
    other = await new_room(db_pool)
    await db_pool.execute(
        "INSERT INTO thread_participants (thread_id, user_id, role) VALUES ($1, $2, 'member')",
        uuid.UUID(other.thread_id),
        uuid.UUID(room.member),
    )
    rid = str(uuid.uuid4())
    request = _request(room, rid, content="secret plan")
    await _send(messages, request)
    await db_pool.execute(
        "DELETE FROM thread_participants WHERE thread_id = $1 AND user_id = $2",
        uuid.UUID(room.thread_id),
        uuid.UUID(room.member),
    )
    before = await _state(db_pool)
    # The exact retry: the thread is not visible to them any more.
    err = await error_of(messages.SendMessage(request, metadata=as_user(room.member)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "secret" not in (err.details() or "")
    # Through a thread they still belong to: refused, and the error carries nothing
    # of the original.
    err = await error_of(
        messages.SendMessage(
            _request(room, rid, content="secret plan", thread_id=other.thread_id),
            metadata=as_user(room.member),
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "secret" not in (err.details() or "") and room.thread_id not in (err.details() or "")
    assert await _state(db_pool) == before


@pytest.mark.parametrize("trial", range(20))
async def test_racing_sends_in_two_threads_with_one_request_id(
    messages: Stub, room: Room, db_pool: asyncpg.Pool, trial: int
) -> None:
    """Two threads lock different rows, so the unique index decides: one is stored,
    the other is refused as reused; never two messages, never INTERNAL."""
    other = await new_room(db_pool)
    await db_pool.execute(
        "INSERT INTO thread_participants (thread_id, user_id, role) VALUES ($1, $2, 'member')",
        uuid.UUID(other.thread_id),
        uuid.UUID(room.member),
    )
    rid = str(uuid.uuid4())
    calls = [
        messages.SendMessage(
            _request(room, rid, content="x", thread_id=thread), metadata=as_user(room.member)
        )
        for thread in (room.thread_id, other.thread_id)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    ok = [o for o in outcomes if isinstance(o, messages_pb2.SendMessageResponse)]
    failed = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(failed) == 1, outcomes
    assert failed[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(failed[0]).reason == "REQUEST_ID_REUSED"
    stored = await db_pool.fetchval(
        "SELECT count(*) FROM messages WHERE request_id = $1", uuid.UUID(rid)
    )
    assert stored == 1


async def test_a_message_stored_before_digests_is_matched_by_thread(
    messages: Stub, room: Room, db_pool: asyncpg.Pool
) -> None:
    """Rows from before migration 0010 have no digest: a retry naming the same thread
    gets the original, another thread is refused."""
    rid = str(uuid.uuid4())
    sent = await _send(messages, _request(room, rid, content="old"))
    await db_pool.execute(
        "UPDATE messages SET request_digest = NULL WHERE id = $1", uuid.UUID(sent.id)
    )
    assert (await _send(messages, _request(room, rid, content="old"))).id == sent.id
    other = await new_room(db_pool)
    await db_pool.execute(
        "INSERT INTO thread_participants (thread_id, user_id, role) VALUES ($1, $2, 'member')",
        uuid.UUID(other.thread_id),
        uuid.UUID(room.member),
    )
    await _assert_reused(messages, _request(room, rid, content="old", thread_id=other.thread_id))
