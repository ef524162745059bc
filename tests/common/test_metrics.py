"""Prometheus metrics of a running service, scraped over HTTP."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from devtools.ports import free_port
from services.common.settings import ServiceSettings
from tests.conftest import running
from tests.probe_service import PROBE, call


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        body: bytes = reply.read()
        return body.decode()


async def _served_metrics(database_url: str) -> str:
    """/metrics of a probe service after one call. A port found free can be taken
    before the endpoint binds it (the service's own gRPC port 0 may get it), in
    which case the service serves without metrics: then again, on another port."""
    for _ in range(5):
        port = free_port()
        settings = ServiceSettings(
            DATABASE_URL=database_url, GRPC_HOST="127.0.0.1", METRICS_PORT=port
        )
        async with running(PROBE, settings) as (service, channel):
            if service.metrics is None:
                continue
            assert await call(channel, b"pool") == b"42"
            return await asyncio.to_thread(_scrape, port)
    raise AssertionError("no free port for /metrics in 5 tries")


async def test_rpc_query_and_pool_series(database_url: str) -> None:
    text = await _served_metrics(database_url)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    rpc = ("chat_rpc_duration_seconds_count", (("code", "OK"), ("method", "/test.Probe/Call")))
    query = ("chat_db_query_duration_seconds_count", (("outcome", "ok"), ("query", "probe.answer")))
    assert samples[rpc] >= 1
    assert samples[query] >= 1
    assert samples[("chat_db_pool_connections", (("state", "max"),))] == 20
    assert samples[("chat_db_pool_waiting", ())] == 0


async def test_metrics_bind_the_interface_grpc_binds(database_url: str) -> None:
    """GRPC_HOST=127.0.0.1 keeps /metrics on loopback too (it used to be 0.0.0.0);
    METRICS_HOST chooses another interface."""
    import os

    import psutil

    for env, expected in (
        ({"GRPC_HOST": "127.0.0.1"}, "127.0.0.1"),
        ({"GRPC_HOST": "[::]", "METRICS_HOST": "127.0.0.1"}, "127.0.0.1"),
        ({"GRPC_HOST": "[::1]"}, "::1"),
    ):
        port = free_port()
        settings = ServiceSettings(DATABASE_URL=database_url, METRICS_PORT=port, **env)  # type: ignore[arg-type]
        async with running(PROBE, settings):
            listening = {
                c.laddr.ip
                for c in psutil.Process(os.getpid()).net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port
            }
        assert listening == {expected}, env
