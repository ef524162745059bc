from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from chat.v1 import messages_pb2_grpc

from services.common.server import RunningService
from services.common.settings import ServiceSettings
from services.messages.service import DEFINITION
from services.messages.streams import StreamHub
from tests.conftest import running
from tests.factories import Room, new_room, new_user

# Re-exported: the message tests import their factories from here.
__all__ = ["MessagesServer", "Room", "messages", "new_room", "new_user", "room", "server"]

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


@pytest.fixture
async def room(db_pool: asyncpg.Pool) -> Room:
    return await new_room(db_pool)
