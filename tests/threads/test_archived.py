"""An archived thread allows exactly: reads, unarchiving, leaving and deleting.

Every write RPC of the threads and messages services is tried against an archived
thread, by an owner (who may do anything in a live thread): the allowed ones
succeed, every other one is FAILED_PRECONDITION `THREAD_ARCHIVED` and writes
nothing (the thread's, its participants' and its messages' rows are unchanged).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from chat.v1 import messages_pb2, messages_pb2_grpc, threads_pb2
from google.protobuf import field_mask_pb2

from services.common.settings import ServiceSettings
from services.messages.service import DEFINITION as MESSAGES
from tests.conftest import running
from tests.rpc_errors import as_user, error_info, error_of
from tests.threads.conftest import new_users

if TYPE_CHECKING:
    from tests.threads.conftest import Stub as Threads

    Messages = messages_pb2_grpc.MessagesServiceAsyncStub

OWNER = threads_pb2.PARTICIPANT_ROLE_OWNER


@pytest.fixture
async def messages(service_settings: ServiceSettings) -> AsyncIterator[Messages]:
    async with running(MESSAGES, service_settings) as (_, channel):
        yield messages_pb2_grpc.MessagesServiceStub(channel)


class World:
    def __init__(self, threads: Threads, messages: Messages, db: asyncpg.Pool) -> None:
        self.threads, self.messages, self.db = threads, messages, db

    async def setup(self) -> None:
        self.owner, self.member, self.outsider = await new_users(self.db, 3)
        created = await self.threads.CreateThread(
            threads_pb2.CreateThreadRequest(
                name="g", creator_id=self.owner, participant_ids=[self.member]
            )
        )
        self.thread = created.thread.id
        sent = await self.messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=self.thread, user_id=self.owner, content="before"
            ),
            metadata=as_user(self.owner),
        )
        self.message = sent.message.id
        await self.set_archived(True)

    async def set_archived(self, archived: bool) -> threads_pb2.Thread:
        reply = await self.threads.UpdateThread(
            threads_pb2.UpdateThreadRequest(
                thread=threads_pb2.Thread(id=self.thread, is_archived=archived),
                update_mask=field_mask_pb2.FieldMask(paths=["is_archived"]),
            ),
            metadata=as_user(self.owner),
        )
        return reply.thread

    async def snapshot(self) -> list[Any]:
        tid = uuid.UUID(self.thread)
        return [
            await self.db.fetch("SELECT * FROM threads WHERE id = $1", tid),
            await self.db.fetch(
                "SELECT user_id, role FROM thread_participants WHERE thread_id = $1 "
                "ORDER BY user_id",
                tid,
            ),
            await self.db.fetch("SELECT * FROM messages WHERE thread_id = $1 ORDER BY id", tid),
            await self.db.fetch(
                "SELECT a.* FROM message_attachments a JOIN messages m ON m.id = a.message_id "
                "WHERE m.thread_id = $1 ORDER BY a.id",
                tid,
            ),
        ]


def _refused_writes(w: World) -> dict[str, Callable[[], Awaitable[object]]]:
    mine = as_user(w.owner)
    attachment = messages_pb2.Attachment(
        url="https://x.io/a.png", type="image/png", name="a.png", size=5
    )
    return {
        "SendMessage": lambda: w.messages.SendMessage(
            messages_pb2.SendMessageRequest(thread_id=w.thread, user_id=w.owner, content="x"),
            metadata=mine,
        ),
        "UpdateMessage": lambda: w.messages.UpdateMessage(
            messages_pb2.UpdateMessageRequest(
                message=messages_pb2.Message(id=w.message, content="edited"),
                update_mask=field_mask_pb2.FieldMask(paths=["content"]),
            ),
            metadata=mine,
        ),
        "AddAttachment": lambda: w.messages.AddAttachment(
            messages_pb2.AddAttachmentRequest(message_id=w.message, attachment=attachment),
            metadata=mine,
        ),
        "UpdateThread(name)": lambda: w.threads.UpdateThread(
            threads_pb2.UpdateThreadRequest(
                thread=threads_pb2.Thread(id=w.thread, name="renamed"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            metadata=mine,
        ),
        "UpdateThread(name, stay archived)": lambda: w.threads.UpdateThread(
            threads_pb2.UpdateThreadRequest(
                thread=threads_pb2.Thread(id=w.thread, name="renamed", is_archived=True),
                update_mask=field_mask_pb2.FieldMask(paths=["name", "is_archived"]),
            ),
            metadata=mine,
        ),
        "AddParticipants": lambda: w.threads.AddParticipants(
            threads_pb2.AddParticipantsRequest(thread_id=w.thread, user_ids=[w.outsider]),
            metadata=mine,
        ),
        "RemoveParticipant(other)": lambda: w.threads.RemoveParticipant(
            threads_pb2.RemoveParticipantRequest(thread_id=w.thread, user_id=w.member),
            metadata=mine,
        ),
        "UpdateParticipant": lambda: w.threads.UpdateParticipant(
            threads_pb2.UpdateParticipantRequest(thread_id=w.thread, user_id=w.member, role=OWNER),
            metadata=mine,
        ),
    }


@pytest.fixture
async def world(threads: Threads, messages: Messages, db_pool: asyncpg.Pool) -> World:
    w = World(threads, messages, db_pool)
    await w.setup()
    return w


async def test_every_other_write_is_refused_and_writes_nothing(world: World) -> None:
    before = await world.snapshot()
    for name, call in _refused_writes(world).items():
        err = await error_of(call())
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (name, err.details())
        assert error_info(err).reason == "THREAD_ARCHIVED", name
        assert await world.snapshot() == before, name


async def test_reads_are_allowed(world: World) -> None:
    w = world
    mine = as_user(w.member)
    await w.threads.GetThread(threads_pb2.GetThreadRequest(id=w.thread), metadata=mine)
    await w.threads.ListParticipants(
        threads_pb2.ListParticipantsRequest(thread_id=w.thread), metadata=mine
    )
    history = await w.messages.ListMessages(
        messages_pb2.ListMessagesRequest(thread_id=w.thread), metadata=mine
    )
    assert [m.content for m in history.messages] == ["before"]
    await w.messages.GetMessage(messages_pb2.GetMessageRequest(id=w.message), metadata=mine)
    marked = await w.threads.MarkRead(
        threads_pb2.MarkReadRequest(thread_id=w.thread, user_id=w.member), metadata=mine
    )
    assert (
        marked.participant.last_read_at.ToDatetime() >= history.messages[0].created_at.ToDatetime()
    )
    inbox = await w.threads.ListThreads(
        threads_pb2.ListThreadsRequest(user_id=w.member, include_archived=True), metadata=mine
    )
    assert [t.thread.id for t in inbox.threads] == [w.thread]


async def test_leaving_and_deleting_a_message_are_allowed(world: World) -> None:
    w = world
    await w.threads.RemoveParticipant(
        threads_pb2.RemoveParticipantRequest(thread_id=w.thread, user_id=w.member),
        metadata=as_user(w.member),
    )
    deleted = await w.messages.DeleteMessage(
        messages_pb2.DeleteMessageRequest(id=w.message), metadata=as_user(w.owner)
    )
    assert deleted.message.status == messages_pb2.MESSAGE_STATUS_DELETED
    assert [r["user_id"] for r in (await w.snapshot())[1]] == [uuid.UUID(w.owner)]


async def test_unarchive_then_writes_work_again(world: World) -> None:
    w = world
    # Unarchiving and renaming in one call is allowed: the result is not archived.
    reply = await w.threads.UpdateThread(
        threads_pb2.UpdateThreadRequest(
            thread=threads_pb2.Thread(id=w.thread, name="back", is_archived=False),
            update_mask=field_mask_pb2.FieldMask(paths=["name", "is_archived"]),
        ),
        metadata=as_user(w.owner),
    )
    assert reply.thread.name == "back" and not reply.thread.is_archived
    for name, call in _refused_writes(w).items():
        if name in ("RemoveParticipant(other)", "UpdateThread(name, stay archived)"):
            continue  # they would change what the next calls see (a removal, re-archiving)
        await call()


async def test_archiving_again_is_a_no_op_and_deleting_the_thread_is_allowed(
    world: World,
) -> None:
    w = world
    assert (await w.set_archived(True)).is_archived
    await w.threads.DeleteThread(
        threads_pb2.DeleteThreadRequest(id=w.thread), metadata=as_user(w.owner)
    )
    assert await w.snapshot() == [[], [], [], []]
