"""Database statistics for operators, as AdminService and `python -m db stats` read them.

Index usage (flagging never-scanned indexes), the cache hit ratio, connections by
application and state, server uptime, NOTIFY queue usage, table and index sizes,
and the slowest statements when pg_stat_statements is available.

It lives on the services' side because AdminService serves it: the shared
runtime never imports the `db` tool package, which imports the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg

from services.common.types import DbConnection

# Tables whose statistics matter to operators of this system.
CHAT_TABLES = (
    "users",
    "threads",
    "thread_participants",
    "messages",
    "message_attachments",
    "archived_messages",
    "archived_threads",
    "archived_thread_participants",
    "archived_message_attachments",
)
SLOWEST_STATEMENTS = 10


@dataclass(frozen=True)
class IndexUsage:
    table: str
    index: str
    scans: int
    size_bytes: int

    @property
    def unused(self) -> bool:
        return self.scans == 0


@dataclass(frozen=True)
class TableSize:
    table: str
    table_bytes: int
    index_bytes: int
    live_rows: int
    dead_rows: int


@dataclass(frozen=True)
class ConnectionCount:
    application_name: str
    state: str
    count: int


@dataclass(frozen=True)
class SlowStatement:
    query: str
    calls: int
    mean_ms: float
    total_ms: float


@dataclass
class DatabaseStats:
    server_version: str
    started_at: datetime
    uptime: timedelta
    cache_hit_ratio: float | None  # hits / (hits + reads); None before any read
    notify_queue_usage: float  # fraction of the NOTIFY queue in use, 0..1
    indexes: list[IndexUsage] = field(default_factory=list)
    tables: list[TableSize] = field(default_factory=list)
    connections: list[ConnectionCount] = field(default_factory=list)
    statements_available: bool = False
    statements_note: str = ""
    slowest_statements: list[SlowStatement] = field(default_factory=list)


async def collect_stats(conn: DbConnection) -> DatabaseStats:
    server = await conn.fetchrow(
        """
        SELECT current_setting('server_version') AS version,
               pg_postmaster_start_time() AS started_at,
               now() - pg_postmaster_start_time() AS uptime,
               pg_notification_queue_usage() AS notify_usage
        """
    )
    # Buffer hits and disk reads of this database: ratio = hits / (hits + reads).
    cache = await conn.fetchrow(
        "SELECT blks_hit, blks_read FROM pg_stat_database WHERE datname = current_database()"
    )
    assert server is not None and cache is not None  # single-row queries
    hits, reads = cache["blks_hit"], cache["blks_read"]
    stats = DatabaseStats(
        server_version=server["version"],
        started_at=server["started_at"],
        uptime=server["uptime"],
        cache_hit_ratio=(hits / (hits + reads)) if hits + reads else None,
        notify_queue_usage=float(server["notify_usage"]),
    )
    stats.indexes = [
        IndexUsage(r["table"], r["index"], r["scans"], r["size_bytes"])
        for r in await conn.fetch(
            """
            SELECT relname AS table, indexrelname AS index, idx_scan AS scans,
                   pg_relation_size(indexrelid) AS size_bytes
            FROM pg_stat_user_indexes
            WHERE relname = ANY ($1::text[])
            ORDER BY relname, indexrelname
            """,
            list(CHAT_TABLES),
        )
    ]
    stats.tables = [
        TableSize(r["table"], r["table_bytes"], r["index_bytes"], r["live"], r["dead"])
        for r in await conn.fetch(
            """
            SELECT relname AS table, pg_table_size(relid) AS table_bytes,
                   pg_indexes_size(relid) AS index_bytes,
                   n_live_tup AS live, n_dead_tup AS dead
            FROM pg_stat_user_tables
            WHERE relname = ANY ($1::text[])
            ORDER BY pg_total_relation_size(relid) DESC
            """,
            list(CHAT_TABLES),
        )
    ]
    stats.connections = [
        ConnectionCount(r["app"], r["state"], r["n"])
        for r in await conn.fetch(
            """
            SELECT coalesce(nullif(application_name, ''), '(none)') AS app,
                   coalesce(state, '(background)') AS state, count(*)::int AS n
            FROM pg_stat_activity
            WHERE datname = current_database()
            GROUP BY 1, 2 ORDER BY 1, 2
            """
        )
    ]
    await _slowest_statements(conn, stats)
    return stats


async def _slowest_statements(conn: DbConnection, stats: DatabaseStats) -> None:
    installed = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements')"
    )
    if not installed:
        stats.statements_note = (
            "pg_stat_statements is not available: add it to shared_preload_libraries "
            "and run CREATE EXTENSION pg_stat_statements"
        )
        return
    try:
        rows = await conn.fetch(
            """
            SELECT query, calls, mean_exec_time AS mean_ms, total_exec_time AS total_ms
            FROM pg_stat_statements
            WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
            ORDER BY mean_exec_time DESC
            LIMIT $1
            """,
            SLOWEST_STATEMENTS,
        )
    except asyncpg.PostgresError as exc:  # installed but not preloaded
        stats.statements_note = f"pg_stat_statements cannot be read: {exc}"
        return
    stats.statements_available = True
    stats.slowest_statements = [
        SlowStatement(r["query"], r["calls"], r["mean_ms"], r["total_ms"]) for r in rows
    ]
