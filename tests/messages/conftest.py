from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from chat.v1 import messages_pb2_grpc

from services.common.server import RunningService
from services.common.settings import ServiceSettings
from services.messages.hub import StreamHub
from services.messages.service import DEFINITION
from tests.conftest import running

if TYPE_CHECKING:
    Stub = messages_pb2_grpc.MessagesServiceAsyncStub


@dataclass
class MessagesServer:
    service: RunningService
    channel: grpc.aio.Channel
    stub: Stub

    @property
    def hub(self) -> StreamHub:
        hub = self.service.runtime.extras["hub"]
        assert isinstance(hub, StreamHub)
        return hub


@pytest.fixture
async def server(service_settings: ServiceSettings) -> AsyncIterator[MessagesServer]:
    async with running(DEFINITION, service_settings) as (service, channel):
        yield MessagesServer(service, channel, messages_pb2_grpc.MessagesServiceStub(channel))


@pytest.fixture
def messages(server: MessagesServer) -> Stub:
    return server.stub


@dataclass
class Room:
    thread_id: str
    owner: str
    member: str
    outsider: str


async def new_user(db: asyncpg.Pool, *, active: bool = True) -> str:
    tag = f"u{uuid.uuid4().hex[:12]}"
    return str(
        await db.fetchval(
            "INSERT INTO users (email, username, is_active) VALUES ($1 || '@x.io', $1, $2) "
            "RETURNING id",
            tag,
            active,
        )
    )


async def new_room(db: asyncpg.Pool) -> Room:
    owner, member, outsider = [await new_user(db) for _ in range(3)]
    thread = await db.fetchval("INSERT INTO threads (name) VALUES ('room') RETURNING id")
    await db.execute(
        "INSERT INTO thread_participants (thread_id, user_id, role) "
        "VALUES ($1, $2, 'owner'), ($1, $3, 'member')",
        thread,
        uuid.UUID(owner),
        uuid.UUID(member),
    )
    return Room(str(thread), owner, member, outsider)


@pytest.fixture
async def room(db_pool: asyncpg.Pool) -> Room:
    return await new_room(db_pool)
