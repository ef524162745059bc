from __future__ import annotations

from services.common.settings import ServiceSettings
from services.users.service import DEFINITION as USERS
from tests.conftest import health_status, running


async def test_users_service_reports_serving(service_settings: ServiceSettings) -> None:
    async with running(USERS, service_settings) as (_, channel):
        assert await health_status(channel, "chat.v1.UsersService") == "SERVING"
