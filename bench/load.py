"""Load generators that run in their own processes (the services' CPU is not theirs).

`run_clients` drives one scenario with N concurrent clients for a fixed time
and returns the latency of every call that started after the warm-up;
`run_subscribers` holds live streams and records when each message arrived.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import asyncpg
import grpc
import uvloop
from chat.v1 import messages_pb2, messages_pb2_grpc, threads_pb2, threads_pb2_grpc

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


async def _caller(spec: dict[str, Any], closers: list[Callable[[], Awaitable[object]]]) -> Call:
    kind = spec["kind"]
    if kind.startswith("sql_"):
        pool = await asyncpg.create_pool(
            spec["database_url"], min_size=spec["clients"], max_size=spec["clients"]
        )
        closers.append(pool.close)
        return _sql_call(kind, spec, pool)
    channel = grpc.aio.insecure_channel(spec["address"])
    closers.append(channel.close)
    if kind == "empty":
        empty: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/bench.Empty/Call"
        )
        return lambda i, n: empty(b"")
    if kind == "send":
        messages = messages_pb2_grpc.MessagesServiceStub(channel)
        targets = spec["targets"]  # [(thread, sender)]

        def send(i: int, n: int) -> Awaitable[object]:
            thread, sender = targets[(i + n * spec["clients"]) % len(targets)]
            return messages.SendMessage(
                messages_pb2.SendMessageRequest(thread_id=thread, user_id=sender, content="bench")
            )

        return send
    if kind == "history":
        messages = messages_pb2_grpc.MessagesServiceStub(channel)
        request = messages_pb2.ListMessagesRequest(
            thread_id=spec["thread"], page_size=50, page_token=spec["token"]
        )
        return lambda i, n: messages.ListMessages(request)
    threads = threads_pb2_grpc.ThreadsServiceStub(channel)
    if kind == "inbox":
        inbox = threads_pb2.ListThreadsRequest(user_id=spec["user"], page_size=50)
        return lambda i, n: threads.ListThreads(inbox)
    if kind == "unread":
        unread = threads_pb2.GetUnreadCountRequest(user_id=spec["user"])
        return lambda i, n: threads.GetUnreadCount(unread)
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


async def _drive(spec: dict[str, Any]) -> list[float]:
    closers: list[Callable[[], Awaitable[object]]] = []
    call = await _caller(spec, closers)
    latencies: list[float] = []
    start = time.perf_counter()
    measure_from = start + spec["warmup"]
    end = measure_from + spec["duration"]

    async def client(i: int) -> None:
        n = 0
        while (t0 := time.perf_counter()) < end:
            await call(i, n)
            n += 1
            if t0 >= measure_from:
                latencies.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(client(i) for i in range(spec["clients"])))
    finally:
        for close in closers:
            await close()
    return latencies


def run_clients(spec: dict[str, Any]) -> list[float]:
    return uvloop.run(_drive(spec))


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
