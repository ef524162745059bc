"""Issue 18 attacks on waking streams after commit (services/messages/streams/waker.py).

Delivery is complete without any wake-up (the periodic catch-up read), so a
wake-up that goes missing costs latency, not events. To see whether the
wake-ups themselves go out, the streams here live in a process whose catch-up
read is as rare as the setting allows (STREAM_CATCH_UP_INTERVAL=60): within
the test's bounded wait, only a wake-up delivers. docs/reliability.md, "Issue 18
attacks", lists what else was tried.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from chat.v1 import messages_pb2_grpc

from devtools.processes import start_service_process
from services.common.settings import ServiceSettings
from services.messages.service import DEFINITION
from tests.conftest import running
from tests.factories import new_room
from tests.messages.conftest import Room
from tests.messages.test_stream import Event, open_stream, send, until_caught_up

if TYPE_CHECKING:
    from tests.messages.conftest import Stub

# Far longer than a wake-up takes, far shorter than the streams' catch-up read.
WAKE_WAIT_S = 15.0


async def _send_one(stub: Stub, room: Room, answered: asyncio.Event) -> None:
    try:
        await send(stub, room, "in flight at SIGTERM")
        answered.set()
    except grpc.aio.AioRpcError:
        pass  # refused once the stop began: nothing committed


async def test_a_graceful_stop_sends_the_wake_ups_of_its_last_writes(
    db_pool: asyncpg.Pool,
    database_url: str,
    service_settings: ServiceSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sends still in flight when a messages process is told to stop (SIGTERM)
    commit during its drain; their wake-ups reach the streams of the other
    processes before it exits. (They were dropped: the waker was cancelled with
    its queue, and those streams waited for their catch-up read.)"""
    monkeypatch.setenv("STREAM_CATCH_UP_INTERVAL", "60")  # the streams' process
    rooms = [await new_room(db_pool) for _ in range(20)]
    async with running(DEFINITION, service_settings) as (_, channel):
        here = messages_pb2_grpc.MessagesServiceStub(channel)
        streams = [open_stream(here, r) for r in rooms]
        for stream in streams:
            await until_caught_up(stream)
        for _ in range(3):  # three writers, each stopped with sends in flight
            writer = await start_service_process("messages", database_url)
            async with grpc.aio.insecure_channel(writer.address) as writer_channel:
                stub = messages_pb2_grpc.MessagesServiceStub(writer_channel)
                await send(stub, rooms[0], "warm-up")
                answered = asyncio.Event()
                sends = [
                    asyncio.create_task(_send_one(stub, r, answered))
                    for r in rooms
                    for _ in range(5)
                ]
                await asyncio.wait_for(answered.wait(), timeout=30)
                writer.process.send_signal(signal.SIGTERM)
                await asyncio.gather(*sends)
                assert await writer.stop() == 0
        for room, stream in zip(rooms, streams, strict=True):
            committed = await db_pool.fetchval(
                "SELECT coalesce(array_agg(id::text ORDER BY seq), '{}') FROM messages "
                "WHERE thread_id = $1",
                uuid.UUID(room.thread_id),
            )
            delivered: list[str] = []
            while len(delivered) < len(committed):
                event = await asyncio.wait_for(stream.read(), timeout=WAKE_WAIT_S)
                assert isinstance(event, Event), event
                delivered.append(event.created.id)
            assert delivered == committed
            stream.cancel()
