from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import asyncpg
import pytest
from chat.v1 import threads_pb2_grpc

from services.common.settings import ServiceSettings
from services.threads.service import DEFINITION
from tests.conftest import running

if TYPE_CHECKING:
    Stub = threads_pb2_grpc.ThreadsServiceAsyncStub


@pytest.fixture
async def threads(service_settings: ServiceSettings) -> AsyncIterator[Stub]:
    async with running(DEFINITION, service_settings) as (_, channel):
        yield threads_pb2_grpc.ThreadsServiceStub(channel)


async def new_users(db: asyncpg.Pool, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        tag = f"u{uuid.uuid4().hex[:12]}"
        ids.append(
            str(
                await db.fetchval(
                    "INSERT INTO users (email, username) VALUES ($1 || '@x.io', $1) RETURNING id",
                    tag,
                )
            )
        )
    return ids


async def send(db: asyncpg.Pool, thread_id: str, user_id: str, content: str = "hi") -> str:
    """A message as the messages service writes it (the cross-service contract)."""
    async with db.acquire() as conn, conn.transaction():
        created_at = await conn.fetchval(
            """
            UPDATE threads SET last_message_at = greatest(
                clock_timestamp(),
                coalesce(last_message_at, '-infinity') + interval '1 microsecond')
            WHERE id = $1 RETURNING last_message_at
            """,
            uuid.UUID(thread_id),
        )
        message_id = await conn.fetchval(
            "INSERT INTO messages (thread_id, user_id, content, created_at) "
            "VALUES ($1, $2, $3, $4) RETURNING id",
            uuid.UUID(thread_id),
            uuid.UUID(user_id),
            content,
            created_at,
        )
        await conn.execute(
            "UPDATE thread_participants SET last_read_at = greatest(last_read_at, $3) "
            "WHERE thread_id = $1 AND user_id = $2",
            uuid.UUID(thread_id),
            uuid.UUID(user_id),
            created_at,
        )
    return str(message_id)
