"""Hostile and malformed input never yields INTERNAL, UNKNOWN or a hang (property-based).

Generated requests for the services' RPCs: random and boundary strings (empty,
whitespace, long, NUL, SQL and JSON fragments), ids of a seeded world as well as
random and malformed UUIDs, deep and wide metadata, negative and huge sizes and
page sizes, unknown enum values. The only outcomes allowed are success or a
client error with details; a refused call writes nothing, and after every call
the data's rules hold (tests/hostile/world.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

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
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile.world import (
    ALLOWED,
    broken_invariants,
    ids_or_known,
    row_counts,
    sizes,
    structs,
    texts,
)
from tests.rpc_errors import error_info

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


async def outcome(db: asyncpg.Pool, call: Callable[[], Awaitable[Any]]) -> None:
    """Succeeds, or fails with an allowed code carrying details and writes nothing;
    never hangs; either way the data's rules still hold."""
    before = await row_counts(db)
    try:
        await call()
    except grpc.aio.AioRpcError as err:
        assert err.code() in ALLOWED, (err.code(), err.details())
        assert error_info(err).reason  # rich details, always
        assert await row_counts(db) == before, "refused but wrote"
    assert await broken_invariants(db) == []


@pytest.fixture
def stubs(channels: dict[str, grpc.aio.Channel]) -> dict[str, Any]:
    return {
        "users": users_pb2_grpc.UsersServiceStub(channels["users"]),
        "threads": threads_pb2_grpc.ThreadsServiceStub(channels["threads"]),
        "messages": messages_pb2_grpc.MessagesServiceStub(channels["messages"]),
    }


@SETTINGS
@given(
    email=texts, username=texts, first=texts, image=texts, page=sizes, query=texts, data=st.data()
)
async def test_users_rpcs(
    stubs: dict[str, Any],
    db_pool: asyncpg.Pool,
    world: list[str],
    email: str,
    username: str,
    first: str,
    image: str,
    page: int,
    query: str,
    data: st.DataObject,
) -> None:
    users = stubs["users"]
    user_id = data.draw(ids_or_known(world), label="user_id")
    user = users_pb2.User(email=email, username=username, first_name=first, profile_image=image)
    await outcome(
        db_pool, lambda: users.CreateUser(users_pb2.CreateUserRequest(user=user), timeout=10)
    )
    await outcome(db_pool, lambda: users.GetUser(users_pb2.GetUserRequest(id=user_id), timeout=10))
    await outcome(
        db_pool, lambda: users.LookupUser(users_pb2.LookupUserRequest(email=email), timeout=10)
    )
    await outcome(
        db_pool,
        lambda: users.ListUsers(
            users_pb2.ListUsersRequest(page_size=page, query=query, page_token=username), timeout=10
        ),
    )
    await outcome(
        db_pool,
        lambda: users.UpdateUser(
            users_pb2.UpdateUserRequest(user=users_pb2.User(id=user_id, email=email)), timeout=10
        ),
    )
    await outcome(
        db_pool,
        lambda: users.BatchGetUsers(
            users_pb2.BatchGetUsersRequest(ids=[user_id, email]), timeout=10
        ),
    )


@SETTINGS
@given(name=texts, page=sizes, role=st.integers(-5, 10), token=texts, data=st.data())
async def test_threads_rpcs(
    stubs: dict[str, Any],
    db_pool: asyncpg.Pool,
    world: list[str],
    name: str,
    page: int,
    role: int,
    token: str,
    data: st.DataObject,
) -> None:
    threads = stubs["threads"]
    some_id = data.draw(ids_or_known(world), label="some_id")
    other = data.draw(ids_or_known(world), label="other")
    await outcome(
        db_pool,
        lambda: threads.CreateThread(
            threads_pb2.CreateThreadRequest(name=name, creator_id=some_id, participant_ids=[other]),
            timeout=10,
        ),
    )
    await outcome(
        db_pool,
        lambda: threads.GetOrCreateDirectThread(
            threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[some_id, other]), timeout=10
        ),
    )
    await outcome(
        db_pool,
        lambda: threads.ListThreads(
            threads_pb2.ListThreadsRequest(user_id=some_id, page_size=page, page_token=token),
            timeout=10,
        ),
    )
    await outcome(
        db_pool,
        lambda: threads.UpdateParticipant(
            threads_pb2.UpdateParticipantRequest(thread_id=some_id, user_id=other, role=role),  # type: ignore[arg-type]
            timeout=10,
        ),
    )
    await outcome(
        db_pool,
        lambda: threads.MarkRead(
            threads_pb2.MarkReadRequest(thread_id=some_id, user_id=other), timeout=10
        ),
    )
    await outcome(
        db_pool,
        lambda: threads.GetUnreadCount(
            threads_pb2.GetUnreadCountRequest(user_id=other), timeout=10
        ),
    )


@SETTINGS
@given(
    content=texts,
    meta=structs,
    url=texts,
    size=st.integers(-(2**40), 2**40),
    page=sizes,
    data=st.data(),
)
async def test_messages_rpcs(
    stubs: dict[str, Any],
    db_pool: asyncpg.Pool,
    world: list[str],
    content: str,
    meta: dict[str, Any],
    url: str,
    size: int,
    page: int,
    data: st.DataObject,
) -> None:
    messages = stubs["messages"]
    thread_id = data.draw(ids_or_known(world), label="thread_id")
    user_id = data.draw(ids_or_known(world), label="user_id")
    token = data.draw(st.one_of(texts, ids_or_known(world)), label="token")
    attachment = messages_pb2.Attachment(url=url, type=content[:60], name=content, size=size)
    await outcome(
        db_pool,
        lambda: messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=thread_id,
                user_id=user_id,
                content=content,
                metadata=struct(meta),
                attachments=[attachment],
                request_id=token,
                parent_id=token,
            ),
            timeout=10,
        ),
    )
    await outcome(
        db_pool,
        lambda: messages.ListMessages(
            messages_pb2.ListMessagesRequest(thread_id=thread_id, page_size=page, page_token=token),
            timeout=10,
        ),
    )
    await outcome(
        db_pool,
        lambda: messages.SearchMessages(
            messages_pb2.SearchMessagesRequest(
                thread_id=thread_id, metadata_contains=struct(meta), page_size=page
            ),
            timeout=10,
        ),
    )
    stream = messages.StreamThreadMessages(
        messages_pb2.StreamThreadMessagesRequest(thread_id=thread_id, after=token), timeout=2
    )
    try:
        await stream.read()
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # a valid, idle stream times out
            assert err.code() in ALLOWED, (err.code(), err.details())
