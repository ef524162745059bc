"""chat.v1.ThreadsService: translates protobuf requests into store calls.

Permissions (calls with x-user-id; trusted calls may do everything): only
participants see a thread (others get NOT_FOUND, so existence does not leak);
owners and admins manage participants; only owners grant or revoke ownership;
anyone may leave; the last active owner cannot leave or be demoted without handing over.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from chat.v1 import threads_pb2, threads_pb2_grpc

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
    id_position,
    page_size_of,
    time_id_position,
)
from services.common.server import Runtime
from services.common.types import Context, DbConnection
from services.common.validation import Violations, parse_timestamp, parse_uuid
from services.threads import store
from services.threads.convert import (
    ROLE_FROM_PROTO,
    participant_to_proto,
    thread_to_proto,
)

NAME_MAX = 255
PARTICIPANTS_PER_CALL_MAX = 1000
MANAGERS = ("owner", "admin")


def _user_ids(raw: Sequence[str], field: str) -> list[UUID]:
    """Valid, de-duplicated UUIDs in request order, at most PARTICIPANTS_PER_CALL_MAX."""
    if len(raw) > PARTICIPANTS_PER_CALL_MAX:
        raise InvalidArgument.field(field, f"at most {PARTICIPANTS_PER_CALL_MAX} users per call")
    violations = Violations()
    ids = [violations.check_uuid(value, f"{field}[{i}]") for i, value in enumerate(raw)]
    violations.raise_if_any()
    return list(dict.fromkeys(i for i in ids if i is not None))


def _require_own(caller: Caller, user_id: UUID) -> None:
    if not caller.trusted and not caller.is_user(user_id):
        raise PermissionDenied("a user may only act on their own inbox and read state")


async def _require_users(conn: DbConnection, user_ids: Sequence[UUID]) -> None:
    """NOT_FOUND unless every user exists; they stay locked against deletion (call it
    before locking a thread: users first, then threads, the order DeleteUser takes)."""
    missing = await store.lock_users(conn, user_ids)
    if missing:
        names = ", ".join(map(str, missing))
        raise NotFound("user", names, f"unknown users: {names}")


async def _visible_thread(
    conn: DbConnection, caller: Caller, thread_id: UUID, *, lock: bool = False
) -> tuple[store.ThreadRow, store.ParticipantRow | None]:
    """The thread and the caller's membership; NOT_FOUND unless a participant (or trusted)."""
    thread = await store.get_thread(conn, thread_id, lock=lock)
    if caller.user_id is None:
        return thread, None
    member = await store.membership(conn, thread_id, caller.user_id)
    if member is None:
        raise NotFound("thread", str(thread_id))
    return thread, member


def _role_of(value: threads_pb2.ParticipantRole.ValueType, field: str, default: str) -> str:
    if value == threads_pb2.PARTICIPANT_ROLE_UNSPECIFIED:
        return default
    if value not in ROLE_FROM_PROTO:
        raise InvalidArgument.field(field, "must be OWNER, ADMIN or MEMBER")
    return ROLE_FROM_PROTO[value]


def _group_only(thread: store.ThreadRow) -> None:
    if thread.is_direct:
        raise FailedPrecondition(
            "a direct thread always has exactly its two participants",
            reason="DIRECT_THREAD",
            subject=f"thread/{thread.id}",
        )


def _not_archived(thread: store.ThreadRow) -> None:
    """An archived thread is read-only: read, unarchive, leave and delete only.

    Renaming it, adding participants, removing others and changing roles are
    refused until it is unarchived (the messages service refuses sends, edits and
    attachments the same way).
    """
    if thread.is_archived:
        raise FailedPrecondition(
            "the thread is archived: unarchive it first",
            reason="THREAD_ARCHIVED",
            subject=f"thread/{thread.id}",
        )


class ThreadsServicer(threads_pb2_grpc.ThreadsServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._pool = runtime.pool

    async def CreateThread(
        self, request: threads_pb2.CreateThreadRequest, context: Context
    ) -> threads_pb2.CreateThreadResponse:
        violations = Violations()
        violations.check_name(request.name, "name", max_len=NAME_MAX)
        creator = violations.check_uuid(request.creator_id, "creator_id")
        violations.raise_if_any()
        assert creator is not None
        others = [u for u in _user_ids(request.participant_ids, "participant_ids") if u != creator]
        caller = caller_of(context)
        if not caller.trusted and not caller.is_user(creator):
            raise PermissionDenied("creator_id must be the calling user")
        members = {creator: "owner", **dict.fromkeys(others, "member")}
        async with self._pool.acquire() as conn, conn.transaction():
            await _require_users(conn, list(members))
            thread, participants = await store.create_group(conn, request.name or None, members)
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
        caller = caller_of(context)
        if not caller.trusted and caller.user_id not in ids:
            raise PermissionDenied("the calling user must be one of the two users")
        async with self._pool.acquire() as conn, conn.transaction():
            await _require_users(conn, ids)
            thread, created = await store.get_or_create_direct(conn, ids[0], ids[1])
        return threads_pb2.GetOrCreateDirectThreadResponse(
            thread=thread_to_proto(thread), created=created
        )

    async def GetThread(
        self, request: threads_pb2.GetThreadRequest, context: Context
    ) -> threads_pb2.GetThreadResponse:
        thread_id = parse_uuid(request.id, "id")
        async with self._pool.acquire() as conn:
            thread, _ = await _visible_thread(conn, caller_of(context), thread_id)
        return threads_pb2.GetThreadResponse(thread=thread_to_proto(thread))

    async def ListThreads(
        self, request: threads_pb2.ListThreadsRequest, context: Context
    ) -> threads_pb2.ListThreadsResponse:
        user_id = parse_uuid(request.user_id, "user_id")
        size = page_size_of(request.page_size)
        _require_own(caller_of(context), user_id)
        params = {"user": str(user_id), "archived": request.include_archived}
        position = decode_page_token(request.page_token, "inbox", params)
        after = time_id_position(position) if position else None
        async with self._pool.acquire() as conn:
            rows = await store.inbox(
                conn,
                user_id,
                include_archived=request.include_archived,
                after=after,
                limit=size + 1,
            )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            token = encode_page_token(
                "inbox", params, [last.activity_at.isoformat(), str(last.thread.id)]
            )
        return threads_pb2.ListThreadsResponse(
            threads=[
                threads_pb2.InboxThread(
                    thread=thread_to_proto(r.thread),
                    participant=participant_to_proto(r.participant),
                    unread_count=min(r.unread, store.UNREAD_CAP),
                    unread_count_capped=r.unread > store.UNREAD_CAP,
                )
                for r in rows
            ],
            next_page_token=token,
        )

    async def UpdateThread(
        self, request: threads_pb2.UpdateThreadRequest, context: Context
    ) -> threads_pb2.UpdateThreadResponse:
        thread_id = parse_uuid(request.thread.id, "thread.id")
        paths = update_paths(request.update_mask, request.thread, ("name", "is_archived"))
        violations = Violations()
        if "name" in paths:
            violations.check_name(request.thread.name, "thread.name", max_len=NAME_MAX)
        violations.raise_if_any()
        caller = caller_of(context)
        async with self._pool.acquire(locking=thread_id) as conn, conn.transaction():
            thread, member = await _visible_thread(conn, caller, thread_id, lock=True)
            if member is not None and member.role not in MANAGERS:
                raise PermissionDenied("only owners and admins change a thread")
            if "name" in paths and thread.is_direct:
                _group_only(thread)
            unarchives = "is_archived" in paths and not request.thread.is_archived
            if "name" in paths and not unarchives:
                _not_archived(thread)
            updated = await store.update_thread(
                conn,
                thread_id,
                name=("name" in paths, request.thread.name or None),
                archived=("is_archived" in paths, request.thread.is_archived),
            )
        return threads_pb2.UpdateThreadResponse(thread=thread_to_proto(updated))

    async def DeleteThread(
        self, request: threads_pb2.DeleteThreadRequest, context: Context
    ) -> threads_pb2.DeleteThreadResponse:
        thread_id = parse_uuid(request.id, "id")
        caller = caller_of(context)
        async with self._pool.acquire(locking=thread_id) as conn, conn.transaction():
            _, member = await _visible_thread(conn, caller, thread_id, lock=True)
            if member is not None and member.role != "owner":
                raise PermissionDenied("only an owner deletes a thread")
            await store.delete_thread(conn, thread_id)
        return threads_pb2.DeleteThreadResponse()

    async def AddParticipants(
        self, request: threads_pb2.AddParticipantsRequest, context: Context
    ) -> threads_pb2.AddParticipantsResponse:
        thread_id = parse_uuid(request.thread_id, "thread_id")
        ids = _user_ids(request.user_ids, "user_ids")
        if not ids:
            raise InvalidArgument.field("user_ids", "name at least one user")
        role = _role_of(request.role, "role", "member")
        caller = caller_of(context)
        async with self._pool.acquire(locking=thread_id) as conn, conn.transaction():
            await _require_users(conn, ids)
            thread, member = await _visible_thread(conn, caller, thread_id, lock=True)
            _group_only(thread)
            _not_archived(thread)
            if member is not None:
                if member.role not in MANAGERS:
                    raise PermissionDenied("only owners and admins add participants")
                if role == "owner" and member.role != "owner":
                    raise PermissionDenied("only an owner makes others owners")
            await store.add_participants(conn, thread_id, dict.fromkeys(ids, role))
            rows = await store.participants_of(conn, thread_id, ids)
        return threads_pb2.AddParticipantsResponse(
            participants=[participant_to_proto(p) for p in rows]
        )

    async def RemoveParticipant(
        self, request: threads_pb2.RemoveParticipantRequest, context: Context
    ) -> threads_pb2.RemoveParticipantResponse:
        thread_id = parse_uuid(request.thread_id, "thread_id")
        user_id = parse_uuid(request.user_id, "user_id")
        caller = caller_of(context)
        async with self._pool.acquire(locking=thread_id) as conn, conn.transaction():
            thread, member = await _visible_thread(conn, caller, thread_id, lock=True)
            target = await store.membership(conn, thread_id, user_id)
            if target is None:
                raise NotFound("participant", f"{thread_id}/{user_id}")
            _group_only(thread)
            leaving = caller.is_user(user_id)
            if not leaving and not caller.trusted:
                _not_archived(thread)  # leaving stays possible; removing others does not
            if member is not None and not leaving:
                if member.role not in MANAGERS:
                    raise PermissionDenied("only owners and admins remove others")
                if target.role == "owner" and member.role != "owner":
                    raise PermissionDenied("only an owner removes an owner")
            if (
                target.role == "owner"
                and await store.other_active_owners(conn, thread_id, user_id) == 0
            ):
                raise FailedPrecondition(
                    "the last active owner cannot leave: make another participant owner first",
                    reason="LAST_OWNER",
                    subject=f"thread/{thread_id}",
                )
            await store.remove_participant(conn, thread_id, user_id)
        return threads_pb2.RemoveParticipantResponse()

    async def UpdateParticipant(
        self, request: threads_pb2.UpdateParticipantRequest, context: Context
    ) -> threads_pb2.UpdateParticipantResponse:
        thread_id = parse_uuid(request.thread_id, "thread_id")
        user_id = parse_uuid(request.user_id, "user_id")
        if request.role == threads_pb2.PARTICIPANT_ROLE_UNSPECIFIED:
            raise InvalidArgument.field("role", "is required")
        role = _role_of(request.role, "role", "member")
        caller = caller_of(context)
        async with self._pool.acquire(locking=thread_id) as conn, conn.transaction():
            thread, member = await _visible_thread(conn, caller, thread_id, lock=True)
            target = await store.membership(conn, thread_id, user_id)
            if target is None:
                raise NotFound("participant", f"{thread_id}/{user_id}")
            _group_only(thread)
            _not_archived(thread)
            if member is not None:
                if member.role not in MANAGERS:
                    raise PermissionDenied("only owners and admins change roles")
                if "owner" in (role, target.role) and member.role != "owner":
                    raise PermissionDenied("only an owner grants or revokes ownership")
            if (
                target.role == "owner"
                and role != "owner"
                and await store.other_active_owners(conn, thread_id, user_id) == 0
            ):
                raise FailedPrecondition(
                    "the last active owner cannot step down: make another participant owner first",
                    reason="LAST_OWNER",
                    subject=f"thread/{thread_id}",
                )
            updated = await store.set_role(conn, thread_id, user_id, role)
        return threads_pb2.UpdateParticipantResponse(participant=participant_to_proto(updated))

    async def ListParticipants(
        self, request: threads_pb2.ListParticipantsRequest, context: Context
    ) -> threads_pb2.ListParticipantsResponse:
        thread_id = parse_uuid(request.thread_id, "thread_id")
        size = page_size_of(request.page_size)
        params = {"thread": str(thread_id)}
        position = decode_page_token(request.page_token, "participants", params)
        after = id_position(position) if position else None
        async with self._pool.acquire() as conn:
            await _visible_thread(conn, caller_of(context), thread_id)
            rows = await store.list_participants(conn, thread_id, after, size + 1)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = encode_page_token("participants", params, [str(rows[-1].user_id)])
        return threads_pb2.ListParticipantsResponse(
            participants=[participant_to_proto(p) for p in rows], next_page_token=token
        )

    async def MarkRead(
        self, request: threads_pb2.MarkReadRequest, context: Context
    ) -> threads_pb2.MarkReadResponse:
        thread_id = parse_uuid(request.thread_id, "thread_id")
        user_id = parse_uuid(request.user_id, "user_id")
        _require_own(caller_of(context), user_id)
        read_at = (
            parse_timestamp(request.read_at, "read_at") if request.HasField("read_at") else None
        )
        # Waits for the thread row (a share lock, see store.MARK_READ).
        async with self._pool.acquire(locking=thread_id) as conn:
            row = await store.mark_read(conn, thread_id, user_id, read_at)
        return threads_pb2.MarkReadResponse(participant=participant_to_proto(row))

    async def GetUnreadCount(
        self, request: threads_pb2.GetUnreadCountRequest, context: Context
    ) -> threads_pb2.GetUnreadCountResponse:
        user_id = parse_uuid(request.user_id, "user_id")
        _require_own(caller_of(context), user_id)
        async with self._pool.acquire() as conn:
            total, threads, capped = await store.unread_totals(conn, user_id)
        return threads_pb2.GetUnreadCountResponse(
            total_unread=total, unread_threads=threads, capped=capped
        )
