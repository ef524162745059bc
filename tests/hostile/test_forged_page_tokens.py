"""Page tokens made by hand: the fingerprint is no secret (a hash of the request's
public parameters), so a forged position must be refused as INVALID_ARGUMENT
naming page_token, never reach the database and come back INTERNAL."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
from chat.v1 import (
    messages_pb2,
    messages_pb2_grpc,
    threads_pb2,
    threads_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)
from google.protobuf import struct_pb2

from services.common.pagination import encode_page_token
from tests.messages.conftest import new_room
from tests.rpc_errors import error_of, violated_fields

SOME_ID = str(uuid.uuid4())
TIME_ID_POSITIONS: list[list[Any]] = [
    [5, SOME_ID],
    ["2026-01-01T00:00:00+00:00", ["not", "a", "uuid"]],
    ["2026-01-01T00:00:00+00:00", "not-a-uuid"],
    ["2026-01-01T00:00:00", SOME_ID],  # no time zone
    ["0001-01-01T00:00:00+14:00", SOME_ID],  # before year 1 in UTC
    ["9999-12-31T23:59:59-14:00", SOME_ID],  # after 9999 in UTC
    ["2026-13-45T00:00:00+00:00", SOME_ID],
    [None, None],
    [],
    [SOME_ID],
    ["2026-01-01T00:00:00+00:00", SOME_ID, "extra"],
]
TEXT_POSITIONS: list[list[Any]] = [[5], [None], ["nul\x00"], ["x" * 10_000], [], ["a", "b"]]
ID_POSITIONS: list[list[Any]] = [*TEXT_POSITIONS, ["not-a-uuid"], [SOME_ID.upper() + "x"]]

Call = Callable[[str], Awaitable[object]]


async def test_forged_positions_are_invalid_argument(
    channels: dict[str, grpc.aio.Channel], db_pool: asyncpg.Pool
) -> None:
    room = await new_room(db_pool)
    messages = messages_pb2_grpc.MessagesServiceStub(channels["messages"])
    threads = threads_pb2_grpc.ThreadsServiceStub(channels["threads"])
    users = users_pb2_grpc.UsersServiceStub(channels["users"])
    contains = struct_pb2.Struct()
    contains.update({"k": "v"})
    t, u = room.thread_id, room.owner
    # (kind and parameters exactly as the servicer fingerprints them, positions, the call)
    cases: list[tuple[str, Any, list[list[Any]], Call]] = [
        (
            "history",
            {"thread": t},
            TIME_ID_POSITIONS,
            lambda tok: messages.ListMessages(
                messages_pb2.ListMessagesRequest(thread_id=t, page_token=tok)
            ),
        ),
        (
            "user-history",
            {"user": u},
            TIME_ID_POSITIONS,
            lambda tok: messages.ListUserMessages(
                messages_pb2.ListUserMessagesRequest(user_id=u, page_token=tok)
            ),
        ),
        (
            "search",
            {"thread": t, "contains": {"k": "v"}},
            TIME_ID_POSITIONS,
            lambda tok: messages.SearchMessages(
                messages_pb2.SearchMessagesRequest(
                    thread_id=t, metadata_contains=contains, page_token=tok
                )
            ),
        ),
        (
            "inbox",
            {"user": u, "archived": False},
            TIME_ID_POSITIONS,
            lambda tok: threads.ListThreads(
                threads_pb2.ListThreadsRequest(user_id=u, page_token=tok)
            ),
        ),
        (
            "participants",
            {"thread": t},
            ID_POSITIONS,
            lambda tok: threads.ListParticipants(
                threads_pb2.ListParticipantsRequest(thread_id=t, page_token=tok)
            ),
        ),
        (
            "users",
            {"query": "", "inactive": False},
            TEXT_POSITIONS,
            lambda tok: users.ListUsers(users_pb2.ListUsersRequest(page_token=tok)),
        ),
    ]
    checked = 0
    for kind, params, positions, call in cases:
        for position in positions:
            token = encode_page_token(kind, params, position)
            err = await error_of(call(token))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (kind, position, err)
            assert violated_fields(err) == {"page_token"}, (kind, position)
            checked += 1
    assert checked > 50
