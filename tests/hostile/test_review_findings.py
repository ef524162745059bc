"""What an adversarial review of the issue-14 fixes broke, kept as regression tests.

Every test is a caller we did not write doing something the READMEs say is safe:
ownership hand-on (services/threads/README.md), "no input yields INTERNAL"
(README.md, docs/reliability.md) and "every race answers with a documented code,
never INTERNAL" (issue 14). The races are run a bounded number of rounds and
fail on the first bad outcome; before the fixes each failed in most rounds
(counts in the docstrings): the last-owner rule now counts active owners only,
a departure locks the user and then all their threads in one id order
(chat_lock_departure), membership changes lock the users they name before the
thread, page tokens and URLs are parsed without escaping exceptions.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid

import asyncpg
import grpc
import pytest
from chat.v1 import (
    messages_pb2,
    messages_pb2_grpc,
    threads_pb2,
    threads_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)
from google.protobuf import field_mask_pb2

from tests.rpc_errors import as_user

ROUNDS = 30


class Stack:
    def __init__(self, channels: dict[str, grpc.aio.Channel]) -> None:
        self.users = users_pb2_grpc.UsersServiceStub(channels["users"])
        self.threads = threads_pb2_grpc.ThreadsServiceStub(channels["threads"])
        self.messages = messages_pb2_grpc.MessagesServiceStub(channels["messages"])

    async def user(self) -> str:
        tag = f"r{uuid.uuid4().hex[:12]}"
        reply = await self.users.CreateUser(
            users_pb2.CreateUserRequest(user=users_pb2.User(email=f"{tag}@x.io", username=tag))
        )
        return reply.user.id

    async def group(self, creator: str, others: list[str]) -> str:
        reply = await self.threads.CreateThread(
            threads_pb2.CreateThreadRequest(name="g", creator_id=creator, participant_ids=others)
        )
        return reply.thread.id

    async def set_role(
        self, thread: str, user: str, role: threads_pb2.ParticipantRole.ValueType
    ) -> None:
        await self.threads.UpdateParticipant(
            threads_pb2.UpdateParticipantRequest(thread_id=thread, user_id=user, role=role)
        )

    def deactivate(self, user: str):  # type: ignore[no-untyped-def]
        return self.users.UpdateUser(
            users_pb2.UpdateUserRequest(
                user=users_pb2.User(id=user, is_active=False),
                update_mask=field_mask_pb2.FieldMask(paths=["is_active"]),
            )
        )

    def delete(self, user: str):  # type: ignore[no-untyped-def]
        return self.users.DeleteUser(users_pb2.DeleteUserRequest(id=user))


@pytest.fixture
def stack(channels: dict[str, grpc.aio.Channel]) -> Stack:
    return Stack(channels)


async def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def active_owners(db: asyncpg.Pool, thread: str) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM thread_participants p JOIN users u ON u.id = p.user_id "
            "WHERE p.thread_id = $1 AND p.role = 'owner' AND u.is_active",
            uuid.UUID(thread),
        )
    )


OWNER, ADMIN, MEMBER = (
    threads_pb2.PARTICIPANT_ROLE_OWNER,
    threads_pb2.PARTICIPANT_ROLE_ADMIN,
    threads_pb2.PARTICIPANT_ROLE_MEMBER,
)


# -- ownership hand-on ------------------------------------------------------------


async def test_last_active_owner_cannot_leave_behind_a_deactivated_owner(
    stack: Stack, db_pool: asyncpg.Pool
) -> None:
    """LAST_OWNER counts inactive owners: O1 deactivated (O2 still an active owner, so
    nothing is handed on), then O2 leaves: OK, and the group's only owner is inactive
    while an active member remains. Deterministic."""
    o1, o2, member = await stack.user(), await stack.user(), await stack.user()
    thread = await stack.group(o1, [o2, member])
    await stack.set_role(thread, o2, OWNER)
    await stack.deactivate(o1)
    await code_of(
        stack.threads.RemoveParticipant(
            threads_pb2.RemoveParticipantRequest(thread_id=thread, user_id=o2),
            metadata=as_user(o2),
        )
    )
    assert await active_owners(db_pool, thread) >= 1


async def test_owner_and_candidate_deleted_at_once_leave_an_active_owner(
    stack: Stack, db_pool: asyncpg.Pool
) -> None:
    """Owner O and admin A (the hand-on candidate) delete their accounts at once; X, an
    active member, remains. O's hand-on promotes A (A's deletion is not committed
    yet), A's deletion does not lock the thread (A owns nothing in its snapshot and has
    no message there) and its cascade removes the promoted row: X is left a member of
    an ownerless group. Review: 85 of 100 rounds (and deactivate||deactivate 50/100,
    deactivate||delete 85/100, delete||deactivate 70/100)."""
    for _ in range(ROUNDS):
        owner, admin, member = await stack.user(), await stack.user(), await stack.user()
        thread = await stack.group(owner, [admin, member])
        await stack.set_role(thread, admin, ADMIN)
        await asyncio.gather(stack.delete(owner), stack.delete(admin))
        assert await active_owners(db_pool, thread) == 1, "group left without an active owner"


# -- races that answer INTERNAL ---------------------------------------------------


async def test_add_participants_racing_delete_user_is_never_internal(stack: Stack) -> None:
    """AddParticipants (likewise CreateThread, GetOrCreateDirectThread) naming a user
    whose DeleteUser is in flight: the insert's foreign-key check waits for the
    deletion and then fails (ForeignKeyViolationError, fk_participant_user) -> INTERNAL.
    Review: 57/60 AddParticipants, 59/60 CreateThread, 57/60 GetOrCreateDirectThread."""
    for _ in range(ROUNDS):
        owner, doomed = await stack.user(), await stack.user()
        thread = await stack.group(owner, [])
        add, _ = await asyncio.gather(
            code_of(
                stack.threads.AddParticipants(
                    threads_pb2.AddParticipantsRequest(thread_id=thread, user_ids=[doomed])
                )
            ),
            code_of(stack.delete(doomed)),
        )
        assert add != grpc.StatusCode.INTERNAL


async def test_cross_owned_user_deletions_do_not_deadlock(stack: Stack) -> None:
    """U1 owns T1 and wrote in T2; U2 owns T2 and wrote in T1. DeleteUser locks the
    threads with the user's messages (id order), then the threads the user owns (id
    order): the two deletions lock T1 and T2 in opposite orders -> DeadlockDetected ->
    INTERNAL. Review: 23 of 60 rounds."""
    for _ in range(ROUNDS):
        u1, u2, w = await stack.user(), await stack.user(), await stack.user()
        t1 = await stack.group(u1, [u2, w])
        t2 = await stack.group(u2, [u1, w])
        for thread, user in ((t2, u1), (t1, u2)):
            await stack.messages.SendMessage(
                messages_pb2.SendMessageRequest(thread_id=thread, user_id=user, content="x")
            )
        codes = await asyncio.gather(code_of(stack.delete(u1)), code_of(stack.delete(u2)))
        assert grpc.StatusCode.INTERNAL not in codes


async def test_re_adding_a_leaver_racing_their_deletion_does_not_deadlock(stack: Stack) -> None:
    """U wrote in T and left; an owner re-adds U while U deletes the account. The add
    holds T and waits for U's row (foreign key); the deletion holds U's row and waits
    for T (U's messages there) -> deadlock or FK violation -> INTERNAL. Review: 39/60."""
    for _ in range(ROUNDS):
        owner, user = await stack.user(), await stack.user()
        thread = await stack.group(owner, [user])
        await stack.messages.SendMessage(
            messages_pb2.SendMessageRequest(thread_id=thread, user_id=user, content="x")
        )
        await stack.threads.RemoveParticipant(
            threads_pb2.RemoveParticipantRequest(thread_id=thread, user_id=user),
            metadata=as_user(user),
        )
        codes = await asyncio.gather(
            code_of(
                stack.threads.AddParticipants(
                    threads_pb2.AddParticipantsRequest(thread_id=thread, user_ids=[user]),
                    metadata=as_user(owner),
                )
            ),
            code_of(
                stack.users.DeleteUser(users_pb2.DeleteUserRequest(id=user), metadata=as_user(user))
            ),
        )
        assert grpc.StatusCode.INTERNAL not in codes


# -- inputs that answer INTERNAL ---------------------------------------------------


def _token(body: str) -> str:
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def _fingerprint(kind: str, params: object) -> str:
    blob = json.dumps([kind, params], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


async def test_page_tokens_without_a_fingerprint_are_invalid_argument(stack: Stack) -> None:
    """A real token with its "f" key removed (or renamed): KeyError outside the
    decoder's try -> INTERNAL, on all seven list RPCs. Review: 101 of 1,998 mutations
    of real tokens were INTERNAL, every one this."""
    owner = await stack.user()
    thread = await stack.group(owner, [])
    users = await code_of(
        stack.users.ListUsers(
            users_pb2.ListUsersRequest(page_token=_token('{"k":"users","p":["a"]}'))
        )
    )
    history = await code_of(
        stack.messages.ListMessages(
            messages_pb2.ListMessagesRequest(
                thread_id=thread,
                page_token=_token(
                    '{"k":"history","p":["2020-01-01T00:00:00+00:00",'
                    '"00000000-0000-0000-0000-000000000000"]}'
                ),
            )
        )
    )
    assert (users, history) == (grpc.StatusCode.INVALID_ARGUMENT,) * 2


async def test_deeply_nested_page_token_is_invalid_argument(stack: Stack) -> None:
    """json.loads of 50,000 '[' raises RecursionError (not caught) -> INTERNAL on
    ListUsers, ListMessages, ListThreads, ListParticipants, ListReplies."""
    code = await code_of(
        stack.users.ListUsers(users_pb2.ListUsersRequest(page_token=_token("[" * 50_000)))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_surrogate_in_users_page_position_is_invalid_argument(stack: Stack) -> None:
    """The fingerprint is no secret; a position "\\ud800" passes text_position and
    fails encoding in asyncpg (DataError) -> INTERNAL."""
    fingerprint = _fingerprint("users", {"query": "", "inactive": False})
    body = json.dumps({"k": "users", "f": fingerprint, "p": ["\ud800"]})  # json escapes it
    token = _token(body)
    code = await code_of(stack.users.ListUsers(users_pb2.ListUsersRequest(page_token=token)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_bracketed_host_urls_are_invalid_argument(stack: Stack) -> None:
    """urlsplit raises ValueError("Invalid IPv6 URL") for "http://[x]/" inside
    check_http_url -> INTERNAL (profile_image in CreateUser/UpdateUser, attachment url
    in SendMessage/AddAttachment)."""
    tag = f"r{uuid.uuid4().hex[:12]}"
    code = await code_of(
        stack.users.CreateUser(
            users_pb2.CreateUserRequest(
                user=users_pb2.User(email=f"{tag}@x.io", username=tag, profile_image="http://[x]/")
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
