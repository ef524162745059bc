"""Memory is bounded in bytes: streaming maximum-size messages leaves nothing behind.

The messages service runs as its own process with the defaults of `make run`.
Every message sent here is at every input limit at once
(services/messages/validation.py, services/messages/settings.py): 10,000
characters of content, each a 4-byte UTF-8 character (the limit counts
characters, so this is 40,000 bytes); message metadata of exactly 16 KiB as
compact JSON; 20 attachments, each with a url, type and name at their maximum
lengths in 4-byte characters and metadata of exactly 16 KiB. One such request
is about 430 KB (the gRPC limit is 4 MiB), 300 of them about 125 MB.

Streams hold bounded buffers (STREAM_BUFFER_EVENTS events, STREAM_BUFFER_BYTES
bytes), fetches are bounded (STREAM_FETCH_BATCH rows, STREAM_FETCH_BYTES bytes)
and each fetched event is converted once and shared by its subscribers; nothing
is cached past delivery. So after the streams close the process's resident
memory must come back to about where it was before. Before this design a
per-process cache of 1,024 converted messages held about 700 MiB at these sizes
(271 MiB after 300 messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg
import grpc
import psutil
import pytest
from chat.v1 import messages_pb2, messages_pb2_grpc
from google.protobuf import struct_pb2

from devtools.processes import ServiceProcess, start_service_process
from services.messages.settings import MessagesSettings
from services.messages.validation import NAME_MAX, TYPE_MAX, URL_MAX
from tests.messages.conftest import Room, new_room
from tests.rpc_errors import as_user, error_info

MIB = 1024 * 1024
LIMITS = MessagesSettings.model_construct()  # the defaults `make run` uses, not the shell
GRPC_MAX_REQUEST = 4 * MIB  # GRPC_MAX_RECEIVE_MESSAGE_BYTES default
WIDE = "\U0001f600"  # a 4-byte UTF-8 character

MESSAGES = 300
FAST_STREAMS = 3
# The sender stays at most this many messages ahead of the slowest reading stream:
# about 1.7 MB queued per stream, well within STREAM_BUFFER_BYTES, so the reading
# streams are never cut off for being slow (the test machine is the bottleneck).
WINDOW = 4
# Resident memory after the streams close may exceed the baseline by at most
# this much: the allocator keeps some freed memory, and the database pool and
# gRPC keep grown buffers. Holding the messages (as the old cache did: 271 MiB
# after 300) or any stream's data fails it.
FINAL_MARGIN = 64 * MIB
# While streaming, the process holds at most a few fetches (STREAM_FETCH_BYTES
# of rows each, and their protobuf), each stream's buffer (STREAM_BUFFER_BYTES:
# 4 streams, 16 MiB) and gRPC's send buffers: a few tens of MiB. The old cache
# alone grew past this bound (271 MiB after 300 messages).
PEAK_MARGIN = 128 * MIB
READ_WAIT_S = 60.0  # how long a stream may take to deliver what was sent
SETTLE_S = 20.0  # how long the resident memory may take to come back

Event = messages_pb2.StreamThreadMessagesResponse
if TYPE_CHECKING:
    Stream = grpc.aio.UnaryStreamCall[messages_pb2.StreamThreadMessagesRequest, Event]


def metadata_at_limit(key: str) -> struct_pb2.Struct:
    """Metadata of exactly MESSAGE_MAX_METADATA_BYTES as compact JSON (what is counted)."""
    overhead = len(json.dumps({key: ""}, separators=(",", ":")))
    value = {key: "x" * (LIMITS.max_metadata_bytes - overhead)}
    assert len(json.dumps(value, separators=(",", ":")).encode()) == LIMITS.max_metadata_bytes
    metadata = struct_pb2.Struct()
    metadata.update(value)
    return metadata


def wide(prefix: str, length: int) -> str:
    return prefix + WIDE * (length - len(prefix))


def largest_request(room: Room, i: int) -> messages_pb2.SendMessageRequest:
    attachment = messages_pb2.Attachment(
        url=wide("https://example.com/", URL_MAX),
        type="image/" + "x" * (TYPE_MAX - len("image/")),  # printable ASCII only
        name=wide("", NAME_MAX),
        size=2**31 - 1,
        metadata=metadata_at_limit("attachment"),
    )
    request = messages_pb2.SendMessageRequest(
        thread_id=room.thread_id,
        user_id=room.member,
        content=wide(f"{i} ", LIMITS.max_content_chars),
        metadata=metadata_at_limit("message"),
        attachments=[attachment] * LIMITS.max_attachments,
        request_id=str(uuid.uuid4()),
    )
    assert len(request.content) == LIMITS.max_content_chars
    return request


@dataclass
class Reader:
    """A stream read to the end in the background; `ids` in arrival order."""

    stream: Stream
    ids: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while (event := await self.stream.read()) is not grpc.aio.EOF:
            assert isinstance(event, Event)
            assert event.WhichOneof("event") == "created", event.WhichOneof("event")
            self.ids.append(event.created.id)


async def reached(readers: list[Reader], count: int) -> None:
    """Wait (bounded) until every reader has `count` messages; fail if one stops."""
    deadline = time.monotonic() + READ_WAIT_S
    while min(len(r.ids) for r in readers) < count:
        for reader in readers:
            if reader.task is not None and reader.task.done():
                reader.task.result()  # the stream's error, if it ended with one
                pytest.fail(f"a stream ended after {len(reader.ids)} of {MESSAGES} messages")
        if time.monotonic() > deadline:
            pytest.fail(f"the streams did not deliver {count} messages within {READ_WAIT_S} s")
        await asyncio.sleep(0.005)


class Rss:
    """Resident memory of one process, sampled in the background for the peak."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def now(self) -> int:
        rss = int(self._process.memory_info().rss)
        self.peak = max(self.peak, rss)
        return rss

    async def _sample(self) -> None:
        while True:
            self.now()
            await asyncio.sleep(0.05)

    def start_sampling(self) -> None:
        self._task = asyncio.create_task(self._sample())

    async def stop_sampling(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def settle(self, target: int) -> int:
        """Poll until at most `target` (bounded by SETTLE_S); the last reading."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            rss = self.now()
            if rss <= target or time.monotonic() > deadline:
                return rss
            await asyncio.sleep(0.25)


@pytest.fixture
async def messages_process(database_url: str) -> AsyncIterator[ServiceProcess]:
    """The messages service with `make run`'s defaults (only the database and ports differ)."""
    proc = await start_service_process("messages", database_url)
    yield proc
    if proc.process.returncode is not None:
        print(f"messages exited {proc.process.returncode}:", *proc.log[-30:], sep="")
    with contextlib.suppress(TimeoutError):
        await proc.stop()


def open_stream(stub: messages_pb2_grpc.MessagesServiceAsyncStub, room: Room, user: str) -> Stream:
    return stub.StreamThreadMessages(
        messages_pb2.StreamThreadMessagesRequest(thread_id=room.thread_id),
        metadata=as_user(user),
    )


async def until_caught_up(stream: Stream) -> None:
    event = await asyncio.wait_for(stream.read(), timeout=30)
    assert isinstance(event, Event) and event.WhichOneof("event") == "caught_up", event


async def warm_up(stub: messages_pb2_grpc.MessagesServiceAsyncStub, room: Room) -> None:
    """A few small sends and a stream, so the baseline includes a used process."""
    stream = open_stream(stub, room, room.owner)
    await until_caught_up(stream)
    for i in range(5):
        await stub.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=room.thread_id, user_id=room.member, content=f"warm-up {i}"
            ),
            metadata=as_user(room.member),
        )
        event = await asyncio.wait_for(stream.read(), timeout=30)
        assert isinstance(event, Event) and event.WhichOneof("event") == "created"
    stream.cancel()


async def test_streaming_maximum_size_messages_leaves_memory_where_it_was(
    db_pool: asyncpg.Pool, messages_process: ServiceProcess
) -> None:
    room = await new_room(db_pool)
    rss = Rss(messages_process.process.pid)
    channel_options = [("grpc.max_receive_message_length", GRPC_MAX_REQUEST)]
    async with grpc.aio.insecure_channel(messages_process.address, channel_options) as channel:
        stub = messages_pb2_grpc.MessagesServiceStub(channel)
        await warm_up(stub, room)
        await asyncio.sleep(1.0)
        baseline = rss.now()
        rss.peak = baseline

        request = largest_request(room, 0)
        assert request.ByteSize() < GRPC_MAX_REQUEST
        request_bytes = request.ByteSize()

        # Separate connections, like separate subscribers (and the sends on their own).
        streams: list[Stream] = []
        readers: list[Reader] = []
        stream_channels = [
            grpc.aio.insecure_channel(messages_process.address, channel_options)
            for _ in range(FAST_STREAMS + 1)
        ]
        try:
            streams += [
                open_stream(
                    messages_pb2_grpc.MessagesServiceStub(ch),
                    room,
                    room.owner if i % 2 else room.member,
                )
                for i, ch in enumerate(stream_channels)
            ]
            for stream in streams:
                await until_caught_up(stream)
            *fast, slow = streams  # `slow` is never read while the messages flow
            readers += [Reader(stream) for stream in fast]
            for reader in readers:
                reader.start()
            rss.start_sampling()

            started = time.monotonic()
            sent: list[str] = []
            for i in range(MESSAGES):
                await reached(readers, i - WINDOW)
                reply = await stub.SendMessage(
                    largest_request(room, i), metadata=as_user(room.member), timeout=30
                )
                sent.append(reply.message.id)
            await reached(readers, MESSAGES)
            elapsed = time.monotonic() - started
            for reader in readers:
                assert reader.ids == sent, "a stream delivered other messages, or out of order"

            # The stream that stopped reading was cut off: what reached its transport
            # before the cut-off is delivered, then RESOURCE_EXHAUSTED.
            slow_count = 0
            with pytest.raises(grpc.aio.AioRpcError) as cut_off:
                async with asyncio.timeout(60):
                    while await slow.read() is not grpc.aio.EOF:
                        slow_count += 1
            assert cut_off.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, cut_off.value
            assert error_info(cut_off.value).reason == "STREAM_BUFFER_FULL"
            assert slow_count < MESSAGES
        finally:
            for stream in streams:
                stream.cancel()
            tasks = [r.task for r in readers if r.task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)
            for ch in stream_channels:
                await ch.close()
        await rss.stop_sampling()
        peak = rss.peak
        final = await rss.settle(baseline + FINAL_MARGIN)
    print(
        f"\n{MESSAGES} messages of {request_bytes / 1024:.0f} KiB to {FAST_STREAMS} reading "
        f"streams (+1 that stopped reading, cut off after {slow_count}) in {elapsed:.1f} s; "
        f"messages process RSS: baseline {baseline / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB "
        f"(+{(peak - baseline) / MIB:.1f}), final {final / MIB:.1f} MiB "
        f"(+{(final - baseline) / MIB:.1f})"
    )
    assert messages_process.process.returncode is None, "the messages process died"
    assert peak <= baseline + PEAK_MARGIN, (
        f"peak RSS {peak / MIB:.0f} MiB exceeds baseline {baseline / MIB:.0f} MiB "
        f"+ {PEAK_MARGIN / MIB:.0f} MiB"
    )
    assert final <= baseline + FINAL_MARGIN, (
        f"RSS {final / MIB:.0f} MiB did not come back within {FINAL_MARGIN / MIB:.0f} MiB "
        f"of the baseline {baseline / MIB:.0f} MiB within {SETTLE_S:.0f} s"
    )
