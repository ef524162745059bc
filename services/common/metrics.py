"""Prometheus metrics of a service process (prometheus-client), served over HTTP.

- chat_rpc_duration_seconds{method,code}: RPC latency histogram (its _count is
  the RPC count by method and status code).
- chat_db_query_duration_seconds{query,outcome}: query execution time by the
  statement's stable name (services/common/statement_names.py), never by SQL text.
- chat_db_pool_connections{state}: pool size, idle, in use, max; and
  chat_db_pool_waiting: acquirers waiting for a connection.
- chat_db_notify_queue_usage: how full PostgreSQL's notification queue is, 0..1
  (pg_notification_queue_usage(), read by the health probe).
The messages service adds its stream gauges and counters to the same registry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import asyncpg
from prometheus_client import REGISTRY, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.statement_names import name_of

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

RPC_DURATION = Histogram(
    "chat_rpc_duration_seconds",
    "RPC latency by method and status code",
    ["method", "code"],
    buckets=LATENCY_BUCKETS,
)
QUERY_DURATION = Histogram(
    "chat_db_query_duration_seconds",
    "Database query execution time by statement name",
    ["query", "outcome"],
    buckets=LATENCY_BUCKETS,
)

# The server's whole queue (every database), as seen by this process's last probe.
NOTIFY_QUEUE_USAGE = Gauge(
    "chat_db_notify_queue_usage", "Fraction of PostgreSQL's NOTIFY queue in use (0..1)"
)


def observe_rpc(method: str, code: str, seconds: float) -> None:
    RPC_DURATION.labels(method, code).observe(seconds)


def observe_query(record: Any) -> None:
    """asyncpg query logger callback (Connection.add_query_logger)."""
    outcome = "error" if record.exception is not None else "ok"
    QUERY_DURATION.labels(name_of(record.query), outcome).observe(record.elapsed)


class PoolCollector(Collector):
    """Reads the pool's state at scrape time."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size, idle = self._pool.get_size(), self._pool.get_idle_size()
        connections = GaugeMetricFamily(
            "chat_db_pool_connections", "Pool connections by state", labels=["state"]
        )
        connections.add_metric(["open"], size)
        connections.add_metric(["idle"], idle)
        connections.add_metric(["in_use"], size - idle)
        connections.add_metric(["max"], self._pool.get_max_size())
        yield connections
        # asyncpg keeps free connections in an asyncio.Queue; its getters are the
        # acquirers waiting for one (no public accessor exists).
        queue = getattr(self._pool, "_queue", None)
        waiting = len(getattr(queue, "_getters", ()) or ())
        yield GaugeMetricFamily(
            "chat_db_pool_waiting", "Acquirers waiting for a pool connection", value=waiting
        )


class MetricsEndpoint:
    """The /metrics HTTP endpoint of one service process, and its pool collector."""

    def __init__(self, port: int, pool: asyncpg.Pool, host: str = "::") -> None:
        self._collector = PoolCollector(pool)
        REGISTRY.register(self._collector)
        try:
            self._server, self._thread = start_http_server(port, addr=host)
        except BaseException:
            REGISTRY.unregister(self._collector)
            raise
        self.port = self._server.server_port
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics on http://%s:%d/metrics", shown, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        REGISTRY.unregister(self._collector)
