"""Streams are woken after a write commits, not by a NOTIFY in its transaction
(services/messages/streams/waker.py): what the messages service commits carries
no notification, its own streams hear of it at once, other processes through a
batched NOTIFY, and a wake-up that never went out is made good by the periodic
catch-up read."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
from chat.v1 import messages_pb2_grpc

from devtools.processes import start_service_process
from services.common import channels
from services.messages.service import DEFINITION as MESSAGES
from tests.factories import new_room
from tests.factories import send as factory_send
from tests.messages.conftest import MessagesServer, Room
from tests.messages.test_stream import open_stream, read, send, until_caught_up

# A session as the messages service's pool opens it (no NOTIFY in its writes).
WAKE = dict(MESSAGES.session_settings)
SEND_SQL = "SELECT id, seq FROM chat_send_message($1, $2, $3, NULL, NULL, NULL, '[]'::jsonb)"


async def test_a_service_session_sends_commit_without_a_notification(
    database_url: str, room: Room
) -> None:
    """Notifications of one session arrive in commit order: a marker sent after the
    send is the first to arrive only if the send itself notified nothing."""
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(database_url)
    writer = await asyncpg.connect(database_url, server_settings=WAKE)
    plain = await asyncpg.connect(database_url)
    try:
        await listener.add_listener(channels.THREAD_EVENTS, lambda *a: heard.put_nowait(a[3]))
        thread, user = uuid.UUID(room.thread_id), uuid.UUID(room.member)
        woken = await writer.fetchrow(SEND_SQL, thread, user, "woken after commit")
        await writer.execute("SELECT chat_notify_thread_event($1, 0)", thread)
        first = await asyncio.wait_for(heard.get(), timeout=30)
        assert first == f"{thread}:0", "the send notified in its own transaction"
        # Without the setting (tools, tests, other writers) a send still notifies.
        notified = await plain.fetchrow(SEND_SQL, thread, user, "notified")
        second = await asyncio.wait_for(heard.get(), timeout=30)
        assert woken is not None and notified is not None
        assert second == f"{thread}:{notified['seq']}"
        assert woken["seq"] < notified["seq"]
    finally:
        for conn in (listener, writer, plain):
            await conn.close()


async def test_a_write_whose_wake_up_never_went_out_is_caught_up(
    server: MessagesServer, room: Room, database_url: str
) -> None:
    """A write committed with no wake-up at all (as if its process died right after
    the commit) still reaches a live stream: the catch-up read finds it."""
    watcher = open_stream(server.stub, room)
    await until_caught_up(watcher)
    writer = await asyncpg.connect(database_url, server_settings=WAKE)
    try:
        for i in range(3):
            sent = await factory_send(writer, room.thread_id, room.member, f"silent {i}")
            [event] = await read(watcher, 1)
            assert event.created.id == sent
    finally:
        await writer.close()
        watcher.cancel()


async def test_bursts_through_one_process_reach_streams_on_another_once_in_order(
    server: MessagesServer, db_pool: asyncpg.Pool, database_url: str
) -> None:
    """Sends to many threads at once: the waker batches their wake-ups; every stream
    on the other process gets each of its thread's messages once, in order."""
    rooms = [await new_room(db_pool) for _ in range(8)]
    per_room = 15
    other = await start_service_process("messages", database_url)
    try:
        async with grpc.aio.insecure_channel(other.address) as channel:
            remote = messages_pb2_grpc.MessagesServiceStub(channel)
            streams = [open_stream(remote, r) for r in rooms]
            for stream in streams:
                await until_caught_up(stream)

            async def burst(r: Room) -> list[str]:
                return [(await send(server.stub, r, f"m{i}")).id for i in range(per_room)]

            sent = await asyncio.gather(*(burst(r) for r in rooms))
            for stream, ids in zip(streams, sent, strict=True):
                events = await read(stream, per_room)
                assert [e.created.id for e in events] == ids
                stream.cancel()
    finally:
        assert await other.stop() == 0


async def test_a_backlog_reaches_a_reading_stream_whole_not_cut_off(
    server: MessagesServer, room: Room, database_url: str
) -> None:
    """600 messages committed at once with no wake-up (as after an outage or a lost
    notification): the feed catches up in batches of half a buffer and waits for
    the stream to drain between them, so a client that keeps reading gets all of
    them in order instead of STREAM_BUFFER_FULL (the buffer holds 256)."""
    watcher = open_stream(server.stub, room)
    await until_caught_up(watcher)
    writer = await asyncpg.connect(database_url, server_settings=WAKE)
    try:
        ids = await writer.fetch(
            "SELECT s.id FROM generate_series(1, 600) g, LATERAL chat_send_message("
            "$1, $2, 'backlog ' || g, NULL, NULL, NULL, '[]'::jsonb) s ORDER BY s.seq",
            uuid.UUID(room.thread_id),
            uuid.UUID(room.member),
        )
    finally:
        await writer.close()
    events = await read(watcher, len(ids))
    assert [e.created.id for e in events] == [str(r["id"]) for r in ids]
    watcher.cancel()
