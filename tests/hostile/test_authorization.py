"""Who may do what: every RPC of every service, called as each kind of user.

Each cell runs in a fresh "world" so a destructive call (delete, remove) never
changes what the next cell sees. The identities, relative to the group thread
`thread` and the message `message` its member wrote:

- owner:       the thread's OWNER
- member:      a MEMBER, and the message's author
- outsider:    an active user who never took part
- removed:     a former MEMBER, removed through RemoveParticipant
- inactive:    a MEMBER whose account is deactivated (is_active = false)
- other_owner: the OWNER of another thread, not in this one

Outsiders, removed users and other owners get NOT_FOUND for anything inside the
thread (existence does not leak); a deactivated account gets PERMISSION_DENIED
(USER_INACTIVE) for everything. The same table is in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from chat.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    messages_pb2,
    messages_pb2_grpc,
    threads_pb2,
    threads_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)
from google.protobuf import field_mask_pb2, struct_pb2

from tests.rpc_errors import as_user, error_info

IDENTITIES = ("owner", "member", "outsider", "removed", "inactive", "other_owner")
OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
HIDDEN = grpc.StatusCode.NOT_FOUND


@dataclass
class World:
    users: dict[str, str]  # identity -> user id
    newcomer: str  # a user nobody has added yet
    thread: str
    message: str
    before: str  # the cursor just before `message`, to stream from


@dataclass
class Stubs:
    users: Any
    threads: Any
    messages: Any
    admin: Any


@pytest.fixture
def stubs(channels: dict[str, grpc.aio.Channel]) -> Stubs:
    return Stubs(
        users_pb2_grpc.UsersServiceStub(channels["users"]),
        threads_pb2_grpc.ThreadsServiceStub(channels["threads"]),
        messages_pb2_grpc.MessagesServiceStub(channels["messages"]),
        admin_pb2_grpc.AdminServiceStub(channels["messages"]),
    )


async def _user(db: asyncpg.Pool) -> str:
    tag = f"u{uuid.uuid4().hex[:12]}"
    return str(
        await db.fetchval(
            "INSERT INTO users (email, username) VALUES ($1 || '@x.io', $1) RETURNING id", tag
        )
    )


async def build_world(db: asyncpg.Pool, stubs: Stubs) -> World:
    users = {name: await _user(db) for name in IDENTITIES}
    newcomer = await _user(db)
    created = await stubs.threads.CreateThread(
        threads_pb2.CreateThreadRequest(
            name="room",
            creator_id=users["owner"],
            participant_ids=[users["member"], users["removed"], users["inactive"]],
        )
    )
    thread = created.thread.id
    await stubs.threads.CreateThread(
        threads_pb2.CreateThreadRequest(name="elsewhere", creator_id=users["other_owner"])
    )
    await stubs.threads.RemoveParticipant(
        threads_pb2.RemoveParticipantRequest(thread_id=thread, user_id=users["removed"])
    )
    earlier = await stubs.messages.SendMessage(
        messages_pb2.SendMessageRequest(thread_id=thread, user_id=users["owner"], content="hey")
    )
    sent = await stubs.messages.SendMessage(
        messages_pb2.SendMessageRequest(thread_id=thread, user_id=users["member"], content="hi")
    )
    await db.execute(
        "UPDATE users SET is_active = false WHERE id = $1", uuid.UUID(users["inactive"])
    )
    return World(users, newcomer, thread, sent.message.id, earlier.message.cursor)


Call = Callable[[Stubs, World, str], Awaitable[object]]


async def _open_stream(stubs: Stubs, world: World, me: str) -> Any:
    """A stream of the thread as `me`, past its first event: the message, replayed."""
    stream = stubs.messages.StreamThreadMessages(
        messages_pb2.StreamThreadMessagesRequest(thread_id=world.thread, after=world.before),
        metadata=as_user(me),
    )
    try:
        event = await asyncio.wait_for(stream.read(), timeout=30)
    except BaseException:
        stream.cancel()
        raise
    assert event.created.id == world.message  # replayed from the cursor
    return stream


async def _end_of(stream: Any) -> grpc.aio.AioRpcError:
    """The error the server ends `stream` with (bounded wait for each event)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while True:
            await asyncio.wait_for(stream.read(), timeout=30)
    return caught.value


async def _first_event(stubs: Stubs, world: World, me: str) -> object:
    (await _open_stream(stubs, world, me)).cancel()
    return None


async def _own_user_stream(stubs: Stubs, world: World, me: str) -> object:
    """The member's user stream, as `me`, up to its caught_up."""
    stream = stubs.messages.StreamUserEvents(
        messages_pb2.StreamUserEventsRequest(user_id=world.users["member"]), metadata=as_user(me)
    )
    try:
        event = await asyncio.wait_for(stream.read(), timeout=30)
        assert event.WhichOneof("event") == "caught_up"
    finally:
        stream.cancel()
    return None


def _user_mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


_TEXT = struct_pb2.Value(string_value="v")

# rpc -> the call, made as the given user id
CALLS: dict[str, Call] = {
    # users: reads are open to every active user; changes only to one's own account
    "UsersService/CreateUser": lambda s, w, me: s.users.CreateUser(
        users_pb2.CreateUserRequest(
            user=users_pb2.User(email=f"{uuid.uuid4().hex}@x.io", username=uuid.uuid4().hex[:20])
        ),
        metadata=as_user(me),
    ),
    "UsersService/GetUser": lambda s, w, me: s.users.GetUser(
        users_pb2.GetUserRequest(id=w.users["owner"]), metadata=as_user(me)
    ),
    "UsersService/LookupUser": lambda s, w, me: s.users.LookupUser(
        users_pb2.LookupUserRequest(email=f"{w.newcomer[:0]}nobody@x.io"), metadata=as_user(me)
    ),
    "UsersService/BatchGetUsers": lambda s, w, me: s.users.BatchGetUsers(
        users_pb2.BatchGetUsersRequest(ids=[w.users["owner"]]), metadata=as_user(me)
    ),
    "UsersService/ListUsers": lambda s, w, me: s.users.ListUsers(
        users_pb2.ListUsersRequest(), metadata=as_user(me)
    ),
    "UsersService/UpdateUser": lambda s, w, me: s.users.UpdateUser(
        users_pb2.UpdateUserRequest(
            user=users_pb2.User(id=w.users["member"], first_name="New"),
            update_mask=_user_mask("first_name"),
        ),
        metadata=as_user(me),
    ),
    "UsersService/DeleteUser": lambda s, w, me: s.users.DeleteUser(
        users_pb2.DeleteUserRequest(id=w.users["member"]), metadata=as_user(me)
    ),
    "UsersService/RecordLogin": lambda s, w, me: s.users.RecordLogin(
        users_pb2.RecordLoginRequest(id=w.users["member"]), metadata=as_user(me)
    ),
    # threads
    "ThreadsService/CreateThread": lambda s, w, me: s.threads.CreateThread(
        threads_pb2.CreateThreadRequest(creator_id=me, participant_ids=[w.newcomer]),
        metadata=as_user(me),
    ),
    "ThreadsService/GetOrCreateDirectThread": lambda s, w, me: s.threads.GetOrCreateDirectThread(
        threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[me, w.newcomer]),
        metadata=as_user(me),
    ),
    "ThreadsService/GetThread": lambda s, w, me: s.threads.GetThread(
        threads_pb2.GetThreadRequest(id=w.thread), metadata=as_user(me)
    ),
    "ThreadsService/ListThreads": lambda s, w, me: s.threads.ListThreads(
        threads_pb2.ListThreadsRequest(user_id=w.users["owner"]), metadata=as_user(me)
    ),
    "ThreadsService/UpdateThread": lambda s, w, me: s.threads.UpdateThread(
        threads_pb2.UpdateThreadRequest(
            thread=threads_pb2.Thread(id=w.thread, name="renamed"),
            update_mask=_user_mask("name"),
        ),
        metadata=as_user(me),
    ),
    "ThreadsService/DeleteThread": lambda s, w, me: s.threads.DeleteThread(
        threads_pb2.DeleteThreadRequest(id=w.thread), metadata=as_user(me)
    ),
    "ThreadsService/AddParticipants": lambda s, w, me: s.threads.AddParticipants(
        threads_pb2.AddParticipantsRequest(thread_id=w.thread, user_ids=[w.newcomer]),
        metadata=as_user(me),
    ),
    "ThreadsService/RemoveParticipant": lambda s, w, me: s.threads.RemoveParticipant(
        threads_pb2.RemoveParticipantRequest(thread_id=w.thread, user_id=w.users["member"]),
        metadata=as_user(me),
    ),
    "ThreadsService/UpdateParticipant": lambda s, w, me: s.threads.UpdateParticipant(
        threads_pb2.UpdateParticipantRequest(
            thread_id=w.thread,
            user_id=w.users["member"],
            role=threads_pb2.PARTICIPANT_ROLE_ADMIN,
        ),
        metadata=as_user(me),
    ),
    "ThreadsService/ListParticipants": lambda s, w, me: s.threads.ListParticipants(
        threads_pb2.ListParticipantsRequest(thread_id=w.thread), metadata=as_user(me)
    ),
    "ThreadsService/MarkRead": lambda s, w, me: s.threads.MarkRead(
        threads_pb2.MarkReadRequest(thread_id=w.thread, user_id=me), metadata=as_user(me)
    ),
    "ThreadsService/GetUnreadCount": lambda s, w, me: s.threads.GetUnreadCount(
        threads_pb2.GetUnreadCountRequest(user_id=w.users["owner"]), metadata=as_user(me)
    ),
    # messages
    "MessagesService/SendMessage": lambda s, w, me: s.messages.SendMessage(
        messages_pb2.SendMessageRequest(thread_id=w.thread, user_id=me, content="x"),
        metadata=as_user(me),
    ),
    "MessagesService/GetMessage": lambda s, w, me: s.messages.GetMessage(
        messages_pb2.GetMessageRequest(id=w.message), metadata=as_user(me)
    ),
    "MessagesService/ListMessages": lambda s, w, me: s.messages.ListMessages(
        messages_pb2.ListMessagesRequest(thread_id=w.thread), metadata=as_user(me)
    ),
    "MessagesService/ListReplies": lambda s, w, me: s.messages.ListReplies(
        messages_pb2.ListRepliesRequest(parent_id=w.message), metadata=as_user(me)
    ),
    "MessagesService/ListUserMessages": lambda s, w, me: s.messages.ListUserMessages(
        messages_pb2.ListUserMessagesRequest(user_id=w.users["member"]), metadata=as_user(me)
    ),
    "MessagesService/UpdateMessage": lambda s, w, me: s.messages.UpdateMessage(
        messages_pb2.UpdateMessageRequest(
            message=messages_pb2.Message(id=w.message, content="edited"),
            update_mask=_user_mask("content"),
        ),
        metadata=as_user(me),
    ),
    "MessagesService/DeleteMessage": lambda s, w, me: s.messages.DeleteMessage(
        messages_pb2.DeleteMessageRequest(id=w.message), metadata=as_user(me)
    ),
    "MessagesService/AddAttachment": lambda s, w, me: s.messages.AddAttachment(
        messages_pb2.AddAttachmentRequest(
            message_id=w.message,
            attachment=messages_pb2.Attachment(
                name="a.txt", type="text/plain", size=1, url="https://x.io/a.txt"
            ),
        ),
        metadata=as_user(me),
    ),
    "MessagesService/ListAttachments": lambda s, w, me: s.messages.ListAttachments(
        messages_pb2.ListAttachmentsRequest(message_id=w.message), metadata=as_user(me)
    ),
    "MessagesService/SearchMessages": lambda s, w, me: s.messages.SearchMessages(
        messages_pb2.SearchMessagesRequest(
            thread_id=w.thread, metadata_contains=struct_pb2.Struct(fields={"k": _TEXT})
        ),
        metadata=as_user(me),
    ),
    "MessagesService/StreamThreadMessages": _first_event,
    "MessagesService/StreamUserEvents": _own_user_stream,
    "ThreadsService/SendTyping": lambda s, w, me: s.threads.SendTyping(
        threads_pb2.SendTypingRequest(thread_id=w.thread, user_id=me), metadata=as_user(me)
    ),
    # operators only: no end user may read database statistics
    "AdminService/GetDatabaseStats": lambda s, w, me: s.admin.GetDatabaseStats(
        admin_pb2.GetDatabaseStatsRequest(), metadata=as_user(me)
    ),
}

EVERYONE = ("owner", "member", "outsider", "removed", "other_owner")
PARTICIPANTS = ("owner", "member")


def _expect(allowed: tuple[str, ...], otherwise: grpc.StatusCode) -> dict[str, grpc.StatusCode]:
    outcome = {who: (OK if who in allowed else otherwise) for who in EVERYONE}
    outcome["inactive"] = DENIED  # a deactivated account acts on nothing
    return outcome


def _inside_thread(allowed: tuple[str, ...]) -> dict[str, grpc.StatusCode]:
    """Participants not in `allowed` are DENIED; non-participants see NOT_FOUND."""
    outcome = _expect(allowed, HIDDEN)
    for who in PARTICIPANTS:
        if who not in allowed:
            outcome[who] = DENIED
    return outcome


EXPECTED: dict[str, dict[str, grpc.StatusCode]] = {
    "UsersService/CreateUser": _expect(EVERYONE, DENIED),
    "UsersService/GetUser": _expect(EVERYONE, DENIED),
    "UsersService/LookupUser": _expect((), HIDDEN),  # open, but nobody has that email
    "UsersService/BatchGetUsers": _expect(EVERYONE, DENIED),
    "UsersService/ListUsers": _expect(EVERYONE, DENIED),
    "UsersService/UpdateUser": _expect(("member",), DENIED),
    "UsersService/DeleteUser": _expect(("member",), DENIED),
    "UsersService/RecordLogin": _expect(("member",), DENIED),
    "ThreadsService/CreateThread": _expect(EVERYONE, DENIED),
    "ThreadsService/GetOrCreateDirectThread": _expect(EVERYONE, DENIED),
    "ThreadsService/GetThread": _inside_thread(PARTICIPANTS),
    "ThreadsService/ListThreads": _expect(("owner",), DENIED),  # only one's own inbox
    "ThreadsService/UpdateThread": _inside_thread(("owner",)),
    "ThreadsService/DeleteThread": _inside_thread(("owner",)),
    "ThreadsService/AddParticipants": _inside_thread(("owner",)),
    "ThreadsService/RemoveParticipant": _inside_thread(PARTICIPANTS),  # the member leaves
    "ThreadsService/UpdateParticipant": _inside_thread(("owner",)),
    "ThreadsService/ListParticipants": _inside_thread(PARTICIPANTS),
    "ThreadsService/MarkRead": _inside_thread(PARTICIPANTS),
    "ThreadsService/GetUnreadCount": _expect(("owner",), DENIED),  # only one's own
    "MessagesService/SendMessage": _inside_thread(PARTICIPANTS),
    "MessagesService/GetMessage": _inside_thread(PARTICIPANTS),
    "MessagesService/ListMessages": _inside_thread(PARTICIPANTS),
    "MessagesService/ListReplies": _inside_thread(PARTICIPANTS),
    "MessagesService/ListUserMessages": _expect(("member",), DENIED),  # only one's own
    "MessagesService/UpdateMessage": _inside_thread(("member",)),  # only the author
    "MessagesService/DeleteMessage": _inside_thread(PARTICIPANTS),  # author or owner/admin
    "MessagesService/AddAttachment": _inside_thread(("member",)),  # only the author
    "MessagesService/ListAttachments": _inside_thread(PARTICIPANTS),
    "MessagesService/SearchMessages": _inside_thread(PARTICIPANTS),
    "MessagesService/StreamThreadMessages": _inside_thread(PARTICIPANTS),
    "MessagesService/StreamUserEvents": _expect(("member",), DENIED),  # only one's own
    "ThreadsService/SendTyping": _inside_thread(PARTICIPANTS),
    "AdminService/GetDatabaseStats": _expect((), DENIED),
}


def test_the_matrix_covers_every_rpc() -> None:
    every = {
        f"{service.name}/{method.name}"
        for descriptor in (
            users_pb2.DESCRIPTOR,
            threads_pb2.DESCRIPTOR,
            messages_pb2.DESCRIPTOR,
            admin_pb2.DESCRIPTOR,
        )
        for service in descriptor.services_by_name.values()
        for method in service.methods
    }
    assert set(CALLS) == every
    assert set(EXPECTED) == every
    assert all(set(row) == set(IDENTITIES) for row in EXPECTED.values())


async def _outcome(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), error_info(err).reason
    return OK, ""


@pytest.mark.parametrize("rpc", sorted(CALLS))
async def test_who_may_call(rpc: str, stubs: Stubs, db_pool: asyncpg.Pool) -> None:
    seen: dict[str, grpc.StatusCode] = {}
    for who in IDENTITIES:
        world = await build_world(db_pool, stubs)
        code, reason = await _outcome(CALLS[rpc](stubs, world, world.users[who]))
        seen[who] = code
        if who == "inactive":
            assert reason == "USER_INACTIVE", (rpc, reason)
    assert seen == EXPECTED[rpc]


async def test_a_removed_participants_open_stream_ends(stubs: Stubs, db_pool: asyncpg.Pool) -> None:
    world = await build_world(db_pool, stubs)
    stream = await _open_stream(stubs, world, world.users["member"])
    await stubs.threads.RemoveParticipant(
        threads_pb2.RemoveParticipantRequest(thread_id=world.thread, user_id=world.users["member"]),
        metadata=as_user(world.users["owner"]),
    )
    assert (await _end_of(stream)).code() == HIDDEN


@pytest.mark.parametrize("how", ["deactivated", "deleted"])
async def test_a_gone_users_open_streams_end(stubs: Stubs, db_pool: asyncpg.Pool, how: str) -> None:
    world = await build_world(db_pool, stubs)
    member = world.users["member"]
    stream = await _open_stream(stubs, world, member)
    if how == "deactivated":
        await stubs.users.UpdateUser(
            users_pb2.UpdateUserRequest(
                user=users_pb2.User(id=member, is_active=False),
                update_mask=_user_mask("is_active"),
            )
        )
    else:
        await stubs.users.DeleteUser(users_pb2.DeleteUserRequest(id=member))
    ended = await _end_of(stream)
    assert ended.code() == DENIED
    assert error_info(ended).reason == "USER_INACTIVE"
