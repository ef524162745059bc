"""User streams under the races the adversarial review found (docs/reliability.md):
a device closing while another opens, database failures while streams start or a
deactivation is re-checked, cancels during a start, retention pruning past a
lagging process, and typing on a stream resumed ahead of its process. Locks on
tables widen each window so every run hits it; the unlocked variants repeat."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from chat.v1 import threads_pb2, threads_pb2_grpc, users_pb2, users_pb2_grpc
from google.protobuf import field_mask_pb2

from services.common.settings import ServiceSettings
from services.messages.service import DEFINITION as MESSAGES
from services.messages.streams import StreamHub
from services.messages.streams.users import UserStreams
from services.messages.user_view import encode_cursor
from tests.conftest import running
from tests.factories import new_group, new_users, send
from tests.messages.test_user_stream import WAIT_S, Follower, as_user, kind, sequenced
from tests.rpc_errors import error_info


@pytest.fixture
async def messages_service(
    service_settings: ServiceSettings,
) -> AsyncIterator[tuple[UserStreams, grpc.aio.Channel]]:
    async with running(MESSAGES, service_settings) as (service, channel):
        hub = service.runtime.extras["hub"]
        assert isinstance(hub, StreamHub)
        yield hub.users, channel


async def locked(db: asyncpg.Pool, table: str) -> tuple[Any, Any]:
    """A transaction holding `table` in ACCESS EXCLUSIVE mode (roll it back to end)."""
    conn = await db.acquire()
    tx = conn.transaction()
    await tx.start()
    await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")  # test-only, fixed names
    return conn, tx


async def release(db: asyncpg.Pool, held: tuple[Any, Any]) -> None:
    conn, tx = held
    await tx.rollback()
    await db.release(conn)


async def ended_with(follower: Follower) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(follower.task, WAIT_S)
    return caught.value


async def test_a_device_opening_while_another_closes_is_started(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool
) -> None:
    alice = (await new_users(db_pool, 1))[0]
    first = Follower(channels["messages"], alice)
    await first.caught_up()
    held = await locked(db_pool, "users")  # the start's reads wait here
    second = Follower(channels["messages"], alice)
    await asyncio.sleep(0.3)  # let the follower begin reading (widens the window only)
    first.close()
    await release(db_pool, held)
    await second.caught_up()
    second.close()
    # Without a lock: many tries at random moments.
    for _ in range(100):
        first = Follower(channels["messages"], alice)
        await first.caught_up()
        second = Follower(channels["messages"], alice)
        await asyncio.sleep(random.random() * 0.004)
        first.close()
        await second.caught_up()
        second.close()


async def test_streams_starting_during_a_database_failure_start_afterwards(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool
) -> None:
    alice = (await new_users(db_pool, 1))[0]
    held = await locked(db_pool, "users")
    stream = Follower(channels["messages"], alice)
    # Past DB_LOCK_TIMEOUT and DB_STATEMENT_TIMEOUT: the start's reads fail.
    await asyncio.sleep(6.5)
    await release(db_pool, held)
    await stream.caught_up()  # retried, not dropped
    stream.close()


async def test_a_deactivation_whose_recheck_fails_still_ends_the_stream(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool
) -> None:
    threads = threads_pb2_grpc.ThreadsServiceStub(channels["threads"])
    alice, bob = await new_users(db_pool, 2)
    await threads.CreateThread(
        threads_pb2.CreateThreadRequest(creator_id=bob, participant_ids=[alice])
    )
    await sequenced(db_pool)
    stream = Follower(channels["messages"], alice)
    await stream.caught_up()
    deactivate = await db_pool.acquire()
    tx = deactivate.transaction()
    await tx.start()
    await deactivate.execute("UPDATE users SET is_active = false WHERE id = $1", uuid.UUID(alice))
    await deactivate.execute("SELECT chat_notify_membership(NULL, $1)", uuid.UUID(alice))
    # A lock queued behind the deactivation: the re-check's read fails on it.
    holder = await db_pool.acquire()
    lock_tx = holder.transaction()
    await lock_tx.start()
    lock = asyncio.create_task(holder.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE"))
    await asyncio.sleep(0.3)
    await tx.commit()
    await db_pool.release(deactivate)
    await lock
    await asyncio.sleep(6.5)
    await lock_tx.rollback()
    await db_pool.release(holder)
    err = await ended_with(stream)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(err).reason == "USER_INACTIVE"


async def test_streams_cancelled_while_starting_leave_nothing_behind(
    messages_service: tuple[UserStreams, grpc.aio.Channel], db_pool: asyncpg.Pool
) -> None:
    users, channel = messages_service
    alice, bob = await new_users(db_pool, 2)
    for _ in range(3):
        held = await locked(db_pool, "users")
        stream = Follower(channel, alice)
        await asyncio.sleep(0.3)
        stream.close()
        await asyncio.sleep(0.2)
        await release(db_pool, held)
    for _ in range(200):
        stream = Follower(channel, bob)
        await asyncio.sleep(random.random() * 0.003)
        stream.close()
    # A stream opened last, then closed, lets the follower settle the rest.
    last = Follower(channel, bob)
    await last.caught_up()
    last.close()
    for _ in range(500):  # until the server has seen every cancel
        if users.open_count == 0:
            break
        await asyncio.sleep(0.01)
    assert users.open_count == 0
    assert uuid.UUID(alice) not in users._subs and uuid.UUID(bob) not in users._subs
    assert users._local == {} and users._threads_of == {}


@pytest.mark.parametrize("removed", [False, True])
async def test_pruning_past_a_lagging_process_expires_its_streams(
    messages_service: tuple[UserStreams, grpc.aio.Channel],
    db_pool: asyncpg.Pool,
    removed: bool,
) -> None:
    _, channel = messages_service
    alice, bob = await new_users(db_pool, 2)
    stream = Follower(channel, alice)
    await stream.caught_up()
    thread = uuid.UUID(await new_group(db_pool, bob, alice))
    assert kind(await stream.next_kind("participant_added")) == "thread_joined"
    held = await locked(db_pool, "messages")  # the process's log reads wait here
    if removed:
        await db_pool.execute(
            "DELETE FROM thread_participants WHERE thread_id = $1 AND user_id = $2",
            thread,
            uuid.UUID(alice),
        )
    else:
        await db_pool.execute("UPDATE threads SET name = 'renamed' WHERE id = $1", thread)
    await db_pool.execute("SELECT chat_sequence_events(1000)")
    await db_pool.execute("SELECT chat_prune_events('0 seconds', 100000)")
    await release(db_pool, held)
    await send(db_pool, str(thread), bob, "after the pruned events")
    err = await ended_with(stream)  # never a silent gap, never the later message
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err).reason == "CURSOR_EXPIRED"
    assert stream.events.empty()


async def test_typing_is_not_shown_from_a_view_older_than_the_resume_point(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool
) -> None:
    threads = threads_pb2_grpc.ThreadsServiceStub(channels["threads"])
    alice, bob, carol = await new_users(db_pool, 3)
    created = await threads.CreateThread(
        threads_pb2.CreateThreadRequest(creator_id=bob, participant_ids=[alice])
    )
    other = Follower(channels["messages"], carol)  # the process follows the log
    await other.caught_up()
    await sequenced(db_pool)
    held = await locked(db_pool, "messages")  # the process falls behind
    await threads.RemoveParticipant(
        threads_pb2.RemoveParticipantRequest(thread_id=created.thread.id, user_id=alice),
        metadata=as_user(alice),
    )
    await sequenced(db_pool)
    left = await db_pool.fetchval(
        "SELECT position FROM thread_events WHERE kind = 'participant_left' AND user_id = $1",
        uuid.UUID(alice),
    )
    stream = Follower(channels["messages"], alice, after=encode_cursor(left))
    await stream.caught_up()
    await threads.SendTyping(
        threads_pb2.SendTypingRequest(thread_id=created.thread.id, user_id=bob),
        metadata=as_user(bob),
    )
    await release(db_pool, held)
    # A sentinel: the next event alice sees is her new thread, not bob's typing.
    direct = await threads.GetOrCreateDirectThread(
        threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[alice, carol])
    )
    event = await stream.next()
    assert kind(event) == "thread_joined" and event.thread_joined.thread.id == direct.thread.id
    stream.close()
    other.close()


async def test_a_gateway_cannot_type_for_a_deactivated_user(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool
) -> None:
    threads = threads_pb2_grpc.ThreadsServiceStub(channels["threads"])
    users = users_pb2_grpc.UsersServiceStub(channels["users"])
    alice, bob = await new_users(db_pool, 2)
    created = await threads.CreateThread(
        threads_pb2.CreateThreadRequest(creator_id=bob, participant_ids=[alice])
    )
    await users.UpdateUser(
        users_pb2.UpdateUserRequest(
            user=users_pb2.User(id=alice, is_active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["is_active"]),
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await threads.SendTyping(
            threads_pb2.SendTypingRequest(thread_id=created.thread.id, user_id=alice)
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "USER_INACTIVE"


async def test_a_backlog_reaches_a_reading_user_stream_whole_not_cut_off(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool
) -> None:
    """600 events logged at once (one transaction): the follower delivers them in
    batches of half a buffer and lets the streams drain between them, so a user
    whose client keeps reading gets every one in order, not STREAM_BUFFER_FULL
    (the buffer holds 256)."""
    alice, bob = await new_users(db_pool, 2)
    thread = await new_group(db_pool, bob, alice)
    await sequenced(db_pool)
    stream = Follower(channels["messages"], alice)
    await stream.caught_up()
    ids = [
        str(r["id"])
        for r in await db_pool.fetch(
            "SELECT s.id FROM generate_series(1, 600) g, LATERAL chat_send_message("
            "$1, $2, 'backlog ' || g, NULL, NULL, NULL, '[]'::jsonb) s ORDER BY s.seq",
            uuid.UUID(thread),
            uuid.UUID(bob),
        )
    ]
    got = [(await stream.next()).message_created.id for _ in ids]
    assert got == ids
    stream.close()
