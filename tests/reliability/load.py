"""Clients that behave as the README tells callers to, and the checks run after a fault.

A well-behaved client retries a send on UNAVAILABLE (and on a deadline, whose
outcome is unknown) with the same `request_id` and backoff, and resumes a stream
from the last cursor it saw when the stream ends with a resumable status.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import grpc
from chat.v1 import messages_pb2, messages_pb2_grpc, threads_pb2, threads_pb2_grpc

from tests.rpc_errors import as_user

# UNAVAILABLE: the database or the service is away. DEADLINE_EXCEEDED: the outcome
# is unknown. CANCELLED (not by us): a call the server accepted on the socket but
# had not handed to a handler when it shut down (grpc/grpc#41785), so it did
# nothing. With a request_id every one of them is safe to retry.
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,  # a lock wait or a deadlock: rolled back, nothing written
)
# A stream ending with these says "resume from your cursor".
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
RETRY_BUDGET_S = 120.0  # a send gives up (and the test fails) after this long
ATTACHMENTS_PER_SEND = 2


@dataclass
class Outcomes:
    """What callers saw: acknowledged sends and every status code, by count."""

    acknowledged: dict[str, str] = field(default_factory=dict)  # request_id -> message id
    retried: set[str] = field(default_factory=set)  # request_ids sent more than once
    codes: Counter[str] = field(default_factory=Counter)


async def send_reliably(
    stub: messages_pb2_grpc.MessagesServiceAsyncStub,
    request: messages_pb2.SendMessageRequest,
    outcomes: Outcomes,
) -> messages_pb2.Message:
    """Send until acknowledged, retrying with the same request_id and backoff."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + RETRY_BUDGET_S
    delay = 0.05
    while True:
        try:
            reply = await stub.SendMessage(request, metadata=as_user(request.user_id), timeout=10)
        except grpc.aio.AioRpcError as err:
            outcomes.codes[err.code().name] += 1
            if err.code() not in RETRYABLE or loop.time() > give_up:
                raise
            outcomes.retried.add(request.request_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            continue
        outcomes.codes["OK"] += 1
        outcomes.acknowledged[request.request_id] = reply.message.id
        return reply.message


def send_request(thread_id: str, user_id: str, text: str) -> messages_pb2.SendMessageRequest:
    return messages_pb2.SendMessageRequest(
        thread_id=thread_id,
        user_id=user_id,
        content=text,
        request_id=str(uuid.uuid4()),
        attachments=[
            messages_pb2.Attachment(
                url=f"https://files.example.com/{text}/{i}", type="text/plain", name=f"{i}.txt"
            )
            for i in range(ATTACHMENTS_PER_SEND)
        ],
    )


@dataclass
class StreamLog:
    """What one resuming stream reader saw."""

    thread_id: str
    cursor: str
    created: list[str] = field(default_factory=list)
    endings: Counter[str] = field(default_factory=Counter)


async def follow(
    stub: messages_pb2_grpc.MessagesServiceAsyncStub, log: StreamLog, user_id: str
) -> None:
    """Read a thread's events forever, resuming from the last cursor after a fault."""
    delay = 0.05
    while True:
        call = stub.StreamThreadMessages(
            messages_pb2.StreamThreadMessagesRequest(thread_id=log.thread_id, after=log.cursor),
            metadata=as_user(user_id),
        )
        try:
            async for event in call:
                delay = 0.05
                log.cursor = event.cursor
                if event.HasField("created"):
                    log.created.append(event.created.id)
        except grpc.aio.AioRpcError as err:
            log.endings[err.code().name] += 1
            if err.code() not in RESUMABLE:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def wait_until_caught_up(logs: list[StreamLog], expected: dict[str, list[str]]) -> None:
    """Bounded wait until every stream has seen as many messages as its thread holds."""
    for _ in range(1200):
        if all(len(log.created) >= len(expected[log.thread_id]) for log in logs):
            return
        await asyncio.sleep(0.05)


async def created_in_order(conn: asyncpg.Connection, thread_id: str, after_seq: int) -> list[str]:
    rows = await conn.fetch(
        "SELECT id FROM messages WHERE thread_id = $1 AND seq > $2 ORDER BY seq",
        uuid.UUID(thread_id),
        after_seq,
    )
    return [str(r["id"]) for r in rows]


async def assert_consistent(
    conn: asyncpg.Connection,
    threads: threads_pb2_grpc.ThreadsServiceAsyncStub,
    outcomes: Outcomes,
    *,
    thread_ids: list[str],
    reader: str,
) -> None:
    """The database agrees with what callers were told, and with itself."""
    ids = [uuid.UUID(t) for t in thread_ids]
    # Every acknowledged send is there exactly once; nothing unacknowledged is.
    rows = await conn.fetch(
        "SELECT request_id, id FROM messages WHERE thread_id = ANY($1::uuid[])", ids
    )
    stored = Counter(str(r["request_id"]) for r in rows if r["request_id"] is not None)
    assert all(n == 1 for n in stored.values()), "a request_id was stored twice"
    by_request = {str(r["request_id"]): str(r["id"]) for r in rows if r["request_id"]}
    assert by_request == outcomes.acknowledged
    # No message without its attachments.
    partial = await conn.fetchval(
        """
        SELECT count(*) FROM (
            SELECT m.id FROM messages m LEFT JOIN message_attachments a ON a.message_id = m.id
            WHERE m.thread_id = ANY($1::uuid[]) AND m.request_id IS NOT NULL
            GROUP BY m.id HAVING count(a.id) <> $2
        ) broken
        """,
        ids,
        ATTACHMENTS_PER_SEND,
    )
    assert partial == 0, f"{partial} messages without all their attachments"
    # Threads agree with their messages.
    drift = await conn.fetchval(
        """
        SELECT count(*) FROM threads t
        WHERE t.id = ANY($1::uuid[])
          AND (t.last_message_at IS DISTINCT FROM
                 (SELECT max(created_at) FROM messages m WHERE m.thread_id = t.id)
               OR t.last_seq < (SELECT coalesce(max(change_seq), 0) FROM messages m
                                WHERE m.thread_id = t.id))
        """,
        ids,
    )
    assert drift == 0, f"{drift} threads disagree with their messages"
    # Unread counts agree with the messages (the reader never reads nor writes).
    per_thread = await conn.fetch(
        "SELECT thread_id, count(*) AS n FROM messages "
        "WHERE thread_id = ANY($1::uuid[]) AND status <> 'deleted' GROUP BY thread_id",
        ids,
    )
    expected_total = sum(r["n"] for r in per_thread)  # exact, no cap
    unread = await threads.GetUnreadCount(
        threads_pb2.GetUnreadCountRequest(user_id=reader), metadata=as_user(reader)
    )
    assert unread.total_unread == expected_total
    assert not unread.capped  # deprecated, always false
