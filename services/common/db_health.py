"""Health that follows the database: a periodic `SELECT 1`.

After `threshold` consecutive failures the service reports NOT_SERVING; the
first success reports SERVING again. The process keeps running throughout: the
pool replaces broken connections on its own once the database answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg
from grpc_health.v1 import health, health_pb2

from services.common.pool import QUERY_FAILURES

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DatabaseHealthWatch:
    def __init__(
        self,
        pool: asyncpg.Pool,
        servicer: health.aio.HealthServicer,
        service_names: Sequence[str],
        *,
        interval_s: float,
        timeout_s: float,
        threshold: int,
    ) -> None:
        self._pool = pool
        self._servicer = servicer
        self._names = list(service_names)
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._threshold = threshold
        self._failures = 0
        self.serving = True

    async def probe(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._pool.fetchval("SELECT 1")
        except QUERY_FAILURES as exc:
            log.warning("database health check failed: %s: %s", type(exc).__name__, exc)
            return False
        return True

    async def check_once(self) -> None:
        if await self.probe():
            self._failures = 0
            if not self.serving:
                log.info("database answers again: SERVING")
                await self._set(SERVING)
        else:
            self._failures += 1
            if self.serving and self._failures >= self._threshold:
                log.error("database unreachable %d times in a row: NOT_SERVING", self._failures)
                await self._set(NOT_SERVING)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.check_once()

    async def _set(self, status: int) -> None:
        self.serving = status == SERVING
        for name in self._names:
            await self._servicer.set(name, status)
