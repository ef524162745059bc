"""Who may do what in the messages service: every permission decision is made here.

Invariant: a call acting for a user (x-user-id) touches a thread, its messages
and its stream only while that user participates in it; to anyone else they do
not exist (NOT_FOUND, the answer for ids that never existed, so existence does
not leak). A trusted call (no x-user-id) may do everything. Within a thread:
a user sends only as themselves and lists only their own messages across
threads; only the author edits a message or adds attachments; the author or a
thread OWNER/ADMIN deletes. An archived thread is read-only: no sends, edits,
attachments or live stream; deleting a message stays possible, for moderation.
An inactive or deleted sender (even through a trusted call) sends nothing:
PERMISSION_DENIED `USER_INACTIVE`, the answer an inactive user gets everywhere.

The servicer and the stream hub ask here and decide nothing themselves; each
function below either returns what the caller may act on or raises the error
the caller sees.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from uuid import UUID

from services.common.access import MANAGERS, ThreadAccess, visible_thread
from services.common.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.common.identity import Caller, require_self_or_trusted, user_inactive
from services.common.types import DbConnection
from services.messages import store
from services.messages.store import MessageRow, SendOutcome, StreamAccess


class Change(Enum):
    """What a caller wants to do to an existing message (the refusal says which)."""

    EDIT = "only the author edits a message"
    ATTACH = "only the author adds attachments"


def _archived(thread_id: UUID) -> FailedPrecondition:
    return FailedPrecondition(
        "the thread is archived", reason="THREAD_ARCHIVED", subject=f"thread/{thread_id}"
    )


async def readable_thread(conn: DbConnection, caller: Caller, thread_id: UUID) -> ThreadAccess:
    """The thread as the caller may read it; NOT_FOUND unless it participates (or is trusted)."""
    return await visible_thread(conn, caller, thread_id)


async def _message(
    conn: DbConnection, caller: Caller, message_id: UUID
) -> tuple[MessageRow, ThreadAccess]:
    message = await store.get_message(conn, message_id)
    if message is None:
        raise NotFound("message", str(message_id))
    try:
        access = await readable_thread(conn, caller, message.thread_id)
    except NotFound:
        # The message of a thread the caller cannot see does not exist for it.
        raise NotFound("message", str(message_id)) from None
    return message, access


async def readable_message(conn: DbConnection, caller: Caller, message_id: UUID) -> MessageRow:
    """A message (with attachments) of a thread the caller reads; NOT_FOUND otherwise."""
    message, _ = await _message(conn, caller, message_id)
    return message


async def changeable_message(
    conn: DbConnection, caller: Caller, message_id: UUID, change: Change
) -> MessageRow:
    """A message the caller may edit or attach to: readable, its thread not archived,
    and the caller its author. Call with the thread locked, so this still holds at commit."""
    message, access = await _message(conn, caller, message_id)
    if access.thread.is_archived:
        raise _archived(message.thread_id)
    require_self_or_trusted(caller, message.user_id, change.value)
    return message


async def deletable_message(conn: DbConnection, caller: Caller, message_id: UUID) -> MessageRow:
    """A message the caller may delete: its author's, or any in a thread the caller
    owns or administers. Archived threads included (moderation)."""
    message, access = await _message(conn, caller, message_id)
    author = caller.is_user(message.user_id)
    if not caller.trusted and not author and access.role not in MANAGERS:
        raise PermissionDenied("only the author or a thread owner/admin deletes")
    return message


def check_sender(caller: Caller, user_id: UUID) -> None:
    """A user sends only as themselves."""
    require_self_or_trusted(caller, user_id, "a user may only send as themselves")


def check_own_listing(caller: Caller, user_id: UUID) -> None:
    """A user lists only their own messages across threads."""
    require_self_or_trusted(caller, user_id, "a user may only list their own messages")


def check_own_stream(caller: Caller, user_id: UUID) -> None:
    """A user follows only their own user stream; a trusted gateway any user's."""
    require_self_or_trusted(caller, user_id, "a user may only stream their own events")


def check_search_scope(caller: Caller, thread_id: UUID | None) -> None:
    """Only a trusted call searches every thread; a user names one (checked by
    readable_thread), so a search never spans threads it cannot read."""
    if thread_id is None and not caller.trusted:
        raise InvalidArgument.field("thread_id", "is required when acting for a user")


def _not_participant(caller: Caller, thread_id: UUID) -> DomainError:
    # An end user learns nothing of a thread it is not in; a trusted caller is told why.
    if not caller.trusted:
        return NotFound("thread", str(thread_id))
    return FailedPrecondition(
        "the sender is not a participant of the thread",
        reason="NOT_A_PARTICIPANT",
        subject=f"thread/{thread_id}",
    )


def _reused(caller: Caller, thread_id: UUID) -> DomainError:
    return InvalidArgument.field(
        "request_id",
        "was already used by this sender for a different request (another "
        "thread, content, parent, metadata or attachments); a retry must repeat "
        "the original request exactly",
        reason="REQUEST_ID_REUSED",
    )


# Every refusal but INACTIVE, which names the sender (see send_refusal).
_SEND_REFUSALS: dict[SendOutcome, Callable[[Caller, UUID], DomainError]] = {
    SendOutcome.THREAD_NOT_FOUND: lambda caller, thread_id: NotFound("thread", str(thread_id)),
    SendOutcome.NOT_PARTICIPANT: _not_participant,
    SendOutcome.ARCHIVED: lambda caller, thread_id: _archived(thread_id),
    SendOutcome.BAD_PARENT: lambda caller, thread_id: InvalidArgument.field(
        "parent_id", "must be a message of the same thread"
    ),
    SendOutcome.REQUEST_ID_REUSED: _reused,
}


def send_refusal(
    outcome: SendOutcome, caller: Caller, thread_id: UUID, sender: UUID
) -> DomainError:
    """The error a send refused by the database (`outcome`) answers with. An inactive
    (or since deleted) sender is PERMISSION_DENIED `USER_INACTIVE`, as everywhere."""
    if outcome is SendOutcome.INACTIVE:
        return user_inactive(sender, "the sender is inactive")
    return _SEND_REFUSALS[outcome](caller, thread_id)


def stream_refusal(
    thread_id: UUID, user_id: UUID | None, access: StreamAccess | None
) -> DomainError | None:
    """Why `user_id` (None: a trusted caller) may not stream the thread now, if so.

    The one rule for streams, used at open, during replay and by every live fetch;
    `access` is read after the events about to be delivered (see streams/fanout.py).
    """
    if access is None:
        return NotFound("thread", str(thread_id))
    if user_id is not None:
        if user_id in access.inactive:
            return user_inactive(user_id)
        if user_id not in access.members:
            return NotFound("thread", str(thread_id))
    if access.archived:
        return FailedPrecondition(
            "the thread is archived: it has no live stream (its history stays readable)",
            reason="THREAD_ARCHIVED",
            subject=f"thread/{thread_id}",
        )
    return None
