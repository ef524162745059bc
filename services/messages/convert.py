"""Store rows to protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from chat.v1 import messages_pb2
from google.protobuf import struct_pb2

from services.common.convert import built, set_timestamp
from services.messages.cursor import encode_cursor
from services.messages.store import AttachmentRow, MessageRow, ThreadEvent

STATUS_TO_PROTO = {
    "sent": messages_pb2.MESSAGE_STATUS_SENT,
    "edited": messages_pb2.MESSAGE_STATUS_EDITED,
    "deleted": messages_pb2.MESSAGE_STATUS_DELETED,
}


# Rows are written into messages in place: services/common/convert.py `built`.


def fill_attachment(message: messages_pb2.Attachment, row: AttachmentRow) -> None:
    message.id = str(row.id)
    message.message_id = str(row.message_id)
    message.url = row.url
    message.type = row.type
    message.name = row.name
    message.size = row.size
    _set_struct(message.metadata, row.metadata)
    set_timestamp(message.created_at, row.created_at)


def attachment_to_proto(row: AttachmentRow) -> messages_pb2.Attachment:
    return built(messages_pb2.Attachment, fill_attachment, row)


def fill_message(message: messages_pb2.Message, row: MessageRow) -> None:
    deleted = row.status == "deleted"
    message.id = str(row.id)
    message.thread_id = str(row.thread_id)
    message.user_id = str(row.user_id)
    if row.parent_id is not None:
        message.parent_id = str(row.parent_id)
    message.status = STATUS_TO_PROTO[row.status]
    if not deleted:  # a tombstone shows no content, metadata or attachments
        message.content = row.content
        _set_struct(message.metadata, row.metadata)
        for attachment in row.attachments:
            fill_attachment(message.attachments.add(), attachment)
    set_timestamp(message.created_at, row.created_at)
    set_timestamp(message.updated_at, row.updated_at)
    # Resuming from the creation replays every later event: a safe resume
    # point whatever happened to the message since (see messages.proto).
    message.cursor = encode_cursor(row.thread_id, row.seq)


def message_to_proto(row: MessageRow) -> messages_pb2.Message:
    return built(messages_pb2.Message, fill_message, row)


def _set_struct(target: struct_pb2.Struct, value: dict[str, Any] | None) -> None:
    """JSON metadata into a message's Struct field; None leaves it unset, {} sets it empty."""
    if value is not None:
        target.SetInParent()
        target.update(value)


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One stream response, converted and serialised once for every subscriber it
    reaches (they all get the same bytes: the cursor names the thread, not them)."""

    position: int
    payload: bytes  # the serialised StreamThreadMessagesResponse (services/common/wire.py)

    @property
    def size(self) -> int:
        """What a subscriber's buffer counts."""
        return len(self.payload)


def stream_event(event: ThreadEvent) -> StreamEvent:
    """`event` for live delivery: converted and serialised once."""
    return StreamEvent(event.position, event_response(event).SerializeToString())


def event_response(event: ThreadEvent) -> messages_pb2.StreamThreadMessagesResponse:
    """The stream response for `event`; its cursor (and its message's) resume right after it."""
    row = event.row
    cursor = encode_cursor(row.thread_id, event.position)
    if row.status == "removed":
        removed = messages_pb2.Message(
            id=str(row.id), thread_id=str(row.thread_id), user_id=str(row.user_id), cursor=cursor
        )
        response = messages_pb2.StreamThreadMessagesResponse(cursor=cursor, removed=removed)
    else:
        message = message_to_proto(row)
        message.cursor = cursor
        if event.is_creation:
            response = messages_pb2.StreamThreadMessagesResponse(cursor=cursor, created=message)
        elif row.status == "deleted":
            response = messages_pb2.StreamThreadMessagesResponse(cursor=cursor, deleted=message)
        else:
            response = messages_pb2.StreamThreadMessagesResponse(cursor=cursor, updated=message)
    return response


def caught_up(thread_id: UUID, position: int) -> messages_pb2.StreamThreadMessagesResponse:
    cursor = encode_cursor(thread_id, position)
    return messages_pb2.StreamThreadMessagesResponse(
        cursor=cursor, caught_up=messages_pb2.CaughtUp(cursor=cursor)
    )
