"""Generated values at the edges of every typed field never yield INTERNAL.

Property-based (hypothesis) against the three real services, with a real room so
that validation is passed and the values reach the servicers and the database:
- MarkRead.read_at: any int64 seconds and int32 nanos (out of range, negative
  nanos, year 0, year 10000);
- stream cursors: any integer position (negative, 2^63 and beyond), leading
  zeros, signs, other threads' cursors and arbitrary text;
- page tokens made by mutating real ones: characters replaced, cut or inserted,
  and decoded tokens whose position values are replaced by generated JSON and
  re-encoded with the right fingerprint (the fingerprint is no secret).
Only success or a documented client error naming the field comes back.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.messages.conftest import Room, new_room
from tests.rpc_errors import as_user, error_info, violated_fields

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=40),
    st.sampled_from(
        [
            "2026-01-01T00:00:00+00:00",
            "0001-01-01T00:00:00+00:00",
            "9999-12-31T23:59:59.999999+00:00",
            "-infinity",
            "NaN",
            str(uuid.uuid4()),
            "\x00",
        ]
    ),
)
json_values = st.recursive(
    json_leaves,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
)


async def expect_ok_or_invalid(call: Awaitable[object], field: str) -> bool:
    """True when the call succeeded; else it must be INVALID_ARGUMENT naming `field`."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert violated_fields(err) == {field}, err.details()
        assert error_info(err).reason
        return False
    return True


@dataclass
class World:
    users: Any
    threads: Any
    messages: Any
    room: Room
    parent: str
    # name -> (a real next_page_token, the call that takes a token)
    tokens: dict[str, tuple[str, Callable[[str], Awaitable[object]]]]


@pytest.fixture
async def world(channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool) -> World:
    users = users_pb2_grpc.UsersServiceStub(channels["users"])
    threads = threads_pb2_grpc.ThreadsServiceStub(channels["threads"])
    messages = messages_pb2_grpc.MessagesServiceStub(channels["messages"])
    room = await new_room(db_pool)
    await db_pool.execute(
        "INSERT INTO thread_participants (thread_id, user_id) VALUES ($1, $2)",
        uuid.UUID(room.thread_id),
        uuid.UUID(room.outsider),
    )
    me = as_user(room.owner)
    sent = []
    for i in range(3):
        reply = await messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=room.thread_id, user_id=room.owner, content=f"m{i}"
            ),
            metadata=me,
        )
        sent.append(reply.message)
    parent = sent[0].id
    for i in range(3):
        await messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=room.thread_id, user_id=room.owner, content=f"r{i}", parent_id=parent
            ),
            metadata=me,
        )
    for _ in range(2):
        await threads.CreateThread(
            threads_pb2.CreateThreadRequest(name="x", creator_id=room.owner), metadata=me
        )
    t, u = room.thread_id, room.owner
    calls: dict[str, Callable[[str], Awaitable[Any]]] = {
        "ListMessages": lambda tok: messages.ListMessages(
            messages_pb2.ListMessagesRequest(thread_id=t, page_size=1, page_token=tok), metadata=me
        ),
        "ListReplies": lambda tok: messages.ListReplies(
            messages_pb2.ListRepliesRequest(parent_id=parent, page_size=1, page_token=tok),
            metadata=me,
        ),
        "ListUserMessages": lambda tok: messages.ListUserMessages(
            messages_pb2.ListUserMessagesRequest(user_id=u, page_size=1, page_token=tok),
            metadata=me,
        ),
        "ListThreads": lambda tok: threads.ListThreads(
            threads_pb2.ListThreadsRequest(user_id=u, page_size=1, page_token=tok), metadata=me
        ),
        "ListParticipants": lambda tok: threads.ListParticipants(
            threads_pb2.ListParticipantsRequest(thread_id=t, page_size=1, page_token=tok),
            metadata=me,
        ),
        "ListUsers": lambda tok: users.ListUsers(
            users_pb2.ListUsersRequest(page_size=1, page_token=tok)
        ),
    }
    tokens = {}
    for name, call in calls.items():
        page = await call("")
        assert page.next_page_token, name
        tokens[name] = (page.next_page_token, call)
    return World(users, threads, messages, room, parent, tokens)


@SETTINGS
@given(seconds=st.integers(-(2**63), 2**63 - 1), nanos=st.integers(-(2**31), 2**31 - 1))
async def test_read_at_any_timestamp(world: World, seconds: int, nanos: int) -> None:
    room = world.room
    call = world.threads.MarkRead(
        threads_pb2.MarkReadRequest(
            thread_id=room.thread_id,
            user_id=room.member,
            read_at=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
        ),
        metadata=as_user(room.member),
    )
    valid = -62135596800 <= seconds <= 253402300799 and 0 <= nanos <= 999_999_999
    assert await expect_ok_or_invalid(call, "read_at") == valid


def _cursor(thread_id: str, position: str) -> str:
    return base64.urlsafe_b64encode(f"c:{thread_id}:{position}".encode()).decode().rstrip("=")


positions = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from([str(2**63), str(2**63 - 1), str(2**64), "-0", "+1", "01", " 1", "1 ", ""]),
    st.text(max_size=12),
)


@SETTINGS
@given(position=positions, foreign=st.booleans(), raw=st.booleans())
async def test_stream_cursor_any_position(
    world: World, position: str, foreign: bool, raw: bool
) -> None:
    room = world.room
    thread = str(uuid.uuid4()) if foreign else room.thread_id
    after = position if raw else _cursor(thread, position)
    stream = world.messages.StreamThreadMessages(
        messages_pb2.StreamThreadMessagesRequest(thread_id=room.thread_id, after=after),
        metadata=as_user(room.owner),
        timeout=10,
    )
    try:
        first = await stream.read()
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert violated_fields(err) == {"after"}
        return
    finally:
        stream.cancel()
    # Accepted: an empty cursor (live from now), or this API's own spelling of a
    # position the thread has reached.
    canonical = position.isdigit() and str(int(position)) == position
    assert (raw and position == "") or (not foreign and not raw and canonical)
    assert first.WhichOneof("event") is not None


mutations = st.sampled_from(["replace", "cut", "insert", "position"])
LIST_METHODS = [
    "ListMessages",
    "ListReplies",
    "ListUserMessages",
    "ListThreads",
    "ListParticipants",
    "ListUsers",
]


@SETTINGS
@given(data=st.data(), method=st.sampled_from(LIST_METHODS), how=mutations)
async def test_mutated_page_tokens(
    world: World, data: st.DataObject, method: str, how: str
) -> None:
    token, call = world.tokens[method]
    if how == "position":
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded))
        slot = data.draw(st.integers(0, len(body["p"])), label="slot")
        value = data.draw(json_values, label="value")
        if slot == len(body["p"]):
            body["p"].append(value)
        else:
            body["p"][slot] = value
        raw = json.dumps(body, separators=(",", ":")).encode()  # NaN/Infinity included
        forged = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    else:
        at = data.draw(st.integers(0, len(token) - 1), label="at")
        piece = data.draw(st.text(max_size=6), label="piece")
        if how == "replace":
            forged = token[:at] + (piece or "A") + token[at + 1 :]
        elif how == "cut":
            forged = token[:at]
        else:
            forged = token[:at] + piece + token[at:]
    await expect_ok_or_invalid(call(forged), "page_token")
