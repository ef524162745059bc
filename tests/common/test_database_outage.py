"""Health follows the database: stop PostgreSQL under a running service and start it again."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from db.migrations import load_migrations
from db.runner import Migrator
from services.common.settings import ServiceSettings
from tests.conftest import health_status, running
from tests.postgres import RestartablePostgres
from tests.probe_service import PROBE, call


async def _wait_for_health(channel: grpc.aio.Channel, wanted: str) -> None:
    for _ in range(300):  # bounded wait for the watchdog to notice (not a timing assertion)
        if await health_status(channel, "test.Probe") == wanted:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"health never became {wanted}")


async def test_not_serving_while_database_is_down_then_recovers_without_restart() -> None:
    server = RestartablePostgres()
    url = server.url
    try:
        conn = await asyncpg.connect(url)
        await Migrator(conn, load_migrations()).up()
        await conn.close()
        # The health watch's timing is the setting under test: a probe every 0.1 s, NOT_SERVING
        # after 2 failures, so the outage is seen in well under a second. Its twin
        # with the defaults (5 s, 3 failures) on real service processes is
        # tests/common/test_health_watch.py. GRPC_HOST and METRICS_PORT=0 only say
        # where to listen (loopback; no /metrics port shared by parallel servers).
        settings = ServiceSettings(
            DATABASE_URL=url,
            GRPC_HOST="127.0.0.1",
            HEALTH_CHECK_INTERVAL=0.1,
            HEALTH_FAILURE_THRESHOLD=2,
            METRICS_PORT=0,
        )
        async with running(PROBE, settings) as (_, channel):
            assert await call(channel, b"pool") == b"42"
            assert await health_status(channel, "test.Probe") == "SERVING"

            await server.stop()
            await _wait_for_health(channel, "NOT_SERVING")
            assert await health_status(channel) == "NOT_SERVING"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(channel, b"pool", deadline_s=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

            await server.start()
            await _wait_for_health(channel, "SERVING")
            assert await call(channel, b"pool") == b"42"
    finally:
        await server.close()
