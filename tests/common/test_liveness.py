"""Liveness and readiness are separate health names, on a real service process.

Readiness ("" and the service's own name) follows the database; liveness
(`liveness`) answers SERVING while the process runs, database or not, so a
Kubernetes liveness probe never restarts pods during a database outage. At a
graceful shutdown (SIGTERM) both go NOT_SERVING before the server stops.

The health probe runs every 0.1 s and reports NOT_SERVING after 2 failures
(the settings this test is about); the waits below are bounds, not expectations.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.processes import ServiceProcess, start_service_process
from services.common.server import LIVENESS
from tests.conftest import health_status
from tests.postgres import RestartablePostgres, migrate

SERVICE = "chat.v1.UsersService"
READINESS = ("", SERVICE)
Status = health_pb2.HealthCheckResponse
CHANGE_BOUND_S = 60.0


@pytest.fixture
async def postgres() -> AsyncIterator[RestartablePostgres]:
    server = RestartablePostgres()
    try:
        await migrate(server.url)
        yield server
    finally:
        await server.close()


@pytest.fixture
async def users(postgres: RestartablePostgres) -> AsyncIterator[ServiceProcess]:
    proc = await start_service_process(
        "users", postgres.url, HEALTH_CHECK_INTERVAL="0.1", HEALTH_FAILURE_THRESHOLD="2"
    )
    try:
        yield proc
    finally:
        await proc.stop()


async def _next_status(watch: Any, name: str) -> str:
    try:
        reply = await asyncio.wait_for(watch.read(), timeout=CHANGE_BOUND_S)
    except TimeoutError:
        pytest.fail(f"{name!r}: no health change within {CHANGE_BOUND_S:.0f}s")
    assert reply is not grpc.aio.EOF, f"{name!r}: Watch ended"
    return str(Status.ServingStatus.Name(reply.status))


def _watch(channel: grpc.aio.Channel, name: str) -> Any:
    # Typed Any: the types-grpcio-health-checking stub omits the stub's methods.
    stub: Any = health_pb2_grpc.HealthStub(channel)
    return stub.Watch(health_pb2.HealthCheckRequest(service=name))


async def test_liveness_stays_serving_while_readiness_follows_the_database(
    postgres: RestartablePostgres, users: ServiceProcess
) -> None:
    async with grpc.aio.insecure_channel(users.address) as channel:
        watches = {name: _watch(channel, name) for name in READINESS}
        for name, watch in watches.items():
            assert await _next_status(watch, name) == "SERVING"
        assert await health_status(channel, LIVENESS) == "SERVING"

        await postgres.stop()
        for name, watch in watches.items():
            assert await _next_status(watch, name) == "NOT_SERVING"
        # Asked while readiness is known to be NOT_SERVING: the process is alive.
        assert await health_status(channel, LIVENESS) == "SERVING"

        await postgres.start()
        for name, watch in watches.items():
            assert await _next_status(watch, name) == "SERVING"
        assert await health_status(channel, LIVENESS) == "SERVING"
        for watch in watches.values():
            watch.cancel()
    assert users.process.returncode is None, "".join(users.log)


async def test_sigterm_makes_liveness_and_readiness_not_serving(users: ServiceProcess) -> None:
    async with grpc.aio.insecure_channel(users.address) as channel:
        watches = {name: _watch(channel, name) for name in (LIVENESS, *READINESS)}
        for name, watch in watches.items():
            assert await _next_status(watch, name) == "SERVING"

        stopping = asyncio.create_task(users.stop())
        for name, watch in watches.items():
            assert await _next_status(watch, name) == "NOT_SERVING"
        # The open Watch calls would otherwise hold the shutdown for its whole grace period.
        for watch in watches.values():
            watch.cancel()
        assert await stopping == 0, "".join(users.log)
