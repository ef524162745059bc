"""chat.v1.MessagesService: translates protobuf requests into store calls.

Each method parses its request, asks policy.py whether the caller may (every
permission decision is made there), calls the store and converts the result.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Concatenate, Generic, ParamSpec, TypeVar
from uuid import UUID

from chat.v1 import messages_pb2, messages_pb2_grpc

from services.common import tracing
from services.common.errors import InvalidArgument
from services.common.fieldmask import update_paths
from services.common.identity import Caller, caller_of
from services.common.pagination import PageCodec, Params, TimeId
from services.common.pool import BoundedPool
from services.common.types import Context, DbConnection
from services.common.validation import Violations, parse_optional_uuid, parse_uuid
from services.common.wire import as_response
from services.messages import changes, paging, policy, reads, store
from services.messages.convert import attachment_to_proto, message_to_proto
from services.messages.cursor import decode_cursor
from services.messages.message_cache import SerializedMessages
from services.messages.paging import Listing, page_request
from services.messages.settings import MessagesSettings
from services.messages.store import Page, Window
from services.messages.streams import StreamHub
from services.messages.user_view import decode_cursor as decode_user_cursor
from services.messages.validation import (
    attachment_of,
    attachments_of,
    check_content,
    metadata_of,
)

_P = ParamSpec("_P")
_Response = TypeVar("_Response")


@dataclass(frozen=True)
class _ListingById(Generic[_Response]):
    """A listing of the messages under one id its request names. ListMessages,
    ListReplies and ListUserMessages differ only in these, so each is a row below."""

    id_field: str  # the request field holding the id; errors name it
    param: str  # the id's name among the parameters its page tokens fingerprint
    codec: PageCodec[TimeId]
    read: Callable[[DbConnection, Window, Caller, UUID], Awaitable[Page]]  # from reads.py
    response: type[_Response]


_LIST_MESSAGES = _ListingById(
    "thread_id", "thread", paging.HISTORY, reads.history, messages_pb2.ListMessagesResponse
)
_LIST_REPLIES = _ListingById(
    "parent_id", "parent", paging.REPLIES, reads.replies, messages_pb2.ListRepliesResponse
)
_LIST_USER_MESSAGES = _ListingById(
    "user_id",
    "user",
    paging.USER_HISTORY,
    reads.user_messages,
    messages_pb2.ListUserMessagesResponse,
)


class MessagesServicer(messages_pb2_grpc.MessagesServiceServicer):
    def __init__(self, pool: BoundedPool, hub: StreamHub, settings: MessagesSettings) -> None:
        self._pool = pool
        self._hub = hub
        self._settings = settings
        self._serialized = SerializedMessages(settings.message_cache_bytes)

    def _committed(self, thread_id: UUID, position: int) -> None:
        """A write committed: wake its thread's streams (streams/waker.py), here at
        once and in the other processes by a batched NOTIFY."""
        self._hub.waker.committed(thread_id, position, tracing.current_traceparent())

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
        policy.check_sender(caller, user_id)
        # A send waits for its thread's row lock: at most DB_ROW_LOCK_WAITERS per thread
        # hold a connection for it (services/common/pool.py).
        outcome, message = await self._pool.run_locking(
            thread_id,
            store.send,
            thread_id=thread_id,
            user_id=user_id,
            content=request.content,
            parent_id=parent_id,
            metadata=metadata,
            request_id=request_id,
            attachments=attachments,
        )
        if message is None:
            raise policy.send_refusal(outcome, caller, thread_id, user_id)
        if outcome is store.SendOutcome.CREATED:
            self._committed(thread_id, message.seq)
        return messages_pb2.SendMessageResponse(message=message_to_proto(message))

    async def GetMessage(
        self, request: messages_pb2.GetMessageRequest, context: Context
    ) -> messages_pb2.GetMessageResponse:
        message_id = parse_uuid(request.id, "id")
        message = await self._pool.run(policy.readable_message, caller_of(context), message_id)
        return messages_pb2.GetMessageResponse(message=message_to_proto(message))

    async def _listing(
        self,
        codec: PageCodec[TimeId],
        params: Params,
        request: Listing,
        read: Callable[Concatenate[DbConnection, Window, _P], Awaitable[Page]],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> bytes:
        """One page of a listing, serialised: `read` (from reads.py) authorizes and
        reads it; messages already served come from their cached bytes."""
        max_bytes = self._settings.list_response_max_bytes
        want = page_request(codec, params, request.page_size, request.page_token, max_bytes)
        page = await self._pool.run(read, want.window, *args, **kwargs)
        return want.finish(page, self._serialized)

    async def _list_by_id(
        self, listing: _ListingById[_Response], request: Listing, context: Context
    ) -> _Response:
        """One page of `listing`: its id parsed, then read as `_listing` reads."""
        raw_id: str = getattr(request, listing.id_field)
        target = parse_uuid(raw_id, listing.id_field)
        params = {listing.param: str(target)}
        page = await self._listing(
            listing.codec, params, request, listing.read, caller_of(context), target
        )
        return as_response(page, listing.response)

    async def ListMessages(
        self, request: messages_pb2.ListMessagesRequest, context: Context
    ) -> messages_pb2.ListMessagesResponse:
        return await self._list_by_id(_LIST_MESSAGES, request, context)

    async def ListReplies(
        self, request: messages_pb2.ListRepliesRequest, context: Context
    ) -> messages_pb2.ListRepliesResponse:
        return await self._list_by_id(_LIST_REPLIES, request, context)

    async def ListUserMessages(
        self, request: messages_pb2.ListUserMessagesRequest, context: Context
    ) -> messages_pb2.ListUserMessagesResponse:
        return await self._list_by_id(_LIST_USER_MESSAGES, request, context)

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
        edited = await self._pool.run_locking(
            message_id,
            changes.edit_message,
            caller_of(context),
            message_id,
            content=content,
            metadata=("metadata" in paths, metadata),
        )
        self._committed(edited.thread_id, edited.change_seq)
        return messages_pb2.UpdateMessageResponse(message=message_to_proto(edited))

    async def DeleteMessage(
        self, request: messages_pb2.DeleteMessageRequest, context: Context
    ) -> messages_pb2.DeleteMessageResponse:
        message_id = parse_uuid(request.id, "id")
        message = await self._pool.run_locking(
            message_id, changes.delete_message, caller_of(context), message_id
        )
        self._committed(message.thread_id, message.change_seq)
        return messages_pb2.DeleteMessageResponse(message=message_to_proto(message))

    async def AddAttachment(
        self, request: messages_pb2.AddAttachmentRequest, context: Context
    ) -> messages_pb2.AddAttachmentResponse:
        message_id = parse_uuid(request.message_id, "message_id")
        v = Violations()
        attachment = attachment_of(v, request.attachment, self._settings, "attachment")
        v.raise_if_any()
        row, thread_id, position = await self._pool.run_locking(
            message_id,
            changes.attach,
            caller_of(context),
            message_id,
            attachment,
            max_attachments=self._settings.max_attachments,
        )
        self._committed(thread_id, position)
        return messages_pb2.AddAttachmentResponse(attachment=attachment_to_proto(row))

    async def ListAttachments(
        self, request: messages_pb2.ListAttachmentsRequest, context: Context
    ) -> messages_pb2.ListAttachmentsResponse:
        message_id = parse_uuid(request.message_id, "message_id")
        message = await self._pool.run(policy.readable_message, caller_of(context), message_id)
        return messages_pb2.ListAttachmentsResponse(
            attachments=[attachment_to_proto(a) for a in message.attachments]
        )

    async def SearchMessages(
        self, request: messages_pb2.SearchMessagesRequest, context: Context
    ) -> messages_pb2.SearchMessagesResponse:
        caller = caller_of(context)
        thread_id = parse_optional_uuid(request.thread_id, "thread_id")
        policy.check_search_scope(caller, thread_id)
        v = Violations()
        contains = metadata_of(v, request.metadata_contains, self._settings, "metadata_contains")
        if contains is None:
            v.add("metadata_contains", "must name at least one key")
        v.raise_if_any()
        assert contains is not None

        params = {"thread": str(thread_id), "contains": contains}
        page = await self._listing(
            paging.SEARCH, params, request, reads.search, caller, contains, thread_id
        )
        return as_response(page, messages_pb2.SearchMessagesResponse)

    async def StreamThreadMessages(
        self, request: messages_pb2.StreamThreadMessagesRequest, context: Context
    ) -> AsyncIterator[messages_pb2.StreamThreadMessagesResponse]:
        thread_id = parse_uuid(request.thread_id, "thread_id")
        after = decode_cursor(request.after, thread_id) if request.after else None
        async for response in self._hub.stream(thread_id, after, caller_of(context)):
            yield response

    async def StreamUserEvents(
        self, request: messages_pb2.StreamUserEventsRequest, context: Context
    ) -> AsyncIterator[messages_pb2.StreamUserEventsResponse]:
        user_id = parse_uuid(request.user_id, "user_id")
        policy.check_own_stream(caller_of(context), user_id)
        after = decode_user_cursor(request.after) if request.after else None
        async for response in self._hub.users.stream(user_id, after):
            yield response
