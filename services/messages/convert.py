"""Store rows to protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from chat.v1 import messages_pb2

from services.common.convert import to_struct, to_timestamp
from services.messages.cursor import encode_cursor
from services.messages.store import AttachmentRow, MessageRow, ThreadEvent

STATUS_TO_PROTO = {
    "sent": messages_pb2.MESSAGE_STATUS_SENT,
    "edited": messages_pb2.MESSAGE_STATUS_EDITED,
    "deleted": messages_pb2.MESSAGE_STATUS_DELETED,
}


def attachment_to_proto(row: AttachmentRow) -> messages_pb2.Attachment:
    return messages_pb2.Attachment(
        id=str(row.id),
        message_id=str(row.message_id),
        url=row.url,
        type=row.type,
        name=row.name,
        size=row.size,
        metadata=to_struct(row.metadata),
        created_at=to_timestamp(row.created_at),
    )


def message_to_proto(row: MessageRow) -> messages_pb2.Message:
    deleted = row.status == "deleted"
    return messages_pb2.Message(
        id=str(row.id),
        thread_id=str(row.thread_id),
        user_id=str(row.user_id),
        content="" if deleted else row.content,
        parent_id=str(row.parent_id) if row.parent_id else "",
        status=STATUS_TO_PROTO[row.status],
        metadata=None if deleted else to_struct(row.metadata),
        attachments=[] if deleted else [attachment_to_proto(a) for a in row.attachments],
        created_at=to_timestamp(row.created_at),
        updated_at=to_timestamp(row.updated_at),
        # Resuming from the creation replays every later event: a safe resume
        # point whatever happened to the message since (see messages.proto).
        cursor=encode_cursor(row.thread_id, row.seq),
    )


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
