"""Store rows to protobuf messages."""

from __future__ import annotations

from collections import OrderedDict
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
        cursor=encode_cursor(row.thread_id, row.change_seq),
    )


class _RecentProtos:
    """Each live row becomes a protobuf once, not once per subscriber of its thread."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._items: OrderedDict[tuple[UUID, int], messages_pb2.Message] = OrderedDict()

    def get(self, row: MessageRow) -> messages_pb2.Message:
        key = (row.id, row.change_seq)
        found = self._items.get(key)
        if found is None:
            found = self._items[key] = message_to_proto(row)
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        return found


_recent = _RecentProtos()


def event_of(event: ThreadEvent) -> messages_pb2.StreamThreadMessagesResponse:
    """The stream response for `event`; its cursor resumes right after it."""
    message = _recent.get(event.row)
    cursor = encode_cursor(event.row.thread_id, event.position)
    if event.is_creation:
        return messages_pb2.StreamThreadMessagesResponse(cursor=cursor, created=message)
    if event.row.status == "deleted":
        return messages_pb2.StreamThreadMessagesResponse(cursor=cursor, deleted=message)
    return messages_pb2.StreamThreadMessagesResponse(cursor=cursor, updated=message)
