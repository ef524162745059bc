"""The message rules under races: every change of a message serialises on its thread."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import asyncpg
import grpc
from chat.v1 import messages_pb2

from tests.messages.conftest import Room, new_room
from tests.rpc_errors import as_user, error_info

if TYPE_CHECKING:
    from tests.messages.conftest import Stub


def attachment(i: int = 0) -> messages_pb2.Attachment:
    return messages_pb2.Attachment(url=f"https://x.io/{i}", type="t", name=f"n{i}", size=1)


async def outcome(call: Awaitable[object]) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return f"{err.code().name}:{error_info(err).reason}"
    return "OK"


async def a_message(messages: Stub, room: Room, attachments: int = 0) -> str:
    reply = await messages.SendMessage(
        messages_pb2.SendMessageRequest(
            thread_id=room.thread_id,
            user_id=room.member,
            content="x",
            attachments=[attachment(i) for i in range(attachments)],
        ),
        metadata=as_user(room.member),
    )
    return reply.message.id


def add(messages: Stub, room: Room, message_id: str, i: int = 0) -> Awaitable[object]:
    return messages.AddAttachment(
        messages_pb2.AddAttachmentRequest(message_id=message_id, attachment=attachment(i)),
        metadata=as_user(room.member),
    )


async def test_the_attachment_limit_holds_under_concurrent_adds(
    messages: Stub, room: Room, db_pool: asyncpg.Pool
) -> None:
    """30 adds at once to a message with 19 attachments: exactly one fits."""
    message_id = await a_message(messages, room, attachments=19)
    results = Counter(
        await asyncio.gather(*(outcome(add(messages, room, message_id, i)) for i in range(30)))
    )
    assert results == {"OK": 1, "FAILED_PRECONDITION:TOO_MANY_ATTACHMENTS": 29}
    count = await db_pool.fetchval(
        "SELECT count(*) FROM message_attachments WHERE message_id = $1", uuid.UUID(message_id)
    )
    assert count == 20


async def test_a_tombstone_never_keeps_an_attachment(
    messages: Stub, room: Room, db_pool: asyncpg.Pool
) -> None:
    """DeleteMessage racing AddAttachment, 50 times."""
    results: Counter[str] = Counter()
    for i in range(50):
        message_id = await a_message(messages, room)
        delete = messages.DeleteMessage(
            messages_pb2.DeleteMessageRequest(id=message_id), metadata=as_user(room.member)
        )
        if i % 2:
            added, deleted = await asyncio.gather(
                outcome(add(messages, room, message_id)), outcome(delete)
            )
        else:
            deleted, added = await asyncio.gather(
                outcome(delete), outcome(add(messages, room, message_id))
            )
        assert deleted == "OK"
        results[added] += 1
        left = await db_pool.fetchval(
            "SELECT count(*) FROM message_attachments WHERE message_id = $1",
            uuid.UUID(message_id),
        )
        assert left == 0
    assert set(results) <= {"OK", "FAILED_PRECONDITION:MESSAGE_DELETED"}


async def waiting_on_a_lock(db: asyncpg.Pool) -> None:
    """Bounded wait until a messages-service backend waits on a row lock."""
    for _ in range(1000):
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chat-messages' "
            "AND wait_event_type = 'Lock' AND datname = current_database()"
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the change never waited on the thread's lock")


async def test_changes_racing_the_threads_deletion_are_not_found(
    messages: Stub, db_pool: asyncpg.Pool
) -> None:
    """Edit, attach and delete, each held on the thread's row lock while the thread
    is deleted (the widest window, forced), then 20 free-running races of each:
    OK or NOT_FOUND, never INTERNAL."""
    forced: list[str] = []
    for kind in range(3):
        room = await new_room(db_pool)
        message_id = await a_message(messages, room)
        async with db_pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            await conn.execute(
                "SELECT 1 FROM threads WHERE id = $1 FOR UPDATE", uuid.UUID(room.thread_id)
            )
            pending = asyncio.ensure_future(outcome(change_of(messages, room, message_id, kind)))
            await waiting_on_a_lock(db_pool)
            await conn.execute("DELETE FROM threads WHERE id = $1", uuid.UUID(room.thread_id))
            await tx.commit()
        forced.append(await pending)
    assert forced == ["NOT_FOUND:NOT_FOUND"] * 3
    results: Counter[str] = Counter()
    for i in range(60):
        room = await new_room(db_pool)
        message_id = await a_message(messages, room)
        deletion = db_pool.execute("DELETE FROM threads WHERE id = $1", uuid.UUID(room.thread_id))
        result, _ = await asyncio.gather(
            outcome(change_of(messages, room, message_id, i % 3)), deletion
        )
        results[result] += 1
    assert set(results) <= {"OK", "NOT_FOUND:NOT_FOUND"}, results


def change_of(messages: Stub, room: Room, message_id: str, kind: int) -> Awaitable[object]:
    if kind == 0:
        return messages.UpdateMessage(
            messages_pb2.UpdateMessageRequest(
                message=messages_pb2.Message(id=message_id, content="edited"),
                update_mask={"paths": ["content"]},  # type: ignore[arg-type]
            ),
            metadata=as_user(room.member),
        )
    if kind == 1:
        return add(messages, room, message_id)
    return messages.DeleteMessage(
        messages_pb2.DeleteMessageRequest(id=message_id), metadata=as_user(room.member)
    )
