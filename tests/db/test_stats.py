"""Operator statistics: `python -m db stats` and chat.v1.AdminService."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest
from chat.v1 import admin_pb2, admin_pb2_grpc

from db.stats import collect_stats
from services.common.settings import ServiceSettings
from tests.conftest import running
from tests.db.test_migrations import run_db_cli
from tests.probe_service import PROBE


@pytest.mark.db
async def test_collect_stats_reports_usage_sizes_and_connections(database_url: str) -> None:
    worker = await asyncpg.connect(database_url)
    try:
        # Use one index, leave the others untouched.
        await worker.execute(
            "INSERT INTO users (email, username) SELECT 'u' || g || '@x.io', 'u' || g "
            "FROM generate_series(1, 50) g"
        )
        await worker.execute("ANALYZE users")
        await worker.execute("SET enable_seqscan = off")
        await worker.fetchval("SELECT id FROM users WHERE lower(username) = 'u7'")
    finally:
        await worker.close()  # a backend flushes its statistics when it exits
    conn = await asyncpg.connect(database_url, server_settings={"application_name": "chat-probe"})
    try:
        for _ in range(100):  # bounded wait for the exiting backend's flush
            stats = await collect_stats(conn)
            if any(i.index == "idx_users_username" and i.scans for i in stats.indexes):
                break
            await asyncio.sleep(0.05)
            await conn.execute("SELECT pg_stat_clear_snapshot()")
    finally:
        await conn.close()
    assert stats.cache_hit_ratio is not None and 0.0 <= stats.cache_hit_ratio <= 1.0
    assert 0.0 <= stats.notify_queue_usage <= 1.0
    assert stats.uptime.total_seconds() > 0
    by_index = {i.index: i for i in stats.indexes}
    assert by_index["idx_users_username"].scans >= 1
    assert not by_index["idx_users_username"].unused
    assert by_index["idx_message_attachments"].unused
    users = next(t for t in stats.tables if t.table == "users")
    assert users.table_bytes > 0 and users.index_bytes > 0
    assert any(c.application_name == "chat-probe" for c in stats.connections)
    if not stats.statements_available:
        assert "pg_stat_statements" in stats.statements_note


@pytest.mark.db
async def test_db_stats_command_prints_the_report(database_url: str) -> None:
    result = await asyncio.to_thread(run_db_cli, database_url, "stats")
    assert result.returncode == 0, result.stderr
    for heading in ("cache hit ratio", "connections", "indexes", "slowest statements"):
        assert heading in result.stdout
    assert "idx_messages_thread" in result.stdout


async def test_admin_service_for_trusted_calls_only(service_settings: ServiceSettings) -> None:
    async with running(PROBE, service_settings) as (_, channel):
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        reply = await admin.GetDatabaseStats(admin_pb2.GetDatabaseStatsRequest())
        assert reply.server_version
        assert {i.index for i in reply.indexes} >= {"idx_messages_thread", "idx_users_email"}
        # The service's own pool shows up under its application name.
        assert any(c.application_name == "chat-users" for c in reply.connections)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.GetDatabaseStats(
                admin_pb2.GetDatabaseStatsRequest(),
                metadata=(("x-user-id", "6f1c3d2e-8a4b-4c5d-9e6f-0a1b2c3d4e5f"),),
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
