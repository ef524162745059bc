"""grpc.health.v1.Health/Watch on the three services, as `make run` starts them.

Client-side health checking (gRFC A17) and several load balancers watch rather
than poll. Each service process runs with its defaults (only the database and
free ports are given) over a PostgreSQL of its own; the test stops and starts
that PostgreSQL and follows every Watch stream: SERVING, then NOT_SERVING once
the database is lost, then SERVING again when it is back, without a restart.

With the defaults (a probe every HEALTH_CHECK_INTERVAL=5 s, NOT_SERVING after
HEALTH_FAILURE_THRESHOLD=3 failures) detection takes about 15 s and recovery at
most 5 s; nothing is lowered, the waits below are bounds, not expectations.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.processes import ServiceProcess, start_service_process
from tests.postgres import RestartablePostgres, migrate

SERVICES = {
    "users": "chat.v1.UsersService",
    "threads": "chat.v1.ThreadsService",
    "messages": "chat.v1.MessagesService",
}
Status = health_pb2.HealthCheckResponse
# Bounds on waiting for a status change (default detection is ~15 s).
CHANGE_BOUND_S = 60.0


@pytest.fixture
async def postgres() -> AsyncIterator[RestartablePostgres]:
    server = RestartablePostgres()
    try:
        await migrate(server.url)
        yield server
    finally:
        await server.close()


async def _next_status(watch: Any, service: str) -> str:
    try:
        reply = await asyncio.wait_for(watch.read(), timeout=CHANGE_BOUND_S)
    except TimeoutError:
        pytest.fail(f"{service}: no health change within {CHANGE_BOUND_S:.0f}s")
    assert reply is not grpc.aio.EOF, f"{service}: Watch ended"
    return str(Status.ServingStatus.Name(reply.status))


async def _expect_all(watches: dict[str, Any], wanted: str) -> None:
    """Every watch reports `wanted` (intermediate repeats are allowed by the protocol)."""

    async def one(key: str, watch: Any) -> None:
        status = await _next_status(watch, key)
        assert status == wanted, f"{key}: Watch sent {status}, expected {wanted}"

    await asyncio.gather(*(one(key, watch) for key, watch in watches.items()))


async def test_watch_follows_the_database_on_every_service(
    postgres: RestartablePostgres,
) -> None:
    procs: list[ServiceProcess] = []
    channels: list[grpc.aio.Channel] = []
    try:
        for name in SERVICES:
            procs.append(await start_service_process(name, postgres.url))
        watches: dict[str, Any] = {}
        for proc in procs:
            channel = grpc.aio.insecure_channel(proc.address)
            channels.append(channel)
            stub: Any = health_pb2_grpc.HealthStub(channel)
            # The overall status ("") and the service's own name.
            for service in ("", SERVICES[proc.name]):
                key = f"{proc.name}:{service or '(overall)'}"
                watches[key] = stub.Watch(health_pb2.HealthCheckRequest(service=service))

        await _expect_all(watches, "SERVING")
        await postgres.stop()
        await _expect_all(watches, "NOT_SERVING")
        await postgres.start()
        await _expect_all(watches, "SERVING")

        for proc in procs:
            assert proc.process.returncode is None, f"{proc.name} exited:\n{''.join(proc.log)}"
            errors = [line for line in proc.log if "code=INTERNAL" in line]
            assert not errors, errors
        for watch in watches.values():
            watch.cancel()
    finally:
        for channel in channels:
            await channel.close()
        for proc in procs:
            await proc.stop()
