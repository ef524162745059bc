"""SearchMessages: JSONB containment, through the GIN index idx_messages_metadata."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from chat.v1 import messages_pb2
from google.protobuf import struct_pb2

from services.messages import store
from tests.messages.conftest import Room
from tests.rpc_errors import as_user

if TYPE_CHECKING:
    from tests.messages.conftest import Stub


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += nodes(child)
    return found


async def test_search_by_metadata_containment(messages: Stub, room: Room) -> None:
    metas: list[dict[str, Any]] = [
        {"kind": "bug", "p": 1},
        {"kind": "idea"},
        {"kind": "bug", "p": 2},
    ]
    for i, meta in enumerate(metas):
        await messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=room.thread_id,
                user_id=room.member,
                content=f"m{i}",
                metadata=struct(**meta),
            )
        )
    found = await messages.SearchMessages(
        messages_pb2.SearchMessagesRequest(
            thread_id=room.thread_id, metadata_contains=struct(kind="bug"), page_size=1
        ),
        metadata=as_user(room.owner),
    )
    rest = await messages.SearchMessages(
        messages_pb2.SearchMessagesRequest(
            thread_id=room.thread_id,
            metadata_contains=struct(kind="bug"),
            page_size=1,
            page_token=found.next_page_token,
        ),
        metadata=as_user(room.owner),
    )
    assert [m.content for m in [*found.messages, *rest.messages]] == ["m2", "m0"]
    assert not rest.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await messages.SearchMessages(
            messages_pb2.SearchMessagesRequest(metadata_contains=struct(kind="bug")),
            metadata=as_user(room.owner),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # thread required for users
    trusted = await messages.SearchMessages(
        messages_pb2.SearchMessagesRequest(metadata_contains=struct(kind="idea"))
    )
    assert [m.content for m in trusted.messages] == ["m1"]


@pytest.mark.db
async def test_search_plan_uses_the_gin_index(db_pool: asyncpg.Pool, room: Room) -> None:
    await db_pool.execute(
        "INSERT INTO messages (thread_id, user_id, content, metadata, seq, change_seq) "
        "SELECT $1, $2, 'm', jsonb_build_object('order', g, 'kind', 'k' || (g % 50)), g, g "
        "FROM generate_series(1, 20000) g",
        uuid.UUID(room.thread_id),
        uuid.UUID(room.member),
    )
    await db_pool.execute("VACUUM (ANALYZE) messages")  # also flushes the GIN pending list
    async with db_pool.acquire() as conn:
        raw = await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) {store.SEARCH_PAGE}", {"order": 777}, None, None, None, 51
        )
    used = {n.get("Index Name") for n in nodes(json.loads(raw)[0]["Plan"])}
    assert "idx_messages_metadata" in used, raw
