"""chat.v1.MessagesService: translates protobuf requests into store calls.

Permissions (calls with x-user-id; trusted calls may do everything): sends only
as the caller; only participants read, list, search or stream a thread (others
get NOT_FOUND for it); only the author edits or adds attachments; the author or
a thread OWNER/ADMIN deletes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
from chat.v1 import messages_pb2, messages_pb2_grpc

from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.common.fieldmask import update_paths
from services.common.identity import Caller, caller_of
from services.common.pagination import (
    decode_page_token,
    encode_page_token,
    page_size_of,
    time_id_position,
)
from services.common.pool import BoundedPool
from services.common.types import Context, DbConnection
from services.common.validation import Violations, parse_optional_uuid, parse_uuid
from services.messages import store
from services.messages.convert import attachment_to_proto, message_to_proto
from services.messages.cursor import decode_cursor
from services.messages.hub import StreamHub
from services.messages.paging import fit_page
from services.messages.settings import MessagesSettings
from services.messages.stream import stream_thread
from services.messages.validation import (
    attachment_of,
    attachments_of,
    check_content,
    metadata_of,
)

Position = tuple[datetime, UUID]
ListRequest = (
    messages_pb2.ListMessagesRequest
    | messages_pb2.ListRepliesRequest
    | messages_pb2.ListUserMessagesRequest
)


async def _no_check(conn: DbConnection) -> None:
    return None


async def _thread_access(
    conn: DbConnection, caller: Caller, thread_id: UUID
) -> tuple[bool, str | None]:
    """(archived, caller's role); NOT_FOUND unless the caller participates (or is trusted)."""
    found = await store.membership(conn, thread_id, caller.user_id)
    if found is None or (not caller.trusted and found[1] is None):
        raise NotFound("thread", str(thread_id))
    return found


async def _message_access(
    conn: DbConnection, caller: Caller, message_id: UUID, *, to_change: bool = False
) -> tuple[store.MessageRow, str | None]:
    """The message and the caller's role in its thread; NOT_FOUND for outsiders.

    `to_change`: an archived thread is read-only (no edits or attachments, as no
    sends); deleting stays possible, for moderation.
    """
    message = await store.get_message(conn, message_id)
    if message is None:
        raise NotFound("message", str(message_id))
    try:
        archived, role = await _thread_access(conn, caller, message.thread_id)
    except NotFound:
        raise NotFound("message", str(message_id)) from None
    if to_change and archived:
        raise FailedPrecondition(
            "the thread is archived",
            reason="THREAD_ARCHIVED",
            subject=f"thread/{message.thread_id}",
        )
    return message, role


def _position(token: str, kind: str, params: dict[str, Any]) -> Position | None:
    position = decode_page_token(token, kind, params)
    return None if position is None else time_id_position(position)


def _token_after(last: store.MessageRow | None, kind: str, params: dict[str, Any]) -> str:
    """The next page starts right after `last`, the last message served; "" ends the listing."""
    if last is None:
        return ""
    return encode_page_token(kind, params, [last.created_at.isoformat(), str(last.id)])


class MessagesServicer(messages_pb2_grpc.MessagesServiceServicer):
    def __init__(self, pool: BoundedPool, hub: StreamHub, settings: MessagesSettings) -> None:
        self._pool = pool
        self._hub = hub
        self._settings = settings

    async def SendMessage(
        self, request: messages_pb2.SendMessageRequest, context: Context
    ) -> messages_pb2.SendMessageResponse:
        v = Violations()
        thread_id = v.check_uuid(request.thread_id, "thread_id")
        user_id = v.check_uuid(request.user_id, "user_id")
        check_content(v, request.content, self._settings, "content")
        parent_id = request_id = None
        try:
            parent_id = parse_optional_uuid(request.parent_id, "parent_id")
            request_id = parse_optional_uuid(request.request_id, "request_id")
        except InvalidArgument as err:
            for violation in err.violations:
                v.add(violation.field, violation.description)
        metadata = metadata_of(v, request.metadata, self._settings, "metadata")
        attachments = attachments_of(v, request.attachments, self._settings)
        v.raise_if_any()
        assert thread_id is not None and user_id is not None
        caller = caller_of(context)
        if not caller.trusted and not caller.is_user(user_id):
            raise PermissionDenied("a user may only send as themselves")
        # A send waits for its thread's row lock: at most DB_ROW_LOCK_WAITERS per thread
        # hold a connection for it (services/common/pool.py).
        async with self._pool.acquire(locking=thread_id) as conn:
            for attempt in range(2):
                try:
                    outcome, message = await store.send(
                        conn,
                        thread_id=thread_id,
                        user_id=user_id,
                        content=request.content,
                        parent_id=parent_id,
                        metadata=metadata,
                        request_id=request_id,
                        attachments=attachments,
                    )
                    break
                except asyncpg.UniqueViolationError:
                    # The same request_id raced in through another thread and committed
                    # first: sending again compares with it (same request or reused).
                    if attempt:
                        raise
        if message is not None:
            return messages_pb2.SendMessageResponse(message=message_to_proto(message))
        raise self._refusal(outcome, caller, thread_id)

    @staticmethod
    def _refusal(outcome: str, caller: Caller, thread_id: UUID) -> Exception:
        subject = f"thread/{thread_id}"
        if outcome == "thread_not_found" or (outcome == "not_participant" and not caller.trusted):
            return NotFound("thread", str(thread_id))
        if outcome == "not_participant":
            return FailedPrecondition(
                "the sender is not a participant of the thread",
                reason="NOT_A_PARTICIPANT",
                subject=subject,
            )
        if outcome == "archived":
            return FailedPrecondition(
                "the thread is archived", reason="THREAD_ARCHIVED", subject=subject
            )
        if outcome == "inactive":
            return FailedPrecondition(
                "the sender is inactive", reason="USER_INACTIVE", subject=subject
            )
        if outcome == "bad_parent":
            return InvalidArgument.field("parent_id", "must be a message of the same thread")
        if outcome == "request_id_reused":
            return InvalidArgument.field(
                "request_id",
                "was already used by this sender for a different request (another "
                "thread, content, parent, metadata or attachments); a retry must repeat "
                "the original request exactly",
                reason="REQUEST_ID_REUSED",
            )
        return RuntimeError(f"unexpected send outcome {outcome!r}")

    async def GetMessage(
        self, request: messages_pb2.GetMessageRequest, context: Context
    ) -> messages_pb2.GetMessageResponse:
        message_id = parse_uuid(request.id, "id")
        async with self._pool.acquire() as conn:
            message, _ = await _message_access(conn, caller_of(context), message_id)
        return messages_pb2.GetMessageResponse(message=message_to_proto(message))

    async def _page(
        self,
        kind: str,
        key: tuple[str, UUID],
        sql: str,
        request: ListRequest,
        check: Callable[[DbConnection], Awaitable[object]],
    ) -> tuple[list[messages_pb2.Message], str]:
        """One keyset page of a listing, bounded in rows and bytes (paging.py):
        `check` runs first on the same connection."""
        size = page_size_of(request.page_size)
        params = {key[0]: str(key[1])}
        after = _position(request.page_token, kind, params)
        budget = self._settings.list_response_max_bytes
        async with self._pool.acquire() as conn:
            await check(conn)
            rows, fetched = await store.bounded_page(
                conn, sql, key[1], *(after or (None, None)), size + 1, budget
            )
        found, last = fit_page(rows, fetched, size, budget)
        return found, _token_after(last, kind, params)

    async def ListMessages(
        self, request: messages_pb2.ListMessagesRequest, context: Context
    ) -> messages_pb2.ListMessagesResponse:
        thread_id = parse_uuid(request.thread_id, "thread_id")
        caller = caller_of(context)
        found, token = await self._page(
            "history",
            ("thread", thread_id),
            store.THREAD_PAGE_BOUNDED,
            request,
            lambda conn: _thread_access(conn, caller, thread_id),
        )
        return messages_pb2.ListMessagesResponse(messages=found, next_page_token=token)

    async def ListReplies(
        self, request: messages_pb2.ListRepliesRequest, context: Context
    ) -> messages_pb2.ListRepliesResponse:
        parent_id = parse_uuid(request.parent_id, "parent_id")
        caller = caller_of(context)
        found, token = await self._page(
            "replies",
            ("parent", parent_id),
            store.REPLIES_PAGE_BOUNDED,
            request,
            lambda conn: _message_access(conn, caller, parent_id),
        )
        return messages_pb2.ListRepliesResponse(messages=found, next_page_token=token)

    async def ListUserMessages(
        self, request: messages_pb2.ListUserMessagesRequest, context: Context
    ) -> messages_pb2.ListUserMessagesResponse:
        user_id = parse_uuid(request.user_id, "user_id")
        caller = caller_of(context)
        if not caller.trusted and not caller.is_user(user_id):
            raise PermissionDenied("a user may only list their own messages")
        found, token = await self._page(
            "user-history", ("user", user_id), store.USER_PAGE_BOUNDED, request, _no_check
        )
        return messages_pb2.ListUserMessagesResponse(messages=found, next_page_token=token)

    async def UpdateMessage(
        self, request: messages_pb2.UpdateMessageRequest, context: Context
    ) -> messages_pb2.UpdateMessageResponse:
        message_id = parse_uuid(request.message.id, "message.id")
        paths = update_paths(request.update_mask, request.message, ("content", "metadata"))
        v = Violations()
        content = None
        if "content" in paths:
            check_content(v, request.message.content, self._settings, "message.content")
            content = request.message.content
        metadata = None
        if "metadata" in paths:
            metadata = metadata_of(v, request.message.metadata, self._settings, "message.metadata")
        v.raise_if_any()
        caller = caller_of(context)
        async with self._pool.acquire(locking=message_id) as conn, conn.transaction():
            await store.lock_thread_of(conn, message_id)
            message, _ = await _message_access(conn, caller, message_id, to_change=True)
            if not caller.trusted and not caller.is_user(message.user_id):
                raise PermissionDenied("only the author edits a message")
            edited = None
            if message.status != "deleted":
                edited = await store.edit(
                    conn, message, content=content, metadata=("metadata" in paths, metadata)
                )
            if edited is None:
                raise FailedPrecondition(
                    "a deleted message cannot be edited",
                    reason="MESSAGE_DELETED",
                    subject=f"message/{message_id}",
                )
        return messages_pb2.UpdateMessageResponse(message=message_to_proto(edited))

    async def DeleteMessage(
        self, request: messages_pb2.DeleteMessageRequest, context: Context
    ) -> messages_pb2.DeleteMessageResponse:
        message_id = parse_uuid(request.id, "id")
        caller = caller_of(context)
        async with self._pool.acquire(locking=message_id) as conn:
            try:
                async with conn.transaction():
                    await store.lock_thread_of(conn, message_id)
                    message, role = await _message_access(conn, caller, message_id)
                    author = caller.is_user(message.user_id)
                    if not caller.trusted and not author and role not in ("owner", "admin"):
                        raise PermissionDenied("only the author or a thread owner/admin deletes")
                    if message.status != "deleted":
                        message = await store.tombstone(conn, message)
            except store.AlreadyDeleted:
                message = await store.get_message(conn, message_id)  # type: ignore[assignment]
        return messages_pb2.DeleteMessageResponse(message=message_to_proto(message))

    async def AddAttachment(
        self, request: messages_pb2.AddAttachmentRequest, context: Context
    ) -> messages_pb2.AddAttachmentResponse:
        message_id = parse_uuid(request.message_id, "message_id")
        v = Violations()
        attachment = attachment_of(v, request.attachment, self._settings, "attachment")
        v.raise_if_any()
        caller = caller_of(context)
        async with self._pool.acquire(locking=message_id) as conn, conn.transaction():
            await store.lock_thread_of(conn, message_id)
            message, _ = await _message_access(conn, caller, message_id, to_change=True)
            if not caller.trusted and not caller.is_user(message.user_id):
                raise PermissionDenied("only the author adds attachments")
            if message.status == "deleted":
                raise FailedPrecondition(
                    "a deleted message takes no attachments",
                    reason="MESSAGE_DELETED",
                    subject=f"message/{message_id}",
                )
            if await store.count_attachments(conn, message_id) >= self._settings.max_attachments:
                raise FailedPrecondition(
                    f"a message has at most {self._settings.max_attachments} attachments",
                    reason="TOO_MANY_ATTACHMENTS",
                    subject=f"message/{message_id}",
                )
            row = await store.add_attachment(conn, message, attachment)
        return messages_pb2.AddAttachmentResponse(attachment=attachment_to_proto(row))

    async def ListAttachments(
        self, request: messages_pb2.ListAttachmentsRequest, context: Context
    ) -> messages_pb2.ListAttachmentsResponse:
        message_id = parse_uuid(request.message_id, "message_id")
        async with self._pool.acquire() as conn:
            message, _ = await _message_access(conn, caller_of(context), message_id)
        return messages_pb2.ListAttachmentsResponse(
            attachments=[attachment_to_proto(a) for a in message.attachments]
        )

    async def SearchMessages(
        self, request: messages_pb2.SearchMessagesRequest, context: Context
    ) -> messages_pb2.SearchMessagesResponse:
        caller = caller_of(context)
        thread_id = parse_optional_uuid(request.thread_id, "thread_id")
        if thread_id is None and not caller.trusted:
            raise InvalidArgument.field("thread_id", "is required when acting for a user")
        v = Violations()
        contains = metadata_of(v, request.metadata_contains, self._settings, "metadata_contains")
        if contains is None:
            v.add("metadata_contains", "must name at least one key")
        v.raise_if_any()
        size = page_size_of(request.page_size)
        params = {"thread": str(thread_id), "contains": contains}
        after = _position(request.page_token, "search", params)
        budget = self._settings.list_response_max_bytes
        async with self._pool.acquire() as conn:
            if thread_id is not None:
                await _thread_access(conn, caller, thread_id)
            rows, fetched = await store.bounded_page(
                conn,
                store.SEARCH_PAGE_BOUNDED,
                contains,
                thread_id,
                *(after or (None, None)),
                size + 1,
                budget,
            )
        found, last = fit_page(rows, fetched, size, budget)
        return messages_pb2.SearchMessagesResponse(
            messages=found, next_page_token=_token_after(last, "search", params)
        )

    async def StreamThreadMessages(
        self, request: messages_pb2.StreamThreadMessagesRequest, context: Context
    ) -> AsyncIterator[messages_pb2.StreamThreadMessagesResponse]:
        thread_id = parse_uuid(request.thread_id, "thread_id")
        after = decode_cursor(request.after, thread_id) if request.after else None
        caller = caller_of(context)
        async for response in stream_thread(
            self._pool, self._hub, self._settings, thread_id, caller.user_id, after
        ):
            yield response
