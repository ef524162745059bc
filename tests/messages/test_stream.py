"""StreamThreadMessages: replay then live, resume, fan-out across processes, limits."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from chat.v1 import messages_pb2, messages_pb2_grpc

from devtools.processes import start_service_process
from services.common.settings import ServiceSettings
from services.messages.service import DEFINITION
from tests.conftest import running
from tests.messages.conftest import MessagesServer, Room
from tests.rpc_errors import as_user, error_info, violated_fields

if TYPE_CHECKING:
    from tests.messages.conftest import Stub

Event = messages_pb2.StreamThreadMessagesResponse


async def send(
    messages: Stub, room: Room, content: str, user: str | None = None
) -> messages_pb2.Message:
    author = user or room.member
    reply = await messages.SendMessage(
        messages_pb2.SendMessageRequest(thread_id=room.thread_id, user_id=author, content=content),
        metadata=as_user(author),
    )
    return reply.message


def open_stream(
    messages: Stub, room: Room, after: str = "", user: str | None = None
) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
    return messages.StreamThreadMessages(
        messages_pb2.StreamThreadMessagesRequest(thread_id=room.thread_id, after=after),
        metadata=as_user(user or room.owner),
    )


async def read(stream: grpc.aio.UnaryStreamCall, n: int) -> list[Event]:  # type: ignore[type-arg]
    events = []
    for _ in range(n):
        event = await asyncio.wait_for(stream.read(), timeout=30)
        assert isinstance(event, Event), event
        events.append(event)
    return events


async def until_caught_up(
    stream: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
) -> tuple[list[Event], str]:
    """The replayed events, then the caught_up cursor: from here on the stream is live."""
    replayed: list[Event] = []
    while True:
        [event] = await read(stream, 1)
        if event.WhichOneof("event") == "caught_up":
            assert event.caught_up.cursor == event.cursor
            return replayed, event.cursor
        replayed.append(event)


async def test_replay_then_live_without_gap_or_duplicate(
    server: MessagesServer, room: Room
) -> None:
    messages = server.stub
    before = [await send(messages, room, f"old{i}") for i in range(5)]
    stream = open_stream(messages, room, after=before[1].cursor)
    # Sends race with the replay: every one must arrive exactly once, in order,
    # with exactly one caught_up somewhere among them.
    racing = asyncio.gather(*(send(messages, room, f"new{i}") for i in range(25)))
    events = await read(stream, 3 + 25 + 1)
    sent_live = await racing
    stream.cancel()
    assert [e.WhichOneof("event") for e in events].count("caught_up") == 1
    events = [e for e in events if e.WhichOneof("event") != "caught_up"]
    ids = [e.created.id for e in events]
    assert all(e.WhichOneof("event") == "created" for e in events)
    assert len(set(ids)) == len(ids) == 28
    assert ids[:3] == [m.id for m in before[2:]]
    assert set(ids[3:]) == {m.id for m in sent_live}
    history = await messages.ListMessages(
        messages_pb2.ListMessagesRequest(thread_id=room.thread_id, page_size=200),
        metadata=as_user(room.owner),
    )
    commit_order = [m.id for m in reversed(history.messages)]
    assert ids == commit_order[2:]  # the stream's order is the commit order


async def test_resume_from_a_cursor_misses_nothing(server: MessagesServer, room: Room) -> None:
    messages = server.stub
    stream = open_stream(messages, room)
    await until_caught_up(stream)
    first = await send(messages, room, "one")
    [event] = await read(stream, 1)
    assert event.created.id == first.id
    stream.cancel()  # the client goes away ...
    missed = [await send(messages, room, f"while away {i}") for i in range(3)]
    edited_first = await messages.UpdateMessage(
        messages_pb2.UpdateMessageRequest(
            message=messages_pb2.Message(id=first.id, content="one, edited"),
            update_mask={"paths": ["content"]},  # type: ignore[arg-type]
        ),
        metadata=as_user(room.member),
    )
    resumed = open_stream(messages, room, after=event.cursor)  # ... and comes back
    events, _ = await until_caught_up(resumed)
    assert [e.WhichOneof("event") for e in events] == ["created"] * 3 + ["updated"]
    assert [e.created.id for e in events[:3]] == [m.id for m in missed]
    assert events[3].updated.content == edited_first.message.content
    deleted = await messages.DeleteMessage(
        messages_pb2.DeleteMessageRequest(id=missed[0].id), metadata=as_user(room.member)
    )
    [tomb] = await read(resumed, 1)
    assert tomb.WhichOneof("event") == "deleted" and tomb.deleted.id == deleted.message.id
    resumed.cancel()


async def test_a_message_edited_before_the_replay_still_arrives_as_created(
    server: MessagesServer, room: Room
) -> None:
    """Found by the soak: x sent, y sent, x edited, then a replay from before x."""
    messages = server.stub
    before = await send(messages, room, "before")
    x = await send(messages, room, "x")
    y = await send(messages, room, "y")
    await messages.UpdateMessage(
        messages_pb2.UpdateMessageRequest(
            message=messages_pb2.Message(id=x.id, content="x, edited"),
            update_mask={"paths": ["content"]},  # type: ignore[arg-type]
        ),
        metadata=as_user(room.member),
    )
    stream = open_stream(messages, room, after=before.cursor)
    events, _ = await until_caught_up(stream)
    kinds = [(e.WhichOneof("event"), getattr(e, e.WhichOneof("event") or "").id) for e in events]
    assert kinds == [("created", x.id), ("created", y.id), ("updated", x.id)]
    assert events[0].created.content == "x, edited"  # every event carries the current state
    # Resuming from any event's cursor continues right after it.
    resumed = open_stream(messages, room, after=events[0].cursor)
    again, _ = await until_caught_up(resumed)
    assert [e.cursor for e in again] == [e.cursor for e in events[1:]]
    # A replayed event's message carries the event's own cursor: one cursor per event.
    assert [getattr(e, e.WhichOneof("event") or "").cursor for e in events] == [
        e.cursor for e in events
    ]
    stream.cancel()
    resumed.cancel()


def forged_cursors(thread_id: str) -> list[str]:
    """Cursors this API never hands out: other spellings, out of range, garbage."""

    def raw(text: str, pad: str = "") -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=") + pad

    return [
        "garbage!",
        "YWJj",
        raw(f"c:{thread_id}:{2**63}"),  # past bigint
        raw(f"c:{thread_id}:{10**30}"),
        raw(f"c:{thread_id}:-1"),
        raw(f"c:{thread_id}: 3 "),
        raw(f"c:{thread_id}:+2"),
        raw(f"c:{thread_id}:\u0663"),  # ARABIC-INDIC DIGIT THREE
        raw(f"c:{thread_id}:1_0"),
        raw(f"c:{thread_id.upper()}:1"),
        raw(f"c:{thread_id}:1", pad="=="),
        raw(f"c:{uuid.uuid4()}:1"),  # another thread's
        raw(f"x:{thread_id}:1"),
    ]


async def test_live_only_stream_and_cursor_validation(server: MessagesServer, room: Room) -> None:
    messages = server.stub
    await send(messages, room, "before the stream")
    stream = open_stream(messages, room)
    replayed, _ = await until_caught_up(stream)  # live only: caught_up comes first
    assert replayed == []
    fresh = await send(messages, room, "after")
    [event] = await read(stream, 1)
    assert event.created.id == fresh.id
    stream.cancel()
    for after in forged_cursors(room.thread_id):
        for user in (room.owner, None):  # a participant, and a trusted caller
            bad = messages.StreamThreadMessages(
                messages_pb2.StreamThreadMessagesRequest(thread_id=room.thread_id, after=after),
                metadata=as_user(user) if user else (),
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await bad.read()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, after
            assert violated_fields(caught.value) == {"after"}
    outsider = open_stream(messages, room, user=room.outsider)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await outsider.read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delivery_across_two_server_processes(
    server: MessagesServer, room: Room, database_url: str
) -> None:
    other = await start_service_process("messages", database_url)
    try:
        async with grpc.aio.insecure_channel(other.address) as channel:
            remote = messages_pb2_grpc.MessagesServiceStub(channel)
            # Open after a cursor and wait for the replayed marker: from then on the
            # remote subscription is active, so the next message must arrive live.
            before = await send(server.stub, room, "marker before")
            marker = await send(server.stub, room, "marker after")
            stream = open_stream(remote, room, after=before.cursor)
            [replayed], _ = await until_caught_up(stream)
            assert replayed.created.id == marker.id
            sent = await send(server.stub, room, "across processes")
            [event] = await read(stream, 1)
            assert event.created.id == sent.id
            stream.cancel()
    finally:
        assert await other.stop() == 0


async def test_slow_consumer_is_cut_off_not_buffered(
    room: Room, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The buffer is the thing under test (a small one fills fast); its twin with the
    # defaults is tests/reliability/test_stream_memory.py's stopped reader.
    monkeypatch.setenv("STREAM_BUFFER_EVENTS", "4")
    settings = ServiceSettings(DATABASE_URL=database_url, GRPC_HOST="127.0.0.1", METRICS_PORT=0)
    # A reader with a small, fixed flow-control window: once it stops reading, the
    # server cannot write more out and its per-stream buffer fills.
    slow_reader_options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16_384)]
    async with (
        running(DEFINITION, settings) as (service, channel),
        grpc.aio.insecure_channel(service.address, options=slow_reader_options) as slow,
    ):
        messages = messages_pb2_grpc.MessagesServiceStub(channel)
        stream = open_stream(messages_pb2_grpc.MessagesServiceStub(slow), room)
        server = MessagesServer(service, channel, messages)
        await until_caught_up(stream)
        for i in range(40):
            await send(messages, room, f"{i} " + "x" * 9_000)
        # The server ends the call at once, although it is stuck writing to a
        # client that does not read: no open-stream slot stays taken.
        for _ in range(3000):  # bounded wait
            if server.hub.open_count == 0:
                break
            await asyncio.sleep(0.01)
        assert server.hub.open_count == 0
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                event = await asyncio.wait_for(stream.read(), timeout=30)
                assert isinstance(event, Event)
                received += 1
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert received < 40
        assert server.hub.subscriber_count == 0


async def test_cancellation_leaves_nothing_behind(server: MessagesServer, room: Room) -> None:
    messages = server.stub
    baseline = len(asyncio.all_tasks())
    streams = [open_stream(messages, room) for _ in range(5)]
    for stream in streams:
        await until_caught_up(stream)
    await send(messages, room, "to everyone")
    for stream in streams:
        assert len(await read(stream, 1)) == 1
        stream.cancel()
    for _ in range(500):  # bounded wait for the server to see the cancellations
        if server.hub.subscriber_count == 0 and server.hub.feed_count == 0:
            break
        await asyncio.sleep(0.01)
    assert (server.hub.subscriber_count, server.hub.feed_count) == (0, 0)
    for _ in range(500):
        if len(asyncio.all_tasks()) <= baseline:
            break
        await asyncio.sleep(0.01)
    assert len(asyncio.all_tasks()) <= baseline


async def test_removed_participant_stream_ends(
    server: MessagesServer, room: Room, db_pool: asyncpg.Pool
) -> None:
    watcher = open_stream(server.stub, room, user=room.member)
    owner_view = open_stream(server.stub, room, user=room.owner)
    await until_caught_up(watcher)
    await until_caught_up(owner_view)
    async with db_pool.acquire() as conn, conn.transaction():
        # What ThreadsService.RemoveParticipant does (the cross-service contract).
        await conn.execute(
            "DELETE FROM thread_participants WHERE thread_id = $1 AND user_id = $2",
            uuid.UUID(room.thread_id),
            uuid.UUID(room.member),
        )
        await conn.execute(
            "SELECT pg_notify('chat_membership', $1)",
            json.dumps({"thread_id": room.thread_id, "user_id": room.member}),
        )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(watcher.read(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    sent = await send(server.stub, room, "still here", user=room.owner)
    [event] = await read(owner_view, 1)  # others keep streaming
    assert event.created.id == sent.id
    owner_view.cancel()


async def test_listener_reconnects_and_catches_up(
    server: MessagesServer, room: Room, db_pool: asyncpg.Pool
) -> None:
    stream = open_stream(server.stub, room)
    await until_caught_up(stream)
    killed = await db_pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'chat-messages-listener' AND datname = current_database()"
    )
    assert killed == 1
    # Sent while the process has no listening connection: the catch-up delivers it.
    sent = await send(server.stub, room, "during the outage")
    [event] = await read(stream, 1)
    assert event.created.id == sent.id
    stream.cancel()


async def test_graceful_stop_ends_streams_with_a_status_to_resume_from(
    service_settings: ServiceSettings, room: Room
) -> None:
    """SIGTERM's path: open streams end UNAVAILABLE at once, not CANCELLED at the grace's end."""
    async with running(DEFINITION, service_settings) as (service, channel):
        messages = messages_pb2_grpc.MessagesServiceStub(channel)
        stream = open_stream(messages, room)
        await until_caught_up(stream)
        sent = await send(messages, room, "before the stop")
        [event] = await read(stream, 1)
        assert event.created.id == sent.id
        stopping = asyncio.ensure_future(service.stop(grace=60.0))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(stream.read(), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value).reason == "SHUTTING_DOWN"  # not a database outage
        assert "resume from your cursor" in (caught.value.details() or "")
        await stopping


async def test_an_event_larger_than_the_byte_buffer_still_flows(
    room: Room, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The byte bound never starves a stream: one event always fits an empty buffer."""
    monkeypatch.setenv("STREAM_BUFFER_BYTES", str(64 * 1024))  # the bound under test
    settings = ServiceSettings(DATABASE_URL=database_url, GRPC_HOST="127.0.0.1", METRICS_PORT=0)
    async with running(DEFINITION, settings) as (_, channel):
        messages = messages_pb2_grpc.MessagesServiceStub(channel)
        stream = open_stream(messages, room)
        await until_caught_up(stream)
        big = "\U0001f600" * 10_000  # 40,000 bytes
        blob = {"k": "x" * 16_000}
        reply = await messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=room.thread_id,
                user_id=room.member,
                content=big,
                metadata=blob,  # type: ignore[arg-type]
                attachments=[
                    messages_pb2.Attachment(
                        url="https://x.io/a",
                        type="t",
                        name="n",
                        size=1,
                        metadata=blob,  # type: ignore[arg-type]
                    )
                    for _ in range(2)
                ],
            ),
            metadata=as_user(room.member),
        )
        [event] = await read(stream, 1)
        assert event.ByteSize() > 64 * 1024
        assert event.created.id == reply.message.id
        stream.cancel()
