"""chat_client.send_message and ChatError against a real messages service: a send is
stored once whatever is retried, and refusals decode to ErrorReason and fields."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import pytest
from chat.v1 import errors_pb2, messages_pb2, messages_pb2_grpc

from chat_client import ChatError, as_user, send_message
from tests.chat_client.conftest import WAIT_S
from tests.factories import Room, new_room


@pytest.fixture
async def room(db_pool: asyncpg.Pool) -> Room:
    return await new_room(db_pool)


def request(
    room: Room, text: str = "hello", request_id: str = ""
) -> messages_pb2.SendMessageRequest:
    return messages_pb2.SendMessageRequest(
        thread_id=room.thread_id, user_id=room.owner, content=text, request_id=request_id
    )


async def stored(db: asyncpg.Pool, room: Room) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT id::text, request_id::text FROM messages WHERE thread_id = $1::text::uuid",
        room.thread_id,
    )


async def test_a_send_without_request_id_gets_one(
    client: grpc.aio.Channel, db_pool: asyncpg.Pool, room: Room
) -> None:
    sent = await send_message(client, request(room), metadata=as_user(room.owner))
    [row] = await stored(db_pool, room)
    assert row["id"] == sent.id and uuid.UUID(row["request_id"])


async def test_a_send_whose_reply_was_lost_returns_the_original(
    client: grpc.aio.Channel, db_pool: asyncpg.Pool, room: Room
) -> None:
    request_id = str(uuid.uuid4())
    # The first attempt commits, but its caller never learns it (the reply is dropped).
    stub = messages_pb2_grpc.MessagesServiceStub(client)
    await stub.SendMessage(request(room, request_id=request_id), metadata=as_user(room.owner))
    again = await send_message(
        client, request(room, request_id=request_id), metadata=as_user(room.owner)
    )
    once_more = await send_message(
        client, request(room, request_id=request_id), metadata=as_user(room.owner)
    )
    rows = await stored(db_pool, room)
    assert [(r["id"], r["request_id"]) for r in rows] == [(again.id, request_id)]
    assert once_more.id == again.id


async def test_a_send_that_timed_out_on_a_locked_thread_is_retried_and_stored_once(
    client: grpc.aio.Channel, db_pool: asyncpg.Pool, room: Room
) -> None:
    retried: list[ChatError] = []
    first_failed = asyncio.Event()

    def on_retry(error: ChatError, _delay: float) -> None:
        retried.append(error)
        first_failed.set()

    async with db_pool.acquire() as conn, conn.transaction():
        # An operator's session holds the thread row: the send waits for it.
        await conn.execute(
            "SELECT 1 FROM threads WHERE id = $1::text::uuid FOR UPDATE", room.thread_id
        )
        sending = asyncio.create_task(
            send_message(
                client,
                request(room),
                metadata=as_user(room.owner),
                attempt_timeout_s=0.5,  # shorter than DB_LOCK_TIMEOUT: the call's own deadline
                on_retry=on_retry,
            )
        )
        await asyncio.wait_for(first_failed.wait(), WAIT_S)
    sent = await asyncio.wait_for(sending, WAIT_S)
    assert retried and retried[0].code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [r["id"] for r in await stored(db_pool, room)] == [sent.id]


async def test_a_reused_request_id_is_refused_and_not_retried(
    client: grpc.aio.Channel, db_pool: asyncpg.Pool, room: Room
) -> None:
    request_id = str(uuid.uuid4())
    first = await send_message(
        client, request(room, "one", request_id), metadata=as_user(room.owner)
    )
    retried: list[ChatError] = []
    with pytest.raises(ChatError) as caught:
        await send_message(
            client,
            request(room, "another", request_id),
            metadata=as_user(room.owner),
            on_retry=lambda error, _delay: retried.append(error),
        )
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == errors_pb2.ERROR_REASON_REQUEST_ID_REUSED
    assert error.reason_name == "REQUEST_ID_REUSED"
    assert error.fields == {"request_id"}
    assert retried == []
    assert [r["id"] for r in await stored(db_pool, room)] == [first.id]


async def test_invalid_argument_names_every_offending_field(
    client: grpc.aio.Channel, db_pool: asyncpg.Pool, room: Room
) -> None:
    bad = request(room, "   ")
    bad.attachments.add(url="ftp://files.example.com/a", type="text/plain", name="a.txt")
    with pytest.raises(ChatError) as caught:
        await send_message(client, bad, metadata=as_user(room.owner))
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == errors_pb2.ERROR_REASON_INVALID_ARGUMENT
    assert error.fields == {"content", "attachments[0].url"}
    assert all(v.description for v in error.field_violations)
    assert error.retry_delay_s is None and error.resource is None
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)
    assert await stored(db_pool, room) == []


async def test_not_found_names_the_resource(client: grpc.aio.Channel, room: Room) -> None:
    missing = str(uuid.uuid4())
    stub = messages_pb2_grpc.MessagesServiceStub(client)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetMessage(
            messages_pb2.GetMessageRequest(id=missing), metadata=as_user(room.member)
        )
    error = ChatError.from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == errors_pb2.ERROR_REASON_NOT_FOUND
    assert error.resource is not None and error.resource.resource_name == missing
    assert error.field_violations == ()
    assert "NOT_FOUND" in str(error)
