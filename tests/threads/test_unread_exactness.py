"""Unread counters stay exact under every writer, concurrently.

The counters (threads.message_count, thread_participants.read_count; see
db/functions/unread.sql) are compared after every round with the SQL definition
of an unread count, computed from scratch: the others' messages after the
participant's read mark, not deleted. Each round runs a few hundred random
operations from several concurrent workers through the real services (sends,
replies, edits, deletions, MarkRead with and without a time, joins, rejoins,
leaves, removals, user deletions), plus writers that are not the services (a
bulk INSERT, `db archive` and restore), and checks GetUnreadCount and the inbox
against the definition too.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from chat.v1 import (
    messages_pb2,
    messages_pb2_grpc,
    threads_pb2,
    threads_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)
from google.protobuf import field_mask_pb2, timestamp_pb2

from db.archive import archive_batch, restore_thread
from tests.factories import new_users
from tests.rpc_errors import as_user

ROUNDS = 4
WORKERS = 6
OPERATIONS_PER_WORKER = 60

# Every participant's counter-derived count next to the definition.
MISMATCHES = """
SELECT p.thread_id, p.user_id, p.last_read_at, t.message_count, p.read_count,
       t.message_count - p.read_count AS counted,
       (SELECT count(*) FROM messages m
        WHERE m.thread_id = p.thread_id
          AND m.created_at > coalesce(p.last_read_at, '-infinity')
          AND m.user_id <> p.user_id AND m.status <> 'deleted') AS defined
FROM thread_participants p JOIN threads t ON t.id = p.thread_id
"""
THREAD_COUNTS = """
SELECT t.id, t.message_count,
       (SELECT count(*) FROM messages m WHERE m.thread_id = t.id AND m.status <> 'deleted') AS n
FROM threads t
"""
DEFINED_TOTALS = """
SELECT p.user_id, count(*) AS threads, sum(u.n) AS total FROM thread_participants p
JOIN threads t ON t.id = p.thread_id
CROSS JOIN LATERAL (
    SELECT count(*) AS n FROM messages m
    WHERE m.thread_id = p.thread_id
      AND m.created_at > coalesce(p.last_read_at, '-infinity')
      AND m.user_id <> p.user_id AND m.status <> 'deleted') u
WHERE NOT t.is_archived AND u.n > 0
GROUP BY p.user_id
"""


async def assert_exact(db: asyncpg.Pool, threads: threads_pb2_grpc.ThreadsServiceAsyncStub) -> int:
    """Counters = definition for every participant and thread; the API agrees.
    Returns how many participants have unread messages (so the test sees some)."""
    rows = await db.fetch(MISMATCHES)
    wrong = [dict(r) for r in rows if r["counted"] != r["defined"]]
    assert wrong == [], f"{len(wrong)} of {len(rows)} participants miscounted: {wrong[:5]}"
    counts = [dict(r) for r in await db.fetch(THREAD_COUNTS) if r["message_count"] != r["n"]]
    assert counts == [], counts
    archived = await db.fetchval(
        "SELECT (SELECT count(*) FROM archived_threads WHERE message_count <> 0)"
        " + (SELECT count(*) FROM archived_thread_participants WHERE read_count <> 0)"
    )
    assert archived == 0
    defined = {
        r["user_id"]: (int(r["total"]), int(r["threads"])) for r in await db.fetch(DEFINED_TOTALS)
    }
    for user_id in await db.fetch("SELECT id FROM users"):
        user = str(user_id["id"])
        reply = await threads.GetUnreadCount(threads_pb2.GetUnreadCountRequest(user_id=user))
        assert (reply.total_unread, reply.unread_threads) == defined.get(user_id["id"], (0, 0))
        assert not reply.capped
        page = await threads.ListThreads(
            threads_pb2.ListThreadsRequest(user_id=user, page_size=200, include_archived=True)
        )
        by_thread = {
            (r["thread_id"], r["user_id"]): r["defined"] for r in rows if str(r["user_id"]) == user
        }
        for item in page.threads:
            key = (uuid.UUID(item.thread.id), user_id["id"])
            assert (item.unread_count, item.unread_count_capped) == (by_thread[key], False)
    return sum(1 for r in rows if r["defined"] > 0)


class World:
    """The users, groups and messages the workers pick from (ids may be gone)."""

    def __init__(self, channels: dict[str, grpc.aio.Channel], seed: int) -> None:
        self.rng = random.Random(seed)
        self.threads: threads_pb2_grpc.ThreadsServiceAsyncStub = (
            threads_pb2_grpc.ThreadsServiceStub(channels["threads"])
        )
        self.messages: messages_pb2_grpc.MessagesServiceAsyncStub = (
            messages_pb2_grpc.MessagesServiceStub(channels["messages"])
        )
        self.users: users_pb2_grpc.UsersServiceAsyncStub = users_pb2_grpc.UsersServiceStub(
            channels["users"]
        )
        self.people: list[str] = []
        self.groups: list[str] = []
        self.sent: list[str] = []
        self.done: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def pick(self, items: list[str]) -> str:
        return self.rng.choice(items)

    async def operation(self) -> None:
        kind = self.rng.choices(
            ["send", "reply", "edit", "delete", "mark", "mark_at", "join", "leave", "remove"],
            weights=[30, 6, 6, 10, 10, 8, 6, 4, 3],
        )[0]
        thread, user = self.pick(self.groups), self.pick(self.people)
        try:
            if kind in ("send", "reply"):
                parent = self.pick(self.sent) if kind == "reply" and self.sent else ""
                sent = await self.messages.SendMessage(
                    messages_pb2.SendMessageRequest(
                        thread_id=thread, user_id=user, content="hi", parent_id=parent
                    ),
                    metadata=as_user(user),
                )
                self.sent.append(sent.message.id)
            elif kind == "edit" and self.sent:
                await self.messages.UpdateMessage(
                    messages_pb2.UpdateMessageRequest(
                        message=messages_pb2.Message(id=self.pick(self.sent), content="edited"),
                        update_mask=field_mask_pb2.FieldMask(paths=["content"]),
                    )
                )
            elif kind == "delete" and self.sent:
                await self.messages.DeleteMessage(
                    messages_pb2.DeleteMessageRequest(id=self.pick(self.sent))
                )
            elif kind == "mark":
                await self.threads.MarkRead(
                    threads_pb2.MarkReadRequest(thread_id=thread, user_id=user),
                    metadata=as_user(user),
                )
            elif kind == "mark_at":
                # Often exactly a message's time (the mark covers it), else a time between.
                at = datetime.now(UTC) - timedelta(milliseconds=self.rng.randrange(0, 3000))
                if self.sent and self.rng.random() < 0.6:
                    message = await self.messages.GetMessage(
                        messages_pb2.GetMessageRequest(id=self.pick(self.sent))
                    )
                    thread = message.message.thread_id
                    at = message.message.created_at.ToDatetime(tzinfo=UTC)
                read_at = timestamp_pb2.Timestamp()
                read_at.FromDatetime(at)
                await self.threads.MarkRead(
                    threads_pb2.MarkReadRequest(thread_id=thread, user_id=user, read_at=read_at),
                    metadata=as_user(user),
                )
            elif kind == "join":
                await self.threads.AddParticipants(
                    threads_pb2.AddParticipantsRequest(thread_id=thread, user_ids=[user])
                )
            elif kind == "leave":
                await self.threads.RemoveParticipant(
                    threads_pb2.RemoveParticipantRequest(thread_id=thread, user_id=user),
                    metadata=as_user(user),
                )
            elif kind == "remove":
                await self.threads.RemoveParticipant(
                    threads_pb2.RemoveParticipantRequest(thread_id=thread, user_id=user)
                )
            else:
                return
            self.done[kind] += 1
        except grpc.aio.AioRpcError as exc:
            # Refusals the random choice makes likely (not a participant, a deleted
            # message or user, the last owner, a lock waited on too long).
            assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), exc
            self.refused[kind] += 1

    async def delete_user(self) -> None:
        user = self.pick(self.people)
        try:
            await self.users.DeleteUser(users_pb2.DeleteUserRequest(id=user))
            self.done["delete_user"] += 1
        except grpc.aio.AioRpcError as exc:
            assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), exc
            self.refused["delete_user"] += 1

    async def worker(self, operations: int, deletes_user: bool) -> None:
        for i in range(operations):
            if deletes_user and i == operations // 2:
                await self.delete_user()
            await self.operation()


async def bulk_insert(db: asyncpg.Pool, thread: str, people: list[str]) -> None:
    """A writer that is not the send: rows inserted straight into messages, some
    before existing read marks, some deleted already, in one statement."""
    await db.execute(
        """
        INSERT INTO messages (thread_id, user_id, content, status, created_at)
        SELECT $1, u.id, 'bulk', CASE WHEN g % 4 = 0 THEN 'deleted' ELSE 'sent' END,
               now() - make_interval(secs => g * 0.7)
        FROM generate_series(1, 12) g
        JOIN LATERAL (
            SELECT p.user_id AS id FROM thread_participants p
            WHERE p.thread_id = $1 AND p.user_id = ANY ($2::uuid[])
            ORDER BY md5(p.user_id::text || g::text) LIMIT 1) u ON true
        """,
        uuid.UUID(thread),
        [uuid.UUID(p) for p in people],
    )


async def test_counters_match_the_definition_under_concurrent_writers(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool
) -> None:
    world = World(channels, seed=18)
    world.people = await new_users(db_pool, 10)
    for n in range(4):
        members = world.rng.sample(world.people, 6)
        reply = await world.threads.CreateThread(
            threads_pb2.CreateThreadRequest(
                name=f"g{n}", creator_id=members[0], participant_ids=members[1:]
            )
        )
        world.groups.append(reply.thread.id)
    await assert_exact(db_pool, world.threads)

    with_unread = 0
    for round_no in range(ROUNDS):
        await asyncio.gather(
            *(world.worker(OPERATIONS_PER_WORKER, deletes_user=(w == 0)) for w in range(WORKERS)),
            bulk_insert(db_pool, world.pick(world.groups), world.people),
        )
        with_unread = max(with_unread, await assert_exact(db_pool, world.threads))
        # Not a service: archive the thread with the oldest activity, check, restore it.
        async with db_pool.acquire() as conn:
            moved, _ = await archive_batch(
                conn, datetime.now(UTC) + timedelta(hours=1), batch_messages=1, max_threads=1
            )
            assert moved == 1
            await assert_exact(db_pool, world.threads)
            archived = await conn.fetchval("SELECT id FROM archived_threads LIMIT 1")
            await restore_thread(conn, archived)
        await assert_exact(db_pool, world.threads)
        # Deleted users are replaced, and join (or rejoin) some groups.
        alive = {str(r["id"]) for r in await db_pool.fetch("SELECT id FROM users")}
        world.people = [p for p in world.people if p in alive]
        world.people += await new_users(db_pool, 10 - len(world.people))
        for thread in world.groups:
            await world.threads.AddParticipants(
                threads_pb2.AddParticipantsRequest(
                    thread_id=thread, user_ids=world.rng.sample(world.people, 2)
                )
            )
        await assert_exact(db_pool, world.threads)
        del round_no

    # The run did what it says: every kind of write happened, and counts were not all 0.
    assert with_unread > 0
    kinds = {"send", "reply", "edit", "delete", "mark", "mark_at", "join", "leave", "remove"}
    assert kinds | {"delete_user"} <= set(world.done), (world.done, world.refused)
    assert sum(world.done.values()) >= 300, world.done
