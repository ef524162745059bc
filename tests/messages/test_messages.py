"""chat.v1.MessagesService unary RPCs: send, history, replies, edits, deletes, limits."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from chat.v1 import messages_pb2
from google.protobuf import field_mask_pb2, struct_pb2

from tests.messages.conftest import Room, new_user
from tests.rpc_errors import as_user, error_info, error_of, violated_fields

if TYPE_CHECKING:
    from tests.messages.conftest import Stub

SENT = messages_pb2.MESSAGE_STATUS_SENT
EDITED = messages_pb2.MESSAGE_STATUS_EDITED
DELETED = messages_pb2.MESSAGE_STATUS_DELETED


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


async def send(
    messages: Stub, room: Room, content: str = "hello", *, user: str | None = None, **extra: object
) -> messages_pb2.Message:
    author = user or room.member
    reply = await messages.SendMessage(
        messages_pb2.SendMessageRequest(
            thread_id=room.thread_id,
            user_id=author,
            content=content,
            **extra,  # type: ignore[arg-type]
        ),
        metadata=as_user(author),
    )
    return reply.message


async def count_messages(db: asyncpg.Pool) -> int:
    return int(await db.fetchval("SELECT count(*) FROM messages"))


async def test_send_writes_message_attachments_and_activity(
    messages: Stub, room: Room, db_pool: asyncpg.Pool
) -> None:
    sent = await send(
        messages,
        room,
        "look",
        metadata=struct(kind="photo", tags=["a"]),
        attachments=[
            messages_pb2.Attachment(
                url="https://x.io/a.png", type="image/png", name="a.png", size=5
            )
        ],
    )
    assert sent.status == SENT and sent.content == "look" and sent.cursor
    assert sent.metadata["kind"] == "photo"
    assert [a.name for a in sent.attachments] == ["a.png"]
    row = await db_pool.fetchrow(
        "SELECT t.last_message_at, p.last_read_at FROM threads t "
        "JOIN thread_participants p ON p.thread_id = t.id AND p.user_id = $2 WHERE t.id = $1",
        uuid.UUID(room.thread_id),
        uuid.UUID(room.member),
    )
    assert row is not None
    assert (
        row["last_message_at"]
        == row["last_read_at"]
        == sent.created_at.ToDatetime(tzinfo=row["last_message_at"].tzinfo)
    )
    got = await messages.GetMessage(
        messages_pb2.GetMessageRequest(id=sent.id), metadata=as_user(room.owner)
    )
    assert got.message == sent


async def test_idempotent_send_under_racing_retries(
    messages: Stub, room: Room, db_pool: asyncpg.Pool
) -> None:
    request_id = str(uuid.uuid4())
    replies = await asyncio.gather(
        *(send(messages, room, "once", request_id=request_id) for _ in range(12))
    )
    assert len({m.id for m in replies}) == 1
    assert await count_messages(db_pool) == 1
    # Nothing else moved either: the thread's position counter advanced once.
    assert await db_pool.fetchval("SELECT last_seq FROM threads") == 1
    again = await send(messages, room, "once", request_id=request_id)
    assert again.id == replies[0].id and again.content == "once"
    other = await send(messages, room, "new", request_id=str(uuid.uuid4()))
    assert other.id != again.id


async def test_history_newest_first_across_pages_with_concurrent_sends(
    messages: Stub, room: Room
) -> None:
    first = [await send(messages, room, f"m{i}") for i in range(7)]
    page = await messages.ListMessages(
        messages_pb2.ListMessagesRequest(thread_id=room.thread_id, page_size=3),
        metadata=as_user(room.owner),
    )
    seen = list(page.messages)
    token = page.next_page_token
    # Sends while paging land at the top, never inside pages already being walked.
    await asyncio.gather(*(send(messages, room, f"late{i}") for i in range(5)))
    while token:
        page = await messages.ListMessages(
            messages_pb2.ListMessagesRequest(
                thread_id=room.thread_id, page_size=3, page_token=token
            ),
            metadata=as_user(room.owner),
        )
        seen += page.messages
        token = page.next_page_token
    assert [m.id for m in seen] == [m.id for m in reversed(first)]
    latest = await messages.ListMessages(
        messages_pb2.ListMessagesRequest(thread_id=room.thread_id, page_size=200),
        metadata=as_user(room.owner),
    )
    assert len(latest.messages) == 12
    assert {m.content for m in latest.messages[:5]} == {f"late{i}" for i in range(5)}
    stamps = [m.created_at.ToNanoseconds() for m in latest.messages]
    assert stamps == sorted(stamps, reverse=True)


async def test_replies_and_user_history(messages: Stub, room: Room, db_pool: asyncpg.Pool) -> None:
    parent = await send(messages, room, "question")
    replies = [
        await send(messages, room, f"answer {i}", user=room.owner, parent_id=parent.id)
        for i in range(3)
    ]
    listed = await messages.ListReplies(
        messages_pb2.ListRepliesRequest(parent_id=parent.id, page_size=2),
        metadata=as_user(room.member),
    )
    rest = await messages.ListReplies(
        messages_pb2.ListRepliesRequest(
            parent_id=parent.id, page_size=2, page_token=listed.next_page_token
        ),
        metadata=as_user(room.member),
    )
    assert [m.id for m in [*listed.messages, *rest.messages]] == [r.id for r in replies]

    other_room_thread = await db_pool.fetchval(
        "INSERT INTO threads (name) VALUES ('x') RETURNING id"
    )
    await db_pool.execute(
        "INSERT INTO thread_participants (thread_id, user_id) VALUES ($1, $2)",
        other_room_thread,
        uuid.UUID(room.member),
    )
    err = await error_of(
        messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=str(other_room_thread),
                user_id=room.member,
                content="x",
                parent_id=parent.id,
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and violated_fields(err) == {"parent_id"}

    mine = await messages.ListUserMessages(
        messages_pb2.ListUserMessagesRequest(user_id=room.owner), metadata=as_user(room.owner)
    )
    assert [m.id for m in mine.messages] == [r.id for r in reversed(replies)]
    err = await error_of(
        messages.ListUserMessages(
            messages_pb2.ListUserMessagesRequest(user_id=room.owner), metadata=as_user(room.member)
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_edit_and_delete_rules(messages: Stub, room: Room) -> None:
    original = await send(
        messages,
        room,
        "draft",
        attachments=[
            messages_pb2.Attachment(url="https://x.io/f", type="text/plain", name="f", size=1)
        ],
    )
    mask = field_mask_pb2.FieldMask(paths=["content"])
    err = await error_of(
        messages.UpdateMessage(
            messages_pb2.UpdateMessageRequest(
                message=messages_pb2.Message(id=original.id, content="hijack"), update_mask=mask
            ),
            metadata=as_user(room.owner),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    edited = await messages.UpdateMessage(
        messages_pb2.UpdateMessageRequest(
            message=messages_pb2.Message(id=original.id, content="final", metadata=struct(v=2)),
            update_mask=mask,
        ),
        metadata=as_user(room.member),
    )
    assert edited.message.status == EDITED and edited.message.content == "final"
    assert not edited.message.HasField("metadata")  # not in the mask: unchanged (none)

    # A member may not delete someone else's message; the owner may.
    other = await send(messages, room, "owner's", user=room.owner)
    err = await error_of(
        messages.DeleteMessage(
            messages_pb2.DeleteMessageRequest(id=other.id), metadata=as_user(room.member)
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    tomb = await messages.DeleteMessage(
        messages_pb2.DeleteMessageRequest(id=original.id), metadata=as_user(room.owner)
    )
    assert tomb.message.status == DELETED
    assert (tomb.message.content, list(tomb.message.attachments)) == ("", [])
    again = await messages.DeleteMessage(
        messages_pb2.DeleteMessageRequest(id=original.id), metadata=as_user(room.member)
    )
    assert again.message == tomb.message  # idempotent
    err = await error_of(
        messages.UpdateMessage(
            messages_pb2.UpdateMessageRequest(
                message=messages_pb2.Message(id=original.id, content="zombie"), update_mask=mask
            ),
            metadata=as_user(room.member),
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err).reason == "MESSAGE_DELETED"
    listed = await messages.ListAttachments(
        messages_pb2.ListAttachmentsRequest(message_id=original.id), metadata=as_user(room.member)
    )
    assert list(listed.attachments) == []


async def test_attachments_added_later_and_limits(messages: Stub, room: Room) -> None:
    sent = await send(messages, room, "files")
    good = messages_pb2.Attachment(url="http://x.io/1", type="t", name="n", size=2**31 - 1)
    added = await messages.AddAttachment(
        messages_pb2.AddAttachmentRequest(message_id=sent.id, attachment=good),
        metadata=as_user(room.member),
    )
    assert added.attachment.size == 2**31 - 1
    listed = await messages.ListAttachments(
        messages_pb2.ListAttachmentsRequest(message_id=sent.id), metadata=as_user(room.owner)
    )
    assert [a.id for a in listed.attachments] == [added.attachment.id]
    err = await error_of(
        messages.AddAttachment(
            messages_pb2.AddAttachmentRequest(message_id=sent.id, attachment=good),
            metadata=as_user(room.owner),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("extra", "fields"),
    [
        ({"content": "   "}, {"content"}),
        ({"content": "x" * 10_001}, {"content"}),
        ({"content": "nul\x00"}, {"content"}),
        ({"metadata": struct(blob="x" * 17_000)}, {"metadata"}),
        ({"request_id": "not-a-uuid"}, {"request_id"}),
        ({"parent_id": "nope"}, {"parent_id"}),
        (
            {"attachments": [messages_pb2.Attachment(url="https://x", type="t", name="n")] * 21},
            {"attachments"},
        ),
        (
            {
                "attachments": [
                    messages_pb2.Attachment(url="ftp://x.io/a", type="t" * 51, name="", size=-1)
                ]
            },
            {
                "attachments[0].url",
                "attachments[0].type",
                "attachments[0].name",
                "attachments[0].size",
            },
        ),
    ],
)
async def test_invalid_sends_name_fields_and_write_nothing(
    messages: Stub, room: Room, db_pool: asyncpg.Pool, extra: dict[str, object], fields: set[str]
) -> None:
    request = messages_pb2.SendMessageRequest(
        thread_id=room.thread_id, user_id=room.member, content="ok"
    )
    for key, value in extra.items():
        if key in ("attachments",):
            request.attachments.extend(value)  # type: ignore[arg-type]
        elif key == "metadata":
            request.metadata.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(request, key, value)
    err = await error_of(messages.SendMessage(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(err) == fields
    assert await count_messages(db_pool) == 0
    assert await db_pool.fetchval("SELECT last_seq FROM threads") == 0


async def test_limits_at_the_boundary_are_accepted(messages: Stub, room: Room) -> None:
    sent = await send(
        messages,
        room,
        "x" * 10_000,
        attachments=[messages_pb2.Attachment(url="https://x.io/a", type="t", name="n")] * 20,
    )
    assert len(sent.content) == 10_000 and len(sent.attachments) == 20


async def test_who_may_send(messages: Stub, room: Room, db_pool: asyncpg.Pool) -> None:
    err = await error_of(send(messages, room, user=room.outsider))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await error_of(
        messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=room.thread_id, user_id=room.owner, content="x"
            ),
            metadata=as_user(room.member),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    await db_pool.execute(
        "UPDATE users SET is_active = false WHERE id = $1", uuid.UUID(room.member)
    )
    # A deactivated user acts on nothing; a trusted call may not send as them either.
    err = await error_of(send(messages, room))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(err).reason == "USER_INACTIVE"
    err = await error_of(
        messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=room.thread_id, user_id=room.member, content="x"
            )
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(err).reason == "USER_INACTIVE"
    await db_pool.execute("UPDATE threads SET is_archived = true")
    err = await error_of(send(messages, room, user=room.owner))
    assert error_info(err).reason == "THREAD_ARCHIVED"
    err = await error_of(
        messages.ListMessages(
            messages_pb2.ListMessagesRequest(thread_id=room.thread_id),
            metadata=as_user(room.outsider),
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert await count_messages(db_pool) == 0
    lonely = await new_user(db_pool)
    err = await error_of(
        messages.SendMessage(
            messages_pb2.SendMessageRequest(thread_id=room.thread_id, user_id=lonely, content="x")
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION  # trusted caller, not a participant


async def test_non_finite_numbers_in_metadata_are_invalid_argument(
    messages: Stub, room: Room, db_pool: asyncpg.Pool
) -> None:
    """JSON (and jsonb) has no NaN or Infinity: refused naming the field, never INTERNAL."""
    for bad in (float("nan"), float("inf"), float("-inf")):
        metadata = struct_pb2.Struct()
        metadata.update({"n": [1, {"deep": bad}]})
        send = messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=room.thread_id,
                user_id=room.member,
                content="x",
                metadata=metadata,
                attachments=[
                    messages_pb2.Attachment(
                        url="https://x.io/a", type="t", name="n", size=1, metadata=metadata
                    )
                ],
            ),
            metadata=as_user(room.member),
        )
        err = await error_of(send)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(err) == {"metadata", "attachments[0].metadata"}
        search = messages.SearchMessages(
            messages_pb2.SearchMessagesRequest(
                thread_id=room.thread_id, metadata_contains=metadata
            ),
            metadata=as_user(room.member),
        )
        err = await error_of(search)
        assert violated_fields(err) == {"metadata_contains"}
    assert await db_pool.fetchval("SELECT count(*) FROM messages") == 0


async def test_a_page_carries_each_message_as_get_message_serves_it(
    messages: Stub, room: Room
) -> None:
    """A page reads attachments in the same round trip as its rows: each listed
    message, with none, one or several attachments (metadata included, one added
    later, one message deleted), equals the message GetMessage serves."""

    def attachment(n: int) -> messages_pb2.Attachment:
        return messages_pb2.Attachment(
            url=f"https://files.example.com/{n}",
            type="image/png",
            name=f"{n}.png",
            size=1000 + n,
            metadata=struct(n=n, tags=["a", "b"]),
        )

    plain = await send(messages, room, "no files")
    one = await send(messages, room, "one file", attachments=[attachment(1)])
    several = await send(messages, room, "three", attachments=[attachment(i) for i in (2, 3, 4)])
    gone = await send(messages, room, "deleted", attachments=[attachment(5)])
    await messages.AddAttachment(
        messages_pb2.AddAttachmentRequest(message_id=one.id, attachment=attachment(6)),
        metadata=as_user(room.member),
    )
    await messages.DeleteMessage(
        messages_pb2.DeleteMessageRequest(id=gone.id), metadata=as_user(room.member)
    )
    page = await messages.ListMessages(
        messages_pb2.ListMessagesRequest(thread_id=room.thread_id, page_size=10),
        metadata=as_user(room.owner),
    )
    listed = {m.id: m for m in page.messages}
    for sent in (plain, one, several, gone):
        got = await messages.GetMessage(
            messages_pb2.GetMessageRequest(id=sent.id), metadata=as_user(room.owner)
        )
        assert listed[sent.id] == got.message
    assert [a.name for a in listed[one.id].attachments] == ["1.png", "6.png"]
    # In the order the sender gave them (a send stamps them a microsecond apart).
    assert [a.name for a in listed[several.id].attachments] == ["2.png", "3.png", "4.png"]
    assert [a.name for a in several.attachments] == ["2.png", "3.png", "4.png"]
    assert list(listed[gone.id].attachments) == []
