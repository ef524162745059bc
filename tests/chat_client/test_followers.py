"""chat_client's stream followers against real services: a restart of the messages
service mid-stream loses and repeats nothing; refusals are raised, not retried."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import grpc
import pytest
from chat.v1 import errors_pb2, messages_pb2, users_pb2, users_pb2_grpc
from google.protobuf import field_mask_pb2

import chat_client
from chat_client import as_user, follow_thread, follow_user, send_message
from services.common.settings import ServiceSettings
from services.messages.service import DEFINITION as MESSAGES
from tests.chat_client.conftest import WAIT_S, Reader, RestartableMessages
from tests.conftest import running
from tests.factories import new_group, new_room, new_user, send


def message(thread_id: str, user_id: str, text: str) -> messages_pb2.SendMessageRequest:
    return messages_pb2.SendMessageRequest(thread_id=thread_id, user_id=user_id, content=text)


async def test_both_followers_deliver_every_message_once_in_order_across_a_restart(
    messages_service: RestartableMessages, client: grpc.aio.Channel, db_pool: asyncpg.Pool
) -> None:
    room = await new_room(db_pool)
    viewer = as_user(room.member)
    thread = Reader(follow_thread(client, room.thread_id, metadata=viewer)).start()
    inbox = Reader(follow_user(client, room.member, metadata=viewer)).start()
    await thread.until(lambda: bool(thread.of_kind("caught_up")))
    await inbox.until(lambda: bool(inbox.of_kind("caught_up")))

    sent: list[str] = []

    async def send_as_owner(text: str) -> str:
        msg = await send_message(
            client, message(room.thread_id, room.owner, text), metadata=as_user(room.owner)
        )
        return msg.id

    def thread_ids() -> list[str]:
        return [e.created.id for e in thread.of_kind("created")]

    def inbox_ids() -> list[str]:
        return [e.message_created.id for e in inbox.of_kind("message_created")]

    async def both_have_everything() -> None:
        await thread.until(lambda: len(thread_ids()) >= len(sent))
        await inbox.until(lambda: len(inbox_ids()) >= len(sent))

    for i in range(3):
        sent.append(await send_as_owner(f"before {i}"))
    await both_have_everything()

    await messages_service.stop()
    # Committed while no messages server runs: only a resume's replay can deliver them.
    for i in range(2):
        sent.append(await send(db_pool, room.thread_id, room.owner, f"while down {i}"))
    # A send issued while the service is down is retried until it is back.
    send_retries: list[chat_client.ChatError] = []
    down = asyncio.Event()

    def on_send_retry(error: chat_client.ChatError, _delay: float) -> None:
        send_retries.append(error)
        down.set()

    pending = asyncio.create_task(
        send_message(
            client,
            message(room.thread_id, room.owner, "across the restart"),
            metadata=as_user(room.owner),
            on_retry=on_send_retry,
        )
    )
    await asyncio.wait_for(down.wait(), WAIT_S)
    await messages_service.start()
    sent.append((await pending).id)
    for i in range(3):
        sent.append(await send_as_owner(f"after {i}"))
    await both_have_everything()

    # Exactly once each, in commit order, nothing missing around the restart.
    assert thread_ids() == sent
    assert inbox_ids() == sent
    assert {e.code for e in send_retries} == {grpc.StatusCode.UNAVAILABLE}
    readers: list[Reader[Any]] = [thread, inbox]
    for reader in readers:
        # They really lost the stream and resumed (a second caught_up after the replay).
        assert grpc.StatusCode.UNAVAILABLE in {e.code for e in reader.retries}
        assert reader.follower.reconnects >= 1
        assert len(reader.of_kind("caught_up")) >= 2
        await reader.stop()
    stored = await db_pool.fetchval(
        "SELECT count(*) FROM messages WHERE thread_id = $1",
        asyncpg.pgproto.pgproto.UUID(room.thread_id),
    )
    assert stored == len(sent)


async def test_a_full_process_is_waited_out_as_its_retry_info_says(
    database_url: str, db_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAM_MAX_OPEN", "1")  # the limit is what is under test
    settings = ServiceSettings(DATABASE_URL=database_url, GRPC_HOST="127.0.0.1", METRICS_PORT=0)
    room = await new_room(db_pool)
    async with running(MESSAGES, settings) as (service, _):
        channel = chat_client.connect(service.address)
        async with channel:
            # STREAM_MAX_OPEN counts each kind apart: two thread streams.
            first = Reader(
                follow_thread(channel, room.thread_id, metadata=as_user(room.owner))
            ).start()
            await first.until(lambda: bool(first.of_kind("caught_up")))
            second = Reader(
                follow_thread(channel, room.thread_id, metadata=as_user(room.member))
            ).start()
            await second.until(lambda: bool(second.retries))
            limit = second.retries[0]
            assert limit.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert limit.reason == errors_pb2.ERROR_REASON_STREAM_LIMIT
            assert limit.retry_delay_s is not None and limit.retry_delay_s > 0
            await first.stop()  # frees the slot: the follower gets in on a later try
            await second.until(lambda: bool(second.of_kind("caught_up")))
            sent = await send(db_pool, room.thread_id, room.owner)
            await second.until(lambda: bool(second.of_kind("created")))
            assert [e.created.id for e in second.of_kind("created")] == [sent]
            await second.stop()


async def test_refusals_are_raised_without_a_retry(
    client: grpc.aio.Channel, db_pool: asyncpg.Pool
) -> None:
    room = await new_room(db_pool)
    gone = await new_user(db_pool, active=False)
    cases: list[tuple[chat_client.Follower[Any], grpc.StatusCode]] = [
        # Not a participant: NOT_FOUND (existence does not leak).
        (
            follow_thread(client, room.thread_id, metadata=as_user(room.outsider)),
            grpc.StatusCode.NOT_FOUND,
        ),
        # Another user's stream.
        (
            follow_user(client, room.owner, metadata=as_user(room.member)),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        # A deactivated caller.
        (follow_user(client, gone, metadata=as_user(gone)), grpc.StatusCode.PERMISSION_DENIED),
        # A cursor that is no cursor.
        (
            follow_thread(client, room.thread_id, after="nope", metadata=as_user(room.member)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for follower, code in cases:
        reader = Reader(follower).start()
        error = await reader.failure()
        assert error.code == code, error
        assert reader.retries == [] and follower.reconnects == 0


async def test_a_stream_ended_by_deactivation_is_not_resumed(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool
) -> None:
    alice = await new_user(db_pool)
    stream = Reader(
        follow_user(
            channels["messages"], alice, metadata=as_user(alice), backoff=chat_client.Backoff()
        )
    ).start()
    await stream.until(lambda: bool(stream.of_kind("caught_up")))
    await users_pb2_grpc.UsersServiceStub(channels["users"]).UpdateUser(
        users_pb2.UpdateUserRequest(
            user=users_pb2.User(id=alice, is_active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["is_active"]),
        )
    )
    error = await stream.failure()
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == errors_pb2.ERROR_REASON_USER_INACTIVE
    assert stream.retries == []


async def test_an_expired_cursor_is_raised_for_the_caller_to_reload(
    client: grpc.aio.Channel, db_pool: asyncpg.Pool
) -> None:
    alice, bob = await new_user(db_pool), await new_user(db_pool)
    first = Reader(follow_user(client, alice, metadata=as_user(alice))).start()
    await first.until(lambda: bool(first.of_kind("caught_up")))
    await first.stop()
    old = first.follower.cursor
    await new_group(db_pool, alice, bob)  # an event after `old`, then prune it all
    for _ in range(400):
        if not await db_pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM thread_events WHERE position IS NULL)"
        ):
            break
        await asyncio.sleep(0.05)
    await db_pool.execute("SELECT chat_prune_events('0 seconds', 100000)")

    resumed = Reader(follow_user(client, alice, after=old, metadata=as_user(alice))).start()
    error = await resumed.failure()
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == errors_pb2.ERROR_REASON_CURSOR_EXPIRED
    assert resumed.retries == []
