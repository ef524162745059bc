"""Readiness that follows the database: a periodic probe on a connection of its own.

The server side of health (every service runs this watch); the command-line
client that asks a server for its health is health_client.py.

After `threshold` consecutive failures the service reports NOT_SERVING (for
the names it is given: readiness; liveness is not among them, see server.py);
the first success reports SERVING again. The process keeps running throughout:
the pool replaces broken connections on its own once the database answers.

The probe is `SELECT pg_notification_queue_usage()` rather than `SELECT 1`: as
cheap, and it feeds the chat_db_notify_queue_usage gauge (a full NOTIFY queue
makes every committing send fail) without another connection or query.

The probe does not use the pool: a pool that is busy (every connection waiting
on a locked row, say) says nothing about whether the database answers, and a
probe queued behind it would report the database down when it is fine. It keeps
one connection of its own (application_name `chat-<service>-health`, outside
DB_POOL_MAX_SIZE), opened on first use and again after any failure; a probe
that does not finish within `timeout_s` (connecting included) counts as a
failure and its connection is closed, never reused mid-query.

Probes start every `interval_s` (a probe that overruns delays the next), so a
database that stops answering is reported NOT_SERVING at most
`interval_s + (threshold - 1) * max(interval_s, timeout_s) + timeout_s` after
its last answer: with the defaults (5 s, 3 probes, 2 s) 17 s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
from grpc_health.v1 import health, health_pb2

from services.common.metrics import NOTIFY_QUEUE_USAGE
from services.common.pool import QUERY_FAILURES

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Connect = Callable[[], Awaitable[asyncpg.Connection]]
# What a probe can raise besides QUERY_FAILURES: a connection closed under it.
PROBE_FAILURES: tuple[type[BaseException], ...] = (*QUERY_FAILURES, asyncpg.InterfaceError)


def not_serving_bound(interval_s: float, timeout_s: float, threshold: int) -> float:
    """Longest time from the database's last answer to NOT_SERVING (see the docstring)."""
    return interval_s + (threshold - 1) * max(interval_s, timeout_s) + timeout_s


class DatabaseHealthWatch:
    def __init__(
        self,
        connect: Connect,
        servicer: health.aio.HealthServicer,
        service_names: Sequence[str],
        *,
        interval_s: float,
        timeout_s: float,
        threshold: int,
    ) -> None:
        self._connect = connect
        self._conn: asyncpg.Connection | None = None
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
                if self._conn is None or self._conn.is_closed():
                    self._conn = await self._connect()
                usage = await self._conn.fetchval("SELECT pg_notification_queue_usage()")
        except PROBE_FAILURES as exc:
            self._drop()
            log.warning("database health check failed: %s: %s", type(exc).__name__, exc)
            return False
        NOTIFY_QUEUE_USAGE.set(usage)
        return True

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

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
        loop = asyncio.get_running_loop()
        due = loop.time() + self._interval_s
        try:
            while True:
                await asyncio.sleep(max(0.0, due - loop.time()))
                await self.check_once()
                # Fixed rate: the next probe is due one interval after this one was.
                due = max(due + self._interval_s, loop.time())
        finally:
            self._drop()

    async def _set(self, status: int) -> None:
        self.serving = status == SERVING
        for name in self._names:
            await self._servicer.set(name, status)
