from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from chat.v1 import users_pb2_grpc

from services.common.settings import ServiceSettings
from services.users.service import DEFINITION
from tests.conftest import running


@pytest.fixture
async def users(
    service_settings: ServiceSettings,
) -> AsyncIterator[users_pb2_grpc.UsersServiceAsyncStub]:
    async with running(DEFINITION, service_settings) as (_, channel):
        yield users_pb2_grpc.UsersServiceStub(channel)
