"""The three services in-process on loopback ports, over one test database."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from services.common.settings import ServiceSettings
from services.messages.service import DEFINITION as MESSAGES
from services.threads.service import DEFINITION as THREADS
from services.users.service import DEFINITION as USERS
from tests.conftest import running
from tests.hostile.world import seed_world


@pytest.fixture
async def channels(service_settings: ServiceSettings) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    """A channel to each service, by name ("users", "threads", "messages")."""
    async with (
        running(USERS, service_settings) as (_, users),
        running(THREADS, service_settings) as (_, threads),
        running(MESSAGES, service_settings) as (_, messages),
    ):
        yield {"users": users, "threads": threads, "messages": messages}


@pytest.fixture
async def world(db_pool: asyncpg.Pool) -> list[str]:
    """Ids of a small seeded world (tests/hostile/world.py)."""
    return await seed_world(db_pool)
