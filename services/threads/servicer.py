"""chat.v1.ThreadsService: translates protobuf requests into store calls.

Each method parses its request, asks `policy` whether the caller may do it,
calls the store and converts the result. Every permission decision is in
services/threads/policy.py, with the rules it keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol
from uuid import UUID

from chat.v1 import threads_pb2, threads_pb2_grpc

from services.common.access import Role
from services.common.convert import to_timestamp
from services.common.errors import InvalidArgument
from services.common.fieldmask import update_paths
from services.common.identity import caller_of
from services.common.pagination import ID, TIME_ID, PageCodec, PageKind, page_size_of
from services.common.server import Runtime
from services.common.thread_protos import (
    ROLE_FROM_PROTO,
    fill_participant,
    fill_thread,
    participant_to_proto,
    thread_to_proto,
)
from services.common.types import Context
from services.common.validation import Violations, parse_timestamp, parse_uuid, parse_uuids
from services.threads import changes, policy, store
from services.threads.typing_limit import TypingLimiter, TypingSettings

NAME_MAX = 255
PARTICIPANTS_PER_CALL_MAX = 1000
INT32_MAX = 2**31 - 1  # InboxThread.unread_count is an int32
INBOX_PAGES = PageCodec(PageKind.INBOX, TIME_ID)
PARTICIPANT_PAGES = PageCodec(PageKind.PARTICIPANTS, ID)


def _user_ids(raw: Sequence[str], field: str) -> list[UUID]:
    """Valid, de-duplicated UUIDs in request order, at most PARTICIPANTS_PER_CALL_MAX."""
    if len(raw) > PARTICIPANTS_PER_CALL_MAX:
        raise InvalidArgument.field(field, f"at most {PARTICIPANTS_PER_CALL_MAX} users per call")
    violations = Violations()
    ids = [violations.check_uuid(value, f"{field}[{i}]") for i, value in enumerate(raw)]
    violations.raise_if_any()
    return list(dict.fromkeys(i for i in ids if i is not None))


class _ThreadAndUser(Protocol):
    """A request naming a thread and one user in it (RemoveParticipant,
    UpdateParticipant, MarkRead)."""

    @property
    def thread_id(self) -> str: ...

    @property
    def user_id(self) -> str: ...


def _thread_and_user(request: _ThreadAndUser) -> tuple[UUID, UUID]:
    """The request's thread_id and user_id. Checked in that order, one at a time:
    the first bad one is the INVALID_ARGUMENT, as these RPCs have always reported."""
    return parse_uuid(request.thread_id, "thread_id"), parse_uuid(request.user_id, "user_id")


def _role_of(value: threads_pb2.ParticipantRole.ValueType, field: str, default: Role) -> Role:
    if value == threads_pb2.PARTICIPANT_ROLE_UNSPECIFIED:
        return default
    if value not in ROLE_FROM_PROTO:
        raise InvalidArgument.field(field, "must be OWNER, ADMIN or MEMBER")
    return Role(ROLE_FROM_PROTO[value])


class ThreadsServicer(threads_pb2_grpc.ThreadsServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._pool = runtime.pool
        self._typing = TypingLimiter(TypingSettings())

    async def CreateThread(
        self, request: threads_pb2.CreateThreadRequest, context: Context
    ) -> threads_pb2.CreateThreadResponse:
        violations = Violations()
        violations.check_name(request.name, "name", max_len=NAME_MAX)
        creator = violations.check_uuid(request.creator_id, "creator_id")
        violations.raise_if_any()
        assert creator is not None
        others = [u for u in _user_ids(request.participant_ids, "participant_ids") if u != creator]
        policy.may_create_group(caller_of(context), creator)
        members = {creator: Role.OWNER, **dict.fromkeys(others, Role.MEMBER)}
        thread, participants = await self._pool.run(
            changes.create_group, request.name or None, members
        )
        return threads_pb2.CreateThreadResponse(
            thread=thread_to_proto(thread),
            participants=[participant_to_proto(p) for p in participants],
        )

    async def GetOrCreateDirectThread(
        self, request: threads_pb2.GetOrCreateDirectThreadRequest, context: Context
    ) -> threads_pb2.GetOrCreateDirectThreadResponse:
        ids = _user_ids(request.user_ids, "user_ids")
        if len(ids) != 2 or len(request.user_ids) != 2:
            raise InvalidArgument.field("user_ids", "must name exactly two distinct users")
        policy.may_open_direct(caller_of(context), ids)
        thread, created = await self._pool.run(changes.open_direct, ids)
        return threads_pb2.GetOrCreateDirectThreadResponse(
            thread=thread_to_proto(thread), created=created
        )

    async def GetThread(
        self, request: threads_pb2.GetThreadRequest, context: Context
    ) -> threads_pb2.GetThreadResponse:
        thread_id = parse_uuid(request.id, "id")
        access = await self._pool.run(policy.readable, caller_of(context), thread_id)
        return threads_pb2.GetThreadResponse(thread=thread_to_proto(access.thread))

    async def ListThreads(
        self, request: threads_pb2.ListThreadsRequest, context: Context
    ) -> threads_pb2.ListThreadsResponse:
        user_id = parse_uuid(request.user_id, "user_id")
        size = page_size_of(request.page_size)
        policy.acts_as(caller_of(context), user_id)
        params = {"user": str(user_id), "archived": request.include_archived}
        page = INBOX_PAGES.page(size, request.page_token, params)
        found = await self._pool.run(
            store.inbox,
            user_id,
            include_archived=request.include_archived,
            after=page.after,
            limit=page.fetch,
        )
        rows, token = page.finish(found, lambda row: (row.activity_at, row.thread.id))
        response = threads_pb2.ListThreadsResponse(next_page_token=token)
        for row in rows:
            item = response.threads.add()  # filled in place (thread_protos.fill_*)
            fill_thread(item.thread, row.thread)
            fill_participant(item.participant, row.participant)
            item.unread_count = min(row.unread, INT32_MAX)
            # unread_count_capped stays false: deprecated, counts are exact.
        return response

    async def UpdateThread(
        self, request: threads_pb2.UpdateThreadRequest, context: Context
    ) -> threads_pb2.UpdateThreadResponse:
        thread_id = parse_uuid(request.thread.id, "thread.id")
        paths = update_paths(request.update_mask, request.thread, ("name", "is_archived"))
        violations = Violations()
        if "name" in paths:
            violations.check_name(request.thread.name, "thread.name", max_len=NAME_MAX)
        violations.raise_if_any()
        updated = await self._pool.run_locking(
            thread_id,
            changes.update_thread,
            caller_of(context),
            thread_id,
            name=("name" in paths, request.thread.name or None),
            archived=("is_archived" in paths, request.thread.is_archived),
        )
        return threads_pb2.UpdateThreadResponse(thread=thread_to_proto(updated))

    async def DeleteThread(
        self, request: threads_pb2.DeleteThreadRequest, context: Context
    ) -> threads_pb2.DeleteThreadResponse:
        thread_id = parse_uuid(request.id, "id")
        await self._pool.run_locking(
            thread_id, changes.delete_thread, caller_of(context), thread_id
        )
        return threads_pb2.DeleteThreadResponse()

    async def AddParticipants(
        self, request: threads_pb2.AddParticipantsRequest, context: Context
    ) -> threads_pb2.AddParticipantsResponse:
        thread_id = parse_uuid(request.thread_id, "thread_id")
        ids = _user_ids(request.user_ids, "user_ids")
        if not ids:
            raise InvalidArgument.field("user_ids", "name at least one user")
        role = _role_of(request.role, "role", Role.MEMBER)
        rows = await self._pool.run_locking(
            thread_id, changes.add_participants, caller_of(context), thread_id, ids, role
        )
        return threads_pb2.AddParticipantsResponse(
            participants=[participant_to_proto(p) for p in rows]
        )

    async def RemoveParticipant(
        self, request: threads_pb2.RemoveParticipantRequest, context: Context
    ) -> threads_pb2.RemoveParticipantResponse:
        thread_id, user_id = _thread_and_user(request)
        await self._pool.run_locking(
            thread_id, changes.remove_participant, caller_of(context), thread_id, user_id
        )
        return threads_pb2.RemoveParticipantResponse()

    async def UpdateParticipant(
        self, request: threads_pb2.UpdateParticipantRequest, context: Context
    ) -> threads_pb2.UpdateParticipantResponse:
        thread_id, user_id = _thread_and_user(request)
        if request.role == threads_pb2.PARTICIPANT_ROLE_UNSPECIFIED:
            raise InvalidArgument.field("role", "is required")
        role = _role_of(request.role, "role", Role.MEMBER)
        updated = await self._pool.run_locking(
            thread_id, changes.set_role, caller_of(context), thread_id, user_id, role
        )
        return threads_pb2.UpdateParticipantResponse(participant=participant_to_proto(updated))

    async def ListParticipants(
        self, request: threads_pb2.ListParticipantsRequest, context: Context
    ) -> threads_pb2.ListParticipantsResponse:
        thread_id = parse_uuid(request.thread_id, "thread_id")
        size = page_size_of(request.page_size)
        page = PARTICIPANT_PAGES.page(size, request.page_token, {"thread": str(thread_id)})
        found = await self._pool.run(
            changes.participants, caller_of(context), thread_id, page.after, page.fetch
        )
        rows, token = page.finish(found, lambda row: row.user_id)
        return threads_pb2.ListParticipantsResponse(
            participants=[participant_to_proto(p) for p in rows], next_page_token=token
        )

    async def MarkRead(
        self, request: threads_pb2.MarkReadRequest, context: Context
    ) -> threads_pb2.MarkReadResponse:
        thread_id, user_id = _thread_and_user(request)
        policy.acts_as(caller_of(context), user_id)
        read_at = (
            parse_timestamp(request.read_at, "read_at") if request.HasField("read_at") else None
        )
        # Waits for the thread row (a share lock, see store.MARK_READ).
        row = await self._pool.run_locking(thread_id, store.mark_read, thread_id, user_id, read_at)
        return threads_pb2.MarkReadResponse(participant=participant_to_proto(row))

    async def GetUnreadCount(
        self, request: threads_pb2.GetUnreadCountRequest, context: Context
    ) -> threads_pb2.GetUnreadCountResponse:
        user_id = parse_uuid(request.user_id, "user_id")
        policy.acts_as(caller_of(context), user_id)
        total, threads = await self._pool.run(store.unread_totals, user_id)
        # `capped` is deprecated: the total is exact.
        return threads_pb2.GetUnreadCountResponse(
            total_unread=total, unread_threads=threads, capped=False
        )

    async def SendTyping(
        self, request: threads_pb2.SendTypingRequest, context: Context
    ) -> threads_pb2.SendTypingResponse:
        thread_id, user_id = parse_uuids(thread_id=request.thread_id, user_id=request.user_id)
        caller = caller_of(context)
        policy.acts_as(caller, user_id)
        async with self._pool.acquire() as conn:
            await policy.may_type(conn, caller, thread_id, user_id)
            expire_time = self._typing.admit(thread_id, user_id)
            await store.notify_typing(conn, thread_id, user_id, expire_time)
        return threads_pb2.SendTypingResponse(expire_time=to_timestamp(expire_time))
