"""The inbox: order, pagination, unread counts, read state, and the cost bound."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from chat.v1 import threads_pb2
from google.protobuf import field_mask_pb2, timestamp_pb2

from services.threads import store
from tests.rpc_errors import as_user
from tests.threads.conftest import new_users, send

if TYPE_CHECKING:
    from tests.threads.conftest import Stub


async def group(threads: Stub, creator: str, *others: str, name: str = "t") -> str:
    reply = await threads.CreateThread(
        threads_pb2.CreateThreadRequest(name=name, creator_id=creator, participant_ids=others)
    )
    return reply.thread.id


async def inbox(threads: Stub, user: str, **kwargs: Any) -> list[threads_pb2.InboxThread]:
    rows: list[threads_pb2.InboxThread] = []
    token = ""
    while True:
        page = await threads.ListThreads(
            threads_pb2.ListThreadsRequest(user_id=user, page_token=token, **kwargs),
            metadata=as_user(user),
        )
        rows += page.threads
        token = page.next_page_token
        if not token:
            return rows


async def unread(threads: Stub, user: str) -> tuple[int, int]:
    reply = await threads.GetUnreadCount(
        threads_pb2.GetUnreadCountRequest(user_id=user), metadata=as_user(user)
    )
    return reply.total_unread, reply.unread_threads


async def test_inbox_order_pagination_and_archive(threads: Stub, db_pool: asyncpg.Pool) -> None:
    me, other = await new_users(db_pool, 2)
    names = [f"t{i}" for i in range(5)]
    ids = {name: await group(threads, other, me, name=name) for name in names}
    await send(db_pool, ids["t1"], other)
    await send(db_pool, ids["t3"], other)
    # Newest activity first: t3, t1 had messages; the rest by creation, newest first.
    expected = ["t3", "t1", "t4", "t2", "t0"]
    assert [r.thread.name for r in await inbox(threads, me, page_size=2)] == expected

    await threads.UpdateThread(
        threads_pb2.UpdateThreadRequest(
            thread=threads_pb2.Thread(id=ids["t1"], is_archived=True),
            update_mask=field_mask_pb2.FieldMask(paths=["is_archived"]),
        )
    )
    assert [r.thread.name for r in await inbox(threads, me)] == ["t3", "t4", "t2", "t0"]
    with_archived = await inbox(threads, me, include_archived=True)
    assert [r.thread.name for r in with_archived] == expected

    row = with_archived[0]
    assert (
        row.participant.user_id == me
        and row.participant.role == threads_pb2.PARTICIPANT_ROLE_MEMBER
    )
    err_call = threads.ListThreads(
        threads_pb2.ListThreadsRequest(user_id=other), metadata=as_user(me)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await err_call
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_unread_counts_follow_sends_reads_and_deletes(
    threads: Stub, db_pool: asyncpg.Pool
) -> None:
    me, ada, bob = await new_users(db_pool, 3)
    first = await group(threads, ada, me, bob)
    second = await group(threads, bob, me)
    for _ in range(3):
        await send(db_pool, first, ada)
    deleted = await send(db_pool, first, bob)
    await send(db_pool, second, bob)
    await send(db_pool, first, me)  # my own message: never unread, and moves my read mark
    assert await unread(threads, me) == (1, 1)  # only the second thread's message

    await send(db_pool, first, ada)
    await send(db_pool, first, bob)
    assert await unread(threads, me) == (3, 2)
    await db_pool.execute(
        "UPDATE messages SET status = 'deleted', content = '' WHERE id = $1", uuid.UUID(deleted)
    )
    late = await send(db_pool, first, bob)
    await db_pool.execute(
        "UPDATE messages SET status = 'deleted', content = '' WHERE id = $1", uuid.UUID(late)
    )
    rows = {r.thread.id: r.unread_count for r in await inbox(threads, me)}
    assert rows == {first: 2, second: 1}  # a deleted message is not unread

    marked = await threads.MarkRead(
        threads_pb2.MarkReadRequest(thread_id=first, user_id=me), metadata=as_user(me)
    )
    assert await unread(threads, me) == (1, 1)
    # An older read_at never moves the mark back; a future one is capped at the newest message.
    old = timestamp_pb2.Timestamp(seconds=1)
    again = await threads.MarkRead(
        threads_pb2.MarkReadRequest(thread_id=first, user_id=me, read_at=old), metadata=as_user(me)
    )
    assert again.participant.last_read_at == marked.participant.last_read_at
    future = timestamp_pb2.Timestamp(seconds=4_000_000_000)
    await threads.MarkRead(
        threads_pb2.MarkReadRequest(thread_id=second, user_id=me, read_at=future),
        metadata=as_user(me),
    )
    await send(db_pool, second, bob)
    assert await unread(threads, me) == (1, 1)  # sent after the clamped read mark

    # Archived threads do not count.
    await threads.UpdateThread(
        threads_pb2.UpdateThreadRequest(
            thread=threads_pb2.Thread(id=second, is_archived=True),
            update_mask=field_mask_pb2.FieldMask(paths=["is_archived"]),
        )
    )
    assert await unread(threads, me) == (0, 0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await threads.MarkRead(
            threads_pb2.MarkReadRequest(thread_id=first, user_id=ada), metadata=as_user(me)
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_unread_counts_are_exact_beyond_100(threads: Stub, db_pool: asyncpg.Pool) -> None:
    """No cap any more: 250 unread is 250, through the real service, and the
    deprecated `capped` fields are always false."""
    me, other = await new_users(db_pool, 2)
    thread = await group(threads, other, me)
    quiet = await group(threads, other, me, name="quiet")
    for _ in range(100):
        await send(db_pool, thread, other)
    # A writer other than the send (and older than the sends): 150 more, 10 deleted.
    await db_pool.execute(
        "INSERT INTO messages (thread_id, user_id, content, status, created_at) "
        "SELECT $1, $2, 'm', CASE WHEN g <= 10 THEN 'deleted' ELSE 'sent' END,"
        " now() - interval '1 hour' - make_interval(secs => g) FROM generate_series(1, 160) g",
        uuid.UUID(thread),
        uuid.UUID(other),
    )
    await send(db_pool, quiet, other)
    rows = {r.thread.name: r for r in await inbox(threads, me)}
    assert (rows["t"].unread_count, rows["t"].unread_count_capped) == (250, False)
    assert (rows["quiet"].unread_count, rows["quiet"].unread_count_capped) == (1, False)
    reply = await threads.GetUnreadCount(
        threads_pb2.GetUnreadCountRequest(user_id=me), metadata=as_user(me)
    )
    assert (reply.total_unread, reply.unread_threads, reply.capped) == (251, 2, False)
    # The sender has read their own; a mark in the middle leaves what is after it.
    assert await unread(threads, other) == (0, 0)
    middle = await db_pool.fetchval(
        "SELECT created_at FROM messages WHERE thread_id = $1 AND content = 'hi'"
        " ORDER BY created_at OFFSET 39 LIMIT 1",
        uuid.UUID(thread),
    )
    read_at = timestamp_pb2.Timestamp()
    read_at.FromDatetime(middle)
    await threads.MarkRead(
        threads_pb2.MarkReadRequest(thread_id=thread, user_id=me, read_at=read_at),
        metadata=as_user(me),
    )
    assert await unread(threads, me) == (60 + 1, 2)


async def _seed_backlog(
    db: asyncpg.Pool, user: str, other: str, threads: int, backlog: int
) -> None:
    """`threads` threads of two, each with `backlog` unread messages for `user`."""
    await db.execute(
        """
        WITH t AS (
            INSERT INTO threads (name, last_message_at)
            SELECT 'seeded', now() FROM generate_series(1, $3)
            RETURNING id
        ), p AS (
            INSERT INTO thread_participants (thread_id, user_id, role)
            SELECT t.id, u.id, 'member' FROM t, unnest(ARRAY[$1::uuid, $2::uuid]) AS u(id)
        )
        INSERT INTO messages (thread_id, user_id, content, created_at, seq, change_seq)
        SELECT t.id, $2, 'backlog', now() - make_interval(secs => g), $4 - g + 1, $4 - g + 1
        FROM t, generate_series(1, $4) g
        """,
        uuid.UUID(user),
        uuid.UUID(other),
        threads,
        backlog,
    )
    await db.execute("ANALYZE")


@pytest.mark.parametrize("backlog", [300, 3000])
async def test_inbox_and_totals_read_no_messages_whatever_the_backlog(
    db_pool: asyncpg.Pool, backlog: int
) -> None:
    """The inbox page and the totals read counters, never a message row, and are exact."""
    me, other = await new_users(db_pool, 2)
    await _seed_backlog(db_pool, me, other, threads=60, backlog=backlog)
    page_size = 50
    async with db_pool.acquire() as conn:
        raw = await conn.fetchval(
            f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {store.INBOX}",
            uuid.UUID(me),
            False,
            None,
            None,
            page_size + 1,
        )
        rows = await store.inbox(conn, uuid.UUID(me), include_archived=False, after=None, limit=51)
        totals = await store.unread_totals(conn, uuid.UUID(me))
        raw_totals = await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {store.UNREAD_TOTALS}", uuid.UUID(me)
        )
    assert '"Relation Name": "messages"' not in raw + raw_totals
    assert all(r.unread == backlog for r in rows)
    assert totals == (60 * backlog, 60)


@pytest.mark.parametrize(
    "read_at",
    [
        timestamp_pb2.Timestamp(seconds=1, nanos=-5),
        timestamp_pb2.Timestamp(seconds=1, nanos=1_000_000_000),
        timestamp_pb2.Timestamp(seconds=253_402_300_800),  # 10000-01-01
        timestamp_pb2.Timestamp(seconds=-62_135_596_801),  # before 0001-01-01
        timestamp_pb2.Timestamp(seconds=2**62),
    ],
    ids=["negative-nanos", "nanos-overflow", "after-9999", "before-0001", "huge"],
)
async def test_mark_read_out_of_range_is_invalid_argument(
    threads: Stub, db_pool: asyncpg.Pool, read_at: timestamp_pb2.Timestamp
) -> None:
    from tests.rpc_errors import error_of, violated_fields

    me, other = await new_users(db_pool, 2)
    created = await threads.GetOrCreateDirectThread(
        threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[me, other])
    )
    err = await error_of(
        threads.MarkRead(
            threads_pb2.MarkReadRequest(thread_id=created.thread.id, user_id=me, read_at=read_at),
            metadata=as_user(me),
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(err) == {"read_at"}
