"""StreamUserEvents through real gRPC: every event kind, resume from every cursor,
two replicas, retention, typing, and who may read what."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import asyncpg
import grpc
import pytest
from chat.v1 import (
    messages_pb2,
    messages_pb2_grpc,
    threads_pb2,
    threads_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)
from google.protobuf import field_mask_pb2, timestamp_pb2

from services.common.settings import ServiceSettings
from services.messages.service import DEFINITION as MESSAGES
from services.messages.streams import StreamHub
from services.messages.user_view import decode_cursor, encode_cursor
from tests.conftest import running
from tests.factories import new_group, new_users, send
from tests.rpc_errors import error_info, violated_fields

Event = messages_pb2.StreamUserEventsResponse
WAIT_S = 20  # generous: a live event that never comes fails the test, not a timing


def kind(event: Event) -> str:
    which = event.WhichOneof("event")
    assert which is not None
    return which


class Follower:
    """One open user stream, read in the background."""

    def __init__(self, channel: grpc.aio.Channel, user: str, after: str = "", **kw: Any) -> None:
        stub = messages_pb2_grpc.MessagesServiceStub(channel)
        self.call = stub.StreamUserEvents(
            messages_pb2.StreamUserEventsRequest(user_id=user, after=after), **kw
        )
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.call:
            await self.events.put(event)

    async def next(self) -> Event:
        return await asyncio.wait_for(self.events.get(), WAIT_S)

    async def next_kind(self, *skip: str) -> Event:
        while True:
            event = await self.next()
            if kind(event) not in skip:
                return event

    async def caught_up(self) -> str:
        event = await self.next()
        assert kind(event) == "caught_up", event
        return event.cursor

    def close(self) -> None:
        self.call.cancel()
        self.task.cancel()


async def replay(channel: grpc.aio.Channel, user: str, after: str) -> list[Event]:
    """Everything after `after` up to caught_up (exclusive)."""
    stub = messages_pb2_grpc.MessagesServiceStub(channel)
    call = stub.StreamUserEvents(messages_pb2.StreamUserEventsRequest(user_id=user, after=after))
    events: list[Event] = []
    try:
        async for event in call:
            if kind(event) == "caught_up":
                return events
            events.append(event)
    finally:
        call.cancel()
    raise AssertionError("the stream ended before caught_up")


async def sequenced(db: asyncpg.Pool) -> None:
    """Wait until every committed event has its position (the tick does it)."""
    for _ in range(400):
        if not await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM thread_events WHERE position IS NULL)"
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("events stayed unnumbered")


@pytest.fixture
def threads(channels: dict[str, grpc.aio.Channel]) -> threads_pb2_grpc.ThreadsServiceStub:
    return threads_pb2_grpc.ThreadsServiceStub(channels["threads"])


@pytest.fixture
def msgs(channels: dict[str, grpc.aio.Channel]) -> messages_pb2_grpc.MessagesServiceStub:
    return messages_pb2_grpc.MessagesServiceStub(channels["messages"])


def as_user(user: str) -> list[tuple[str, str]]:
    return [("x-user-id", user)]


async def test_every_event_kind_reaches_the_user_and_nothing_after_they_leave(
    channels: dict[str, grpc.aio.Channel],
    db_pool: asyncpg.Pool,
    threads: Any,
    msgs: Any,
) -> None:
    alice, bob, carol = await new_users(db_pool, 3)
    stream = Follower(channels["messages"], alice, metadata=as_user(alice))
    await stream.caught_up()

    created = await threads.CreateThread(
        threads_pb2.CreateThreadRequest(name="plans", creator_id=alice, participant_ids=[bob])
    )
    thread = created.thread.id
    joined = await stream.next()
    assert kind(joined) == "thread_joined" and joined.thread_joined.thread.id == thread
    assert joined.thread_joined.participant.user_id == alice
    added = await stream.next()
    assert kind(added) == "participant_added" and added.participant_added.user_id == bob
    await threads.AddParticipants(
        threads_pb2.AddParticipantsRequest(thread_id=thread, user_ids=[carol])
    )
    added = await stream.next()
    assert kind(added) == "participant_added" and added.participant_added.user_id == carol

    sent = await msgs.SendMessage(
        messages_pb2.SendMessageRequest(thread_id=thread, user_id=bob, content="hello")
    )
    message_id = sent.message.id
    event = await stream.next()
    assert kind(event) == "message_created" and event.message_created.content == "hello"
    await msgs.UpdateMessage(
        messages_pb2.UpdateMessageRequest(
            message=messages_pb2.Message(id=message_id, content="hello!"),
            update_mask=field_mask_pb2.FieldMask(paths=["content"]),
        )
    )
    event = await stream.next()
    assert kind(event) == "message_updated" and event.message_updated.content == "hello!"

    await threads.MarkRead(threads_pb2.MarkReadRequest(thread_id=thread, user_id=alice))
    event = await stream.next()
    assert kind(event) == "read_marked" and event.read_marked.thread_id == thread
    assert event.read_marked.unread_count == 0

    await msgs.DeleteMessage(messages_pb2.DeleteMessageRequest(id=message_id))
    event = await stream.next()
    assert kind(event) == "message_deleted" and event.message_deleted.content == ""

    await threads.UpdateThread(
        threads_pb2.UpdateThreadRequest(
            thread=threads_pb2.Thread(id=thread, name="renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        )
    )
    event = await stream.next()
    assert kind(event) == "thread_updated" and event.thread_updated.name == "renamed"

    await threads.UpdateParticipant(
        threads_pb2.UpdateParticipantRequest(
            thread_id=thread, user_id=bob, role=threads_pb2.PARTICIPANT_ROLE_OWNER
        )
    )
    event = await stream.next()
    assert kind(event) == "participant_updated" and event.participant_updated.user_id == bob

    await threads.SendTyping(
        threads_pb2.SendTypingRequest(thread_id=thread, user_id=bob), metadata=as_user(bob)
    )
    event = await stream.next()
    assert kind(event) == "typing" and event.typing.user_id == bob and event.cursor == ""

    await threads.RemoveParticipant(
        threads_pb2.RemoveParticipantRequest(thread_id=thread, user_id=carol)
    )
    event = await stream.next()
    assert kind(event) == "participant_removed" and event.participant_removed.user_id == carol

    # Alice is removed; what happens in the thread afterwards never reaches her.
    await threads.RemoveParticipant(
        threads_pb2.RemoveParticipantRequest(thread_id=thread, user_id=alice)
    )
    event = await stream.next()
    assert kind(event) == "thread_left"
    assert event.thread_left.reason == messages_pb2.LEAVE_REASON_REMOVED
    await msgs.SendMessage(
        messages_pb2.SendMessageRequest(thread_id=thread, user_id=bob, content="secret")
    )
    # A sentinel in a thread she is in: the next thing she sees.
    direct = await threads.GetOrCreateDirectThread(
        threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[alice, carol])
    )
    event = await stream.next()
    assert kind(event) == "thread_joined" and event.thread_joined.thread.id == direct.thread.id
    stream.close()


async def test_a_user_leaving_by_themselves_and_a_deleted_thread_say_why(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool, threads: Any
) -> None:
    alice, bob = await new_users(db_pool, 2)
    stream = Follower(channels["messages"], bob)
    await stream.caught_up()
    first = await threads.CreateThread(
        threads_pb2.CreateThreadRequest(creator_id=alice, participant_ids=[bob])
    )
    second = await threads.CreateThread(
        threads_pb2.CreateThreadRequest(creator_id=alice, participant_ids=[bob])
    )
    await threads.RemoveParticipant(
        threads_pb2.RemoveParticipantRequest(thread_id=first.thread.id, user_id=bob),
        metadata=as_user(bob),
    )
    await threads.DeleteThread(threads_pb2.DeleteThreadRequest(id=second.thread.id))
    seen = [await stream.next_kind("participant_removed") for _ in range(4)]
    assert [kind(e) for e in seen] == [
        "thread_joined",
        "thread_joined",
        "thread_left",
        "thread_left",
    ]
    assert seen[2].thread_left.reason == messages_pb2.LEAVE_REASON_LEFT
    assert seen[3].thread_left.reason == messages_pb2.LEAVE_REASON_THREAD_DELETED
    stream.close()


async def random_history(
    db: asyncpg.Pool, threads: Any, msgs: Any, users: list[str], steps: int, seed: int
) -> None:
    """Sends, edits, deletes, joins, removals, renames and read marks in several threads."""
    rng = random.Random(seed)
    rooms = []
    for _ in range(3):
        members = rng.sample(users, 3)
        created = await threads.CreateThread(
            threads_pb2.CreateThreadRequest(creator_id=members[0], participant_ids=members[1:])
        )
        rooms.append(created.thread.id)
    sent: list[str] = []
    for _ in range(steps):
        room = rng.choice(rooms)
        members = [
            str(r["user_id"])
            for r in await db.fetch(
                "SELECT user_id FROM thread_participants WHERE thread_id = $1", uuid.UUID(room)
            )
        ]
        op = rng.choice(
            ["send", "send", "send", "edit", "delete", "join", "leave", "rename", "read"]
        )
        try:
            if op == "send" and members:
                reply = await msgs.SendMessage(
                    messages_pb2.SendMessageRequest(
                        thread_id=room, user_id=rng.choice(members), content=f"m{rng.random()}"
                    )
                )
                sent.append(reply.message.id)
            elif op == "edit" and sent:
                await msgs.UpdateMessage(
                    messages_pb2.UpdateMessageRequest(
                        message=messages_pb2.Message(id=rng.choice(sent), content="edited"),
                        update_mask=field_mask_pb2.FieldMask(paths=["content"]),
                    )
                )
            elif op == "delete" and sent:
                await msgs.DeleteMessage(messages_pb2.DeleteMessageRequest(id=rng.choice(sent)))
            elif op == "join":
                await threads.AddParticipants(
                    threads_pb2.AddParticipantsRequest(thread_id=room, user_ids=[rng.choice(users)])
                )
            elif op == "leave" and len(members) > 1:
                await threads.RemoveParticipant(
                    threads_pb2.RemoveParticipantRequest(
                        thread_id=room, user_id=rng.choice(members)
                    )
                )
            elif op == "rename":
                await threads.UpdateThread(
                    threads_pb2.UpdateThreadRequest(
                        thread=threads_pb2.Thread(id=room, name=f"n{rng.randrange(99)}"),
                        update_mask=field_mask_pb2.FieldMask(paths=["name"]),
                    )
                )
            elif op == "read" and members:
                await threads.MarkRead(
                    threads_pb2.MarkReadRequest(thread_id=room, user_id=rng.choice(members))
                )
        except grpc.aio.AioRpcError as err:
            # A refused step (e.g. an edit of a deleted message) is part of the history too.
            assert err.code() in {
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND,
            }, err


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_resuming_from_any_cursor_gives_exactly_the_recorded_tail(
    channels: dict[str, grpc.aio.Channel],
    db_pool: asyncpg.Pool,
    threads: Any,
    msgs: Any,
    seed: int,
) -> None:
    users = await new_users(db_pool, 5)
    live = {u: Follower(channels["messages"], u) for u in users}
    starts = {u: await f.caught_up() for u, f in live.items()}
    await random_history(db_pool, threads, msgs, users, steps=60, seed=seed)
    await sequenced(db_pool)
    for user in users:
        recorded = await replay(channels["messages"], user, starts[user])
        # The unbroken stream saw the same events in the same order (content may
        # differ only where a message was deleted since: replays redact it).
        seen = [await live[user].next() for _ in recorded]
        assert [(e.cursor, kind(e)) for e in seen] == [(e.cursor, kind(e)) for e in recorded]
        cursors = [e.cursor for e in recorded]
        assert len(set(cursors)) == len(cursors)
        for i, cursor in enumerate(cursors):
            assert await replay(channels["messages"], user, cursor) == recorded[i + 1 :], (user, i)
        live[user].close()


async def test_two_replicas_deliver_the_same_sequence(
    channels: dict[str, grpc.aio.Channel],
    service_settings: ServiceSettings,
    db_pool: asyncpg.Pool,
    threads: Any,
    msgs: Any,
) -> None:
    users = await new_users(db_pool, 4)
    async with running(MESSAGES, service_settings) as (_, second):
        one = Follower(channels["messages"], users[0])
        two = Follower(second, users[0])
        await one.caught_up()
        await two.caught_up()
        await random_history(db_pool, threads, msgs, users, steps=40, seed=7)
        await sequenced(db_pool)
        end = await db_pool.fetchval("SELECT last_position FROM event_log")
        marker = await threads.CreateThread(threads_pb2.CreateThreadRequest(creator_id=users[0]))
        got = []
        for follower in (one, two):
            events = []
            while True:
                event = await follower.next_kind("typing")
                if (
                    kind(event) == "thread_joined"
                    and event.thread_joined.thread.id == marker.thread.id
                ):
                    break
                events.append((event.cursor, kind(event)))
            got.append(events)
            follower.close()
        assert got[0] == got[1] and got[0], end


async def test_an_expired_cursor_is_refused_as_documented(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool, threads: Any
) -> None:
    alice, bob = await new_users(db_pool, 2)
    stream = Follower(channels["messages"], alice)
    old = await stream.caught_up()
    stream.close()
    await threads.CreateThread(
        threads_pb2.CreateThreadRequest(creator_id=alice, participant_ids=[bob])
    )
    await sequenced(db_pool)
    await db_pool.execute("SELECT chat_prune_events('0 seconds', 100000)")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replay(channels["messages"], alice, old)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "CURSOR_EXPIRED"


async def test_typing_is_never_replayed_and_is_rate_limited(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool, threads: Any
) -> None:
    alice, bob = await new_users(db_pool, 2)
    created = await threads.CreateThread(
        threads_pb2.CreateThreadRequest(creator_id=alice, participant_ids=[bob])
    )
    await sequenced(db_pool)  # alice's stream starts after she joined
    stream = Follower(channels["messages"], alice)
    start = await stream.caught_up()
    await threads.SendTyping(
        threads_pb2.SendTypingRequest(thread_id=created.thread.id, user_id=bob),
        metadata=as_user(bob),
    )
    assert kind(await stream.next()) == "typing"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await threads.SendTyping(
            threads_pb2.SendTypingRequest(thread_id=created.thread.id, user_id=bob),
            metadata=as_user(bob),
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await send(db_pool, created.thread.id, bob)
    assert kind(await stream.next()) == "message_created"
    await threads.MarkRead(threads_pb2.MarkReadRequest(thread_id=created.thread.id, user_id=alice))
    assert kind(await stream.next()) == "read_marked"
    replayed = await replay(channels["messages"], alice, start)
    assert [kind(e) for e in replayed] == ["message_created", "read_marked"]
    # An outsider cannot type into the thread.
    carol = (await new_users(db_pool, 1))[0]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await threads.SendTyping(
            threads_pb2.SendTypingRequest(thread_id=created.thread.id, user_id=carol),
            metadata=as_user(carol),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    stream.close()


async def test_who_may_open_which_stream_and_bad_cursors(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool
) -> None:
    alice, bob = await new_users(db_pool, 2)
    inactive = (await new_users(db_pool, 1))[0]
    await db_pool.execute("UPDATE users SET is_active = false WHERE id = $1", uuid.UUID(inactive))
    cases: list[tuple[str, str, list[tuple[str, str]], grpc.StatusCode, set[str]]] = [
        (bob, "", as_user(alice), grpc.StatusCode.PERMISSION_DENIED, set()),
        (inactive, "", [], grpc.StatusCode.PERMISSION_DENIED, set()),
        (alice, "not-a-cursor", [], grpc.StatusCode.INVALID_ARGUMENT, {"after"}),
        (alice, encode_cursor(10**12), [], grpc.StatusCode.INVALID_ARGUMENT, {"after"}),
        ("nope", "", [], grpc.StatusCode.INVALID_ARGUMENT, {"user_id"}),
    ]
    for user, after, metadata, code, fields in cases:
        stream = Follower(channels["messages"], user, after, metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.task
        assert caught.value.code() == code, (user, after, caught.value)
        if fields:
            assert violated_fields(caught.value) == fields


async def test_a_killed_listener_loses_nothing(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool, threads: Any, msgs: Any
) -> None:
    alice, bob = await new_users(db_pool, 2)
    direct = await threads.GetOrCreateDirectThread(
        threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[alice, bob])
    )
    await sequenced(db_pool)
    stream = Follower(channels["messages"], alice)
    await stream.caught_up()
    killed = await db_pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'chat-messages-listener' AND datname = current_database()"
    )
    assert killed == 1
    # Numbered and announced while the process has no listening connection.
    sent = await msgs.SendMessage(
        messages_pb2.SendMessageRequest(thread_id=direct.thread.id, user_id=bob, content="gap?")
    )
    event = await stream.next_kind("read_marked")
    assert kind(event) == "message_created" and event.message_created.id == sent.message.id
    stream.close()


async def test_a_slow_user_stream_is_cut_off_with_a_resumable_code(
    database_url: str, db_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The buffer is the thing under test (a small one fills fast).
    monkeypatch.setenv("STREAM_BUFFER_EVENTS", "4")
    settings = ServiceSettings(DATABASE_URL=database_url, GRPC_HOST="127.0.0.1", METRICS_PORT=0)
    alice, bob = await new_users(db_pool, 2)
    thread = uuid.UUID(await new_group(db_pool, alice, bob))
    # A reader with a small, fixed flow-control window stops reading.
    slow_options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16_384)]
    async with (
        running(MESSAGES, settings) as (service, _),
        grpc.aio.insecure_channel(service.address, options=slow_options) as slow,
    ):
        await sequenced(db_pool)  # the service's tick numbers the thread's creation
        stub = messages_pb2_grpc.MessagesServiceStub(slow)
        call = stub.StreamUserEvents(messages_pb2.StreamUserEventsRequest(user_id=alice))
        first = await asyncio.wait_for(call.read(), WAIT_S)
        assert isinstance(first, Event) and kind(first) == "caught_up"
        for i in range(40):
            await send(db_pool, str(thread), bob, f"{i} " + "x" * 9_000)
        # The client reads nothing until the server has ended the stream (a reader
        # that keeps up, however slowly, is never cut off: backlogs wait for it).
        hub = service.runtime.extras["hub"]
        assert isinstance(hub, StreamHub)
        for _ in range(int(WAIT_S / 0.05)):
            if hub.users.open_count == 0:
                break
            await asyncio.sleep(0.05)
        assert hub.users.open_count == 0
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                assert isinstance(await asyncio.wait_for(call.read(), WAIT_S), Event)
                received += 1
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "STREAM_BUFFER_FULL"
        assert received < 80  # 40 messages and 40 read marks of bob's: not all came


async def test_the_open_user_stream_limit_answers_resource_exhausted(
    database_url: str, db_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAM_MAX_OPEN", "2")  # the limit is the thing under test
    settings = ServiceSettings(DATABASE_URL=database_url, GRPC_HOST="127.0.0.1", METRICS_PORT=0)
    alice = (await new_users(db_pool, 1))[0]
    async with running(MESSAGES, settings) as (_, channel):
        open_ = [Follower(channel, alice) for _ in range(2)]
        for stream in open_:
            await stream.caught_up()
        extra = Follower(channel, alice)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await extra.task
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "STREAM_LIMIT"
        for stream in open_:
            stream.close()


async def test_joins_and_leaves_racing_a_stream_start_agree_with_the_replay(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool, threads: Any, msgs: Any
) -> None:
    """A stream starts while its user is added to and removed from a busy thread:
    whatever the interleaving, what it shows live after caught_up is exactly what a
    replay from that caught_up shows, and never an event of the thread while the
    user is out of it."""
    alice, bob = await new_users(db_pool, 2)
    created = await threads.CreateThread(threads_pb2.CreateThreadRequest(creator_id=bob))
    thread = created.thread.id
    for trial in range(100):
        stream = Follower(channels["messages"], alice)

        async def churn(trial: int = trial) -> None:
            if trial % 2 == 0:
                await threads.AddParticipants(
                    threads_pb2.AddParticipantsRequest(thread_id=thread, user_ids=[alice])
                )
            else:
                await threads.RemoveParticipant(
                    threads_pb2.RemoveParticipantRequest(thread_id=thread, user_id=alice)
                )
            await msgs.SendMessage(
                messages_pb2.SendMessageRequest(thread_id=thread, user_id=bob, content=f"{trial}")
            )

        start, _ = await asyncio.gather(stream.caught_up(), churn())
        await sequenced(db_pool)
        replayed = await replay(channels["messages"], alice, start)
        live = [await stream.next() for _ in replayed]
        assert [(e.cursor, kind(e)) for e in live] == [(e.cursor, kind(e)) for e in replayed]
        for event in live:
            if kind(event) == "message_created":
                # Alice's membership at the message's position, from the log itself.
                last = await db_pool.fetchval(
                    "SELECT kind FROM thread_events WHERE thread_id = $1 AND user_id = $2 "
                    "AND kind IN ('participant_joined', 'participant_left') AND position < $3 "
                    "ORDER BY position DESC LIMIT 1",
                    uuid.UUID(thread),
                    uuid.UUID(alice),
                    decode_cursor(event.cursor),
                )
                assert last == "participant_joined", (trial, event)
        stream.close()


async def test_a_deactivated_user_stream_ends_with_user_inactive(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool
) -> None:
    alice = (await new_users(db_pool, 1))[0]
    stream = Follower(channels["messages"], alice, metadata=as_user(alice))
    await stream.caught_up()
    users = users_pb2_grpc.UsersServiceStub(channels["users"])
    await users.UpdateUser(
        users_pb2.UpdateUserRequest(
            user=users_pb2.User(id=alice, is_active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["is_active"]),
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(stream.task, WAIT_S)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "USER_INACTIVE"


async def test_a_send_moves_the_senders_mark_without_a_read_marked_event(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool, threads: Any, msgs: Any
) -> None:
    alice, bob = await new_users(db_pool, 2)
    direct = await threads.GetOrCreateDirectThread(
        threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[alice, bob])
    )
    thread = direct.thread.id
    await sequenced(db_pool)
    stream = Follower(channels["messages"], alice)
    start = await stream.caught_up()
    await msgs.SendMessage(
        messages_pb2.SendMessageRequest(thread_id=thread, user_id=bob, content="first")
    )
    await msgs.SendMessage(
        messages_pb2.SendMessageRequest(thread_id=thread, user_id=alice, content="reply")
    )
    # Her own message says she read up to it; an explicit mark is an event.
    await threads.MarkRead(threads_pb2.MarkReadRequest(thread_id=thread, user_id=alice))
    await msgs.SendMessage(
        messages_pb2.SendMessageRequest(thread_id=thread, user_id=bob, content="again")
    )
    await threads.MarkRead(threads_pb2.MarkReadRequest(thread_id=thread, user_id=alice))
    expected = ["message_created", "message_created", "message_created", "read_marked"]
    assert [kind(await stream.next()) for _ in expected] == expected
    marked = await db_pool.fetchval(
        "SELECT last_read_at FROM thread_participants WHERE thread_id = $1 AND user_id = $2",
        uuid.UUID(thread),
        uuid.UUID(alice),
    )
    assert marked is not None
    await sequenced(db_pool)
    assert [kind(e) for e in await replay(channels["messages"], alice, start)] == expected
    stream.close()


async def test_a_read_mark_event_carries_the_exact_unread_count_past_100(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool, threads: Any
) -> None:
    """read_marked says how many are left unread, exactly (the counters of
    db/functions/unread.sql), however many: no cap at 100 any more."""
    alice, bob = await new_users(db_pool, 2)
    thread = await new_group(db_pool, bob, alice)
    ids = [await send(db_pool, thread, bob, f"m{i}") for i in range(130)]
    tenth = await db_pool.fetchval(
        "SELECT created_at FROM messages WHERE id = $1", uuid.UUID(ids[9])
    )
    await sequenced(db_pool)
    stream = Follower(channels["messages"], alice)
    await stream.caught_up()
    read_at = timestamp_pb2.Timestamp()
    read_at.FromDatetime(tenth)
    await threads.MarkRead(
        threads_pb2.MarkReadRequest(thread_id=thread, user_id=alice, read_at=read_at)
    )
    event = await stream.next()
    assert kind(event) == "read_marked"
    assert (event.read_marked.unread_count, event.read_marked.unread_count_capped) == (120, False)
    stream.close()
