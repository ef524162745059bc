"""Load generators that run in their own processes (the services' CPU is not theirs).

`run_clients` drives one scenario with N concurrent clients on a wall-clock
schedule the bench sets (start, measure from, end: so the bench reads the
services' and PostgreSQL's CPU over the same window) and returns the latency of
every call that started in the measured window and this process's own CPU over
it; `run_subscribers` holds live streams and records when each message arrived.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import asyncpg
import grpc
import uvloop
from chat.v1 import (
    messages_pb2,
    messages_pb2_grpc,
    threads_pb2,
    threads_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)

from services.messages.service import DEFINITION as MESSAGES

# The ceilings' own statements, never the messages store's constants (their
# shape is the service's business): the send function the service calls, and a
# history page as the index serves it (one keyset range scan on
# idx_messages_thread), then the page's attachments. The service's page query
# also stops at a byte budget; this one does not, so it is a ceiling.
SEND_SQL = "SELECT * FROM chat_send_message($1, $2, $3, $4, $5, $6, $7)"
PAGE_SQL = """
    SELECT id, thread_id, user_id, content, parent_id, status, metadata, created_at,
           updated_at, seq, change_seq
    FROM messages
    WHERE thread_id = $1
      AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
    ORDER BY created_at DESC, id DESC
    LIMIT $4
"""
ATTACHMENTS_SQL = """
    SELECT id, message_id, url, type, name, size, metadata, created_at
    FROM message_attachments WHERE message_id = ANY ($1::uuid[])
    ORDER BY created_at, id
"""

Call = Callable[[int, int], Awaitable[object]]
# The ceilings' backends are named so the bench can read their CPU (bench.cpu).
SQL_APPLICATION_NAME = "chat-bench-sql"
SESSION_SETTINGS = dict(MESSAGES.session_settings)
USER_ID_HEADER = "x-user-id"  # an end-user call (services/common/identity.py)


async def _caller(spec: dict[str, Any], closers: list[Callable[[], Awaitable[object]]]) -> Call:
    kind = spec["kind"]
    if kind.startswith("sql_"):
        pool = await asyncpg.create_pool(
            spec["database_url"],
            min_size=spec["clients"],
            max_size=spec["clients"],
            # As the messages service's pool: no NOTIFY in a send's transaction.
            server_settings={"application_name": SQL_APPLICATION_NAME, **SESSION_SETTINGS},
        )
        closers.append(pool.close)
        return _sql_call(kind, spec, pool)
    # Several channels (client i uses channel i % channels) each with its own
    # subchannel pool, so each is its own connection: gRPC's global subchannel
    # pool would otherwise share one connection between them, and a service of
    # several SO_REUSEPORT workers would see one of them do all the work.
    count = max(1, int(spec.get("channels", 1)))
    options = [("grpc.use_local_subchannel_pool", 1)] if count > 1 else []
    channels = [grpc.aio.insecure_channel(spec["address"], options=options) for _ in range(count)]
    for channel in channels:
        closers.append(channel.close)
    # An end-user call names its user (the service adds the active-user lookup);
    # without one it is a trusted service call.
    caller = spec.get("caller")
    metadata = ((USER_ID_HEADER, caller),) if caller else None

    def pick(i: int) -> grpc.aio.Channel:
        return channels[i % count]

    if kind == "empty":
        empties: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
            c.unary_unary("/bench.Empty/Call") for c in channels
        ]
        return lambda i, n: empties[i % count](b"")
    if kind == "get_user":
        users = [users_pb2_grpc.UsersServiceStub(c) for c in channels]
        ids = spec["users"]

        def get_user(i: int, n: int) -> Awaitable[object]:
            request = users_pb2.GetUserRequest(id=ids[(i + n * spec["clients"]) % len(ids)])
            return users[i % count].GetUser(request, metadata=metadata)

        return get_user
    if kind == "send":
        senders = [messages_pb2_grpc.MessagesServiceStub(c) for c in channels]
        targets = spec["targets"]  # [(thread, sender)]

        def send(i: int, n: int) -> Awaitable[object]:
            thread, sender = targets[(i + n * spec["clients"]) % len(targets)]
            return senders[i % count].SendMessage(
                messages_pb2.SendMessageRequest(thread_id=thread, user_id=sender, content="bench"),
                metadata=metadata,
            )

        return send
    if kind == "history":
        readers = [messages_pb2_grpc.MessagesServiceStub(c) for c in channels]
        request = messages_pb2.ListMessagesRequest(
            thread_id=spec["thread"], page_size=50, page_token=spec["token"]
        )
        return lambda i, n: readers[i % count].ListMessages(request, metadata=metadata)
    threads = threads_pb2_grpc.ThreadsServiceStub(pick(0))
    if kind == "inbox":
        inbox = threads_pb2.ListThreadsRequest(user_id=spec["user"], page_size=50)
        return lambda i, n: threads.ListThreads(inbox, metadata=metadata)
    if kind == "unread":
        unread = threads_pb2.GetUnreadCountRequest(user_id=spec["user"])
        return lambda i, n: threads.GetUnreadCount(unread, metadata=metadata)
    raise ValueError(kind)


def _sql_call(kind: str, spec: dict[str, Any], pool: asyncpg.Pool) -> Call:
    """The statements the service issues for the same request, straight through asyncpg."""
    if kind == "sql_send":
        targets = spec["targets"]

        async def send(i: int, n: int) -> object:
            thread, sender = targets[(i + n * spec["clients"]) % len(targets)]
            async with pool.acquire() as conn:
                row = await conn.fetchrow(
                    SEND_SQL, UUID(thread), UUID(sender), "bench", None, None, None, "[]"
                )
                assert row is not None
                return row

        return send
    thread = UUID(spec["thread"])
    position = spec.get("position")

    async def page(i: int, n: int) -> object:
        async with pool.acquire() as conn:
            rows = await conn.fetch(PAGE_SQL, thread, *(position or (None, None)), 51)
            return await conn.fetch(ATTACHMENTS_SQL, [r["id"] for r in rows])

    return page


def _cpu_seconds() -> float:
    """This process's CPU (every thread: gRPC's own included), in seconds."""
    t = os.times()
    return t.user + t.system


def _wait_for_file(path: str, timeout_s: float) -> None:
    until = time.time() + timeout_s
    while not os.path.exists(path) and time.time() < until:
        time.sleep(0.02)


async def _drive(spec: dict[str, Any]) -> dict[str, Any]:
    """Calls from `start_at` to `end` (time.time()); the latencies of the calls
    started in [measure_from, end), when each started (wall clock), and this
    process's CPU over the window with the times it was read. Connections stay
    open until the bench's `release` file exists (it has read the CPU of the
    database backends serving them by then: a backend that exits takes its CPU
    figure with it)."""
    closers: list[Callable[[], Awaitable[object]]] = []
    call = await _caller(spec, closers)
    latencies: list[float] = []
    starts: list[float] = []
    late = max(0.0, time.time() - spec["start_at"])
    await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    # The schedule is wall-clock (shared with the bench and the other client
    # process); latencies are read on the monotonic clock.
    offset = time.perf_counter() - time.time()
    measure_from = spec["measure_from"] + offset
    end = spec["end"] + offset
    cpu: dict[str, float] = {}

    async def clock() -> None:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        cpu["from"], cpu["from_at"] = _cpu_seconds(), time.time()
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        cpu["to"], cpu["to_at"] = _cpu_seconds(), time.time()

    async def client(i: int) -> None:
        n = 0
        while (t0 := time.perf_counter()) < end:
            await call(i, n)
            n += 1
            if t0 >= measure_from:
                latencies.append(time.perf_counter() - t0)
                starts.append(t0 - offset)

    try:
        await asyncio.gather(clock(), *(client(i) for i in range(spec["clients"])))
        if spec.get("release"):
            await asyncio.to_thread(_wait_for_file, spec["release"], 30.0)
    finally:
        for close in closers:
            await close()
    return {
        "latencies": latencies,
        "starts": starts,
        "cpu_s": cpu["to"] - cpu["from"],
        "cpu_from_at": cpu["from_at"],
        "cpu_to_at": cpu["to_at"],
        "late_s": late,
    }


def run_clients(spec: dict[str, Any]) -> dict[str, Any]:
    return uvloop.run(_drive(spec))


def ready() -> int:
    """A no-op the bench runs in each pool process first, so they are up (imports done)."""
    time.sleep(0.5)
    return os.getpid()


async def _subscribe(spec: dict[str, Any], ready: Any, results: Any) -> None:
    channel = grpc.aio.insecure_channel(spec["address"])
    stub = messages_pb2_grpc.MessagesServiceStub(channel)
    received: dict[str, list[float]] = {}
    ended: dict[str, int] = {}  # streams the server ended, by status code

    async def one(user: str | None) -> None:
        if user is None:
            call: Any = stub.StreamThreadMessages(
                messages_pb2.StreamThreadMessagesRequest(thread_id=spec["thread"])
            )
            field = "created"
        else:
            call = stub.StreamUserEvents(messages_pb2.StreamUserEventsRequest(user_id=user))
            field = "message_created"
        try:
            async for event in call:
                if event.HasField(field):  # not the caught_up handshake
                    message = getattr(event, field)
                    received.setdefault(message.id, []).append(time.time())
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                ended[err.code().name] = ended.get(err.code().name, 0) + 1

    # A thread's streams (`thread`, `streams` of them) or one user stream per user.
    users: list[str | None] = spec.get("users") or [None] * spec["streams"]
    tasks = [asyncio.create_task(one(user)) for user in users]
    await asyncio.sleep(spec["settle"])
    ready.put(len(tasks))
    await asyncio.sleep(max(0.0, spec["until"] - time.time()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    results.put({"received": received, "ended": ended})


def run_subscribers(spec: dict[str, Any], ready: Any, results: Any) -> None:
    uvloop.run(_subscribe(spec, ready, results))


async def _read_empty_streams(spec: dict[str, Any], ready: Any, go: Any, results: Any) -> None:
    """`streams` calls of bench.Empty/Stream, `events` events each, read to their
    end once the bench says go (one item on `go` per process); puts the events read."""
    channel = grpc.aio.insecure_channel(spec["address"])
    await channel.channel_ready()
    stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
        "/bench.Empty/Stream"
    )
    request = int(spec["events"]).to_bytes(4, "little")

    async def one() -> int:
        return sum([1 async for _ in stream(request)])

    ready.put(os.getpid())
    await asyncio.to_thread(go.get, True, 120)
    counts = await asyncio.gather(*(one() for _ in range(spec["streams"])))
    await channel.close()
    results.put(sum(counts))


def run_empty_stream_readers(spec: dict[str, Any], ready: Any, go: Any, results: Any) -> None:
    uvloop.run(_read_empty_streams(spec, ready, go, results))
