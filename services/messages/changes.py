"""Changes to existing messages (edit, delete, attach), each in one transaction.

The order is the rule, the same for every change: lock the message's thread
(as a send does, so changes of one thread serialise), ask policy.py whether the
caller may, check the message's state (not deleted, room for an attachment),
then write. Every check is made under the lock, so it still holds at commit.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from services.common.errors import FailedPrecondition, NotFound
from services.common.identity import Caller
from services.common.types import DbConnection
from services.messages import policy, store
from services.messages.store import AttachmentRow, MessageRow, NewAttachment


def _deleted(message_id: UUID, what: str) -> FailedPrecondition:
    return FailedPrecondition(what, reason="MESSAGE_DELETED", subject=f"message/{message_id}")


async def edit_message(
    conn: DbConnection,
    caller: Caller,
    message_id: UUID,
    *,
    content: str | None,
    metadata: tuple[bool, dict[str, Any] | None],
) -> MessageRow:
    """The edited message: `content` unless None, `metadata` when its flag is set."""
    async with conn.transaction():
        await store.lock_thread_of(conn, message_id)
        message = await policy.changeable_message(conn, caller, message_id, policy.Change.EDIT)
        edited = None
        if message.status != "deleted":
            edited = await store.edit(conn, message, content=content, metadata=metadata)
        if edited is None:
            raise _deleted(message_id, "a deleted message cannot be edited")
        return edited


async def delete_message(conn: DbConnection, caller: Caller, message_id: UUID) -> MessageRow:
    """The message as a tombstone; deleting a tombstone again changes nothing."""
    try:
        async with conn.transaction():
            await store.lock_thread_of(conn, message_id)
            message = await policy.deletable_message(conn, caller, message_id)
            if message.status != "deleted":
                message = await store.tombstone(conn, message)
            return message
    except store.AlreadyDeleted:  # raised inside, so the unused position rolls back
        tombstone = await store.get_message(conn, message_id)
        if tombstone is None:  # its thread was deleted since
            raise NotFound("message", str(message_id)) from None
        return tombstone


async def attach(
    conn: DbConnection,
    caller: Caller,
    message_id: UUID,
    attachment: NewAttachment,
    *,
    max_attachments: int,
) -> tuple[AttachmentRow, UUID, int]:
    """The new attachment, its thread and the position it took; a message holds at
    most `max_attachments`."""
    async with conn.transaction():
        await store.lock_thread_of(conn, message_id)
        message = await policy.changeable_message(conn, caller, message_id, policy.Change.ATTACH)
        if message.status == "deleted":
            raise _deleted(message_id, "a deleted message takes no attachments")
        if await store.count_attachments(conn, message_id) >= max_attachments:
            raise FailedPrecondition(
                f"a message has at most {max_attachments} attachments",
                reason="TOO_MANY_ATTACHMENTS",
                subject=f"message/{message_id}",
            )
        row, position = await store.add_attachment(conn, message, attachment)
        return row, message.thread_id, position
