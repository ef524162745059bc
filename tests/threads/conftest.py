from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from chat.v1 import threads_pb2_grpc

from services.common.settings import ServiceSettings
from services.threads.service import DEFINITION
from tests.conftest import running
from tests.factories import new_users, send

if TYPE_CHECKING:
    Stub = threads_pb2_grpc.ThreadsServiceAsyncStub

__all__ = ["new_users", "send", "threads"]


@pytest.fixture
async def threads(service_settings: ServiceSettings) -> AsyncIterator[Stub]:
    async with running(DEFINITION, service_settings) as (_, channel):
        yield threads_pb2_grpc.ThreadsServiceStub(channel)
