"""chat.v1.AdminService, served by every service: operator statistics."""

from __future__ import annotations

from dataclasses import asdict

import asyncpg
from chat.v1 import admin_pb2, admin_pb2_grpc
from google.protobuf import duration_pb2

from services.common.convert import to_timestamp
from services.common.database_stats import collect_stats
from services.common.errors import PermissionDenied
from services.common.identity import caller_of
from services.common.types import Context

SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


# The statistics' dataclasses (database_stats.py) name their fields as the
# messages of admin.proto do, so each converts by its fields.


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def GetDatabaseStats(
        self, request: admin_pb2.GetDatabaseStatsRequest, context: Context
    ) -> admin_pb2.GetDatabaseStatsResponse:
        if not caller_of(context).trusted:
            raise PermissionDenied("AdminService is for trusted service calls only")
        async with self._pool.acquire() as conn:
            stats = await collect_stats(conn)
        uptime = duration_pb2.Duration()
        uptime.FromTimedelta(stats.uptime)
        return admin_pb2.GetDatabaseStatsResponse(
            server_version=stats.server_version,
            started_at=to_timestamp(stats.started_at),
            uptime=uptime,
            cache_hit_ratio=stats.cache_hit_ratio,
            notify_queue_usage=stats.notify_queue_usage,
            indexes=[admin_pb2.IndexUsage(**asdict(i)) for i in stats.indexes],
            tables=[admin_pb2.TableSize(**asdict(t)) for t in stats.tables],
            connections=[admin_pb2.ConnectionCount(**asdict(c)) for c in stats.connections],
            statements_available=stats.statements_available,
            statements_note=stats.statements_note,
            slowest_statements=[
                admin_pb2.SlowStatement(**asdict(s)) for s in stats.slowest_statements
            ],
        )
