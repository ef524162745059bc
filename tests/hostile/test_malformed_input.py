"""Hostile and malformed input never yields INTERNAL, UNKNOWN or a hang (property-based).

Generated requests for the services' RPCs: random and boundary strings (empty,
whitespace, long, NUL, SQL and JSON fragments), random and malformed UUIDs, deep
and wide metadata, negative and huge sizes and page sizes, unknown enum values.
The only outcomes allowed are success or a client error with details.
"""

from __future__ import annotations

import uuid
from typing import Any

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

from tests.rpc_errors import error_info

ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FRAGMENTS = [
    "", " ", "\t\n", "\x00", "a\x00b", "'; DROP TABLE users; --", "\" OR 1=1 --",
    '{"a": [1, {"b": null}]}', "💬" * 3, "x" * 300, "%s%s%n", "../../etc/passwd",
    "00000000-0000-0000-0000-000000000000", "not-a-uuid", str(uuid.uuid4()).upper(),
]  # fmt: skip
# Text that protobuf can carry (no lone surrogates: they cannot be encoded as UTF-8).
texts = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=400),
    st.builds(lambda n: "y" * n, st.sampled_from([10_000, 10_001, 100_000])),
)
ids = st.one_of(st.sampled_from(FRAGMENTS), st.uuids().map(str), texts)
sizes = st.integers(min_value=-(2**31), max_value=2**31 - 1)
# Floats include NaN and infinities: refused (JSON has none), never INTERNAL.
json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | texts,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)
structs = st.dictionaries(st.text(max_size=12), json_values, max_size=6)

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


async def outcome(call: Any) -> None:
    """Succeeds, or fails with an allowed code carrying details; never hangs."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        assert err.code() in ALLOWED, (err.code(), err.details())
        assert error_info(err).reason  # rich details, always


@pytest.fixture
def stubs(channels: dict[str, grpc.aio.Channel]) -> dict[str, Any]:
    return {
        "users": users_pb2_grpc.UsersServiceStub(channels["users"]),
        "threads": threads_pb2_grpc.ThreadsServiceStub(channels["threads"]),
        "messages": messages_pb2_grpc.MessagesServiceStub(channels["messages"]),
    }


@SETTINGS
@given(email=texts, username=texts, first=texts, image=texts, user_id=ids, page=sizes, query=texts)
async def test_users_rpcs(
    stubs: dict[str, Any],
    email: str,
    username: str,
    first: str,
    image: str,
    user_id: str,
    page: int,
    query: str,
) -> None:
    users = stubs["users"]
    user = users_pb2.User(email=email, username=username, first_name=first, profile_image=image)
    await outcome(users.CreateUser(users_pb2.CreateUserRequest(user=user), timeout=10))
    await outcome(users.GetUser(users_pb2.GetUserRequest(id=user_id), timeout=10))
    await outcome(users.LookupUser(users_pb2.LookupUserRequest(email=email), timeout=10))
    await outcome(
        users.ListUsers(
            users_pb2.ListUsersRequest(page_size=page, query=query, page_token=username), timeout=10
        )
    )
    await outcome(
        users.UpdateUser(
            users_pb2.UpdateUserRequest(user=users_pb2.User(id=user_id, email=email)), timeout=10
        ),
    )
    await outcome(
        users.BatchGetUsers(users_pb2.BatchGetUsersRequest(ids=[user_id, email]), timeout=10)
    )


@SETTINGS
@given(name=texts, some_id=ids, other=ids, page=sizes, role=st.integers(-5, 10), token=texts)
async def test_threads_rpcs(
    stubs: dict[str, Any], name: str, some_id: str, other: str, page: int, role: int, token: str
) -> None:
    threads = stubs["threads"]
    await outcome(
        threads.CreateThread(
            threads_pb2.CreateThreadRequest(name=name, creator_id=some_id, participant_ids=[other]),
            timeout=10,
        )
    )
    await outcome(
        threads.GetOrCreateDirectThread(
            threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[some_id, other]), timeout=10
        )
    )
    await outcome(
        threads.ListThreads(
            threads_pb2.ListThreadsRequest(user_id=some_id, page_size=page, page_token=token),
            timeout=10,
        )
    )
    await outcome(
        threads.UpdateParticipant(
            threads_pb2.UpdateParticipantRequest(thread_id=some_id, user_id=other, role=role),  # type: ignore[arg-type]
            timeout=10,
        )
    )
    await outcome(
        threads.MarkRead(threads_pb2.MarkReadRequest(thread_id=some_id, user_id=other), timeout=10)
    )
    await outcome(
        threads.GetUnreadCount(threads_pb2.GetUnreadCountRequest(user_id=other), timeout=10)
    )


@SETTINGS
@given(
    content=texts,
    thread_id=ids,
    user_id=ids,
    meta=structs,
    url=texts,
    size=st.integers(-(2**40), 2**40),
    page=sizes,
    token=texts,
)
async def test_messages_rpcs(
    stubs: dict[str, Any],
    content: str,
    thread_id: str,
    user_id: str,
    meta: dict[str, Any],
    url: str,
    size: int,
    page: int,
    token: str,
) -> None:
    messages = stubs["messages"]
    attachment = messages_pb2.Attachment(url=url, type=content[:60], name=content, size=size)
    await outcome(
        messages.SendMessage(
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
        )
    )
    await outcome(
        messages.ListMessages(
            messages_pb2.ListMessagesRequest(thread_id=thread_id, page_size=page, page_token=token),
            timeout=10,
        )
    )
    await outcome(
        messages.SearchMessages(
            messages_pb2.SearchMessagesRequest(
                thread_id=thread_id, metadata_contains=struct(meta), page_size=page
            ),
            timeout=10,
        )
    )
    stream = messages.StreamThreadMessages(
        messages_pb2.StreamThreadMessagesRequest(thread_id=thread_id, after=token), timeout=2
    )
    try:
        await stream.read()
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # a valid, idle stream times out
            assert err.code() in ALLOWED, (err.code(), err.details())
