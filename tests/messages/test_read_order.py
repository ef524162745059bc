"""Read marks are commit-ordered: a message acknowledged after MarkRead returned is unread.

A send stamps `created_at` under the thread row lock but commits later. A read
mark taken from the clock while a send is between the two could be newer than a
message that was not yet visible, which would then never count as unread. Here
a held lock on the sender's membership row parks the send after its stamp and
before its commit, and MarkRead runs inside that window.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from chat.v1 import messages_pb2, threads_pb2, threads_pb2_grpc
from google.protobuf import timestamp_pb2

from services.common.settings import ServiceSettings
from services.threads.service import DEFINITION as THREADS
from tests.conftest import running
from tests.messages.conftest import Room, new_room
from tests.rpc_errors import as_user

if TYPE_CHECKING:
    from tests.messages.conftest import Stub

    ThreadsStub = threads_pb2_grpc.ThreadsServiceAsyncStub

# What the reader's unread count must be, counted straight from the tables.
UNREAD_IN_SQL = """
    SELECT count(*) FROM messages m
    JOIN thread_participants p ON p.thread_id = m.thread_id
    WHERE p.thread_id = $1 AND p.user_id = $2
      AND m.created_at > coalesce(p.last_read_at, '-infinity')
      AND m.user_id <> p.user_id AND m.status <> 'deleted'
"""


@pytest.fixture
async def threads(service_settings: ServiceSettings) -> AsyncIterator[ThreadsStub]:
    async with running(THREADS, service_settings) as (_, channel):
        yield threads_pb2_grpc.ThreadsServiceStub(channel)


async def _waiting_on_lock(db: asyncpg.Pool, fragment: str) -> bool:
    return bool(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND position($1 in query) > 0",
            fragment,
        )
    )


async def _until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(2000):
        if await condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


async def _agree(threads: ThreadsStub, db: asyncpg.Pool, room: Room) -> int:
    """The reader's unread count, checked equal in SQL, the inbox and GetUnreadCount."""
    reader = room.member
    in_sql = await db.fetchval(UNREAD_IN_SQL, uuid.UUID(room.thread_id), uuid.UUID(reader))
    totals = await threads.GetUnreadCount(
        threads_pb2.GetUnreadCountRequest(user_id=reader), metadata=as_user(reader)
    )
    inbox = await threads.ListThreads(
        threads_pb2.ListThreadsRequest(user_id=reader), metadata=as_user(reader)
    )
    in_inbox = {row.thread.id: row.unread_count for row in inbox.threads}
    assert totals.total_unread == in_sql == in_inbox[room.thread_id]
    return int(in_sql)


@pytest.mark.parametrize("read_at", ["unset", "clock"])
async def test_message_acknowledged_after_mark_read_returned_is_unread(
    messages: Stub, threads: ThreadsStub, db_pool: asyncpg.Pool, read_at: str
) -> None:
    """MarkRead inside a send's stamp-to-commit window, for 10 sends in a row.

    Whatever the order MarkRead and the send finish in, the outcome must be one a
    serial order explains: if MarkRead returned while the send was still
    uncommitted, the message is unread; otherwise the mark covers it.
    """
    room = await new_room(db_pool)
    returned_first = 0
    for trial in range(10):
        blocker = await db_pool.acquire()
        tx = blocker.transaction()
        await tx.start()
        # The send's last step updates the sender's membership row: hold it.
        await blocker.execute(
            "SELECT 1 FROM thread_participants WHERE thread_id = $1 AND user_id = $2 FOR UPDATE",
            uuid.UUID(room.thread_id),
            uuid.UUID(room.owner),
        )
        sent = asyncio.ensure_future(
            messages.SendMessage(
                messages_pb2.SendMessageRequest(
                    thread_id=room.thread_id, user_id=room.owner, content=f"m{trial}"
                ),
                metadata=as_user(room.owner),
            )
        )
        try:
            await _until(lambda: _waiting_on_lock(db_pool, "chat_send_message"), "send parked")
            request = threads_pb2.MarkReadRequest(thread_id=room.thread_id, user_id=room.member)
            if read_at == "clock":
                request.read_at.CopyFrom(_now())
            marked = asyncio.ensure_future(threads.MarkRead(request, metadata=as_user(room.member)))

            async def settled(marked: asyncio.Future[Any] = marked) -> bool:
                return marked.done() or await _waiting_on_lock(db_pool, "FOR SHARE")

            await _until(settled, "MarkRead returned or waits")
            mark_returned_while_uncommitted = marked.done()
        finally:
            await tx.rollback()
            await db_pool.release(blocker)
        message = (await sent).message
        mark = (await marked).participant.last_read_at
        created, read = message.created_at.ToDatetime(), mark.ToDatetime()
        if mark_returned_while_uncommitted:
            returned_first += 1
            assert created > read, f"trial {trial}: acknowledged after MarkRead, yet read"
            assert await _agree(threads, db_pool, room) == 1
        else:
            assert created <= read
            assert await _agree(threads, db_pool, room) == 0
        await threads.MarkRead(
            threads_pb2.MarkReadRequest(thread_id=room.thread_id, user_id=room.member),
            metadata=as_user(room.member),
        )
    # The mark waits for the send in flight (the share lock on the thread row).
    assert returned_first == 0


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


async def test_counts_agree_under_interleaved_sends_and_reads(
    messages: Stub, threads: ThreadsStub, db_pool: asyncpg.Pool
) -> None:
    """200 rounds of a send racing a MarkRead: every count agrees with SQL, and a send
    issued after MarkRead returned is always unread."""
    room = await new_room(db_pool)
    for trial in range(200):
        send = messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=room.thread_id, user_id=room.owner, content=f"r{trial}"
            ),
            metadata=as_user(room.owner),
        )
        mark = threads.MarkRead(
            threads_pb2.MarkReadRequest(thread_id=room.thread_id, user_id=room.member),
            metadata=as_user(room.member),
        )
        if trial % 2:
            await asyncio.gather(send, mark)
        else:
            await asyncio.gather(mark, send)
        unread = await _agree(threads, db_pool, room)
        assert unread in (0, 1)
        after = await messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=room.thread_id, user_id=room.owner, content=f"after{trial}"
            ),
            metadata=as_user(room.owner),
        )
        assert await _agree(threads, db_pool, room) == unread + 1, after.message.id
        await threads.MarkRead(
            threads_pb2.MarkReadRequest(thread_id=room.thread_id, user_id=room.member),
            metadata=as_user(room.member),
        )
        assert await _agree(threads, db_pool, room) == 0
