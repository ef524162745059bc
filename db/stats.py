"""`python -m db stats`: the operator report of services/common/database_stats.py."""

from __future__ import annotations

from services.common.database_stats import CHAT_TABLES as CHAT_TABLES
from services.common.database_stats import DatabaseStats
from services.common.database_stats import collect_stats as collect_stats


def format_stats(stats: DatabaseStats) -> str:
    """The report `python -m db stats` prints."""
    ratio = "n/a" if stats.cache_hit_ratio is None else f"{stats.cache_hit_ratio:.4f}"
    lines = [
        f"server          PostgreSQL {stats.server_version}",
        f"started         {stats.started_at:%Y-%m-%d %H:%M:%S%z} (uptime {stats.uptime})",
        f"cache hit ratio {ratio}  (blocks hit / (hit + read))",
        f"notify queue    {stats.notify_queue_usage:.6f} of capacity in use",
        "",
        "connections (application, state, count)",
        *(f"  {c.application_name:<24} {c.state:<24} {c.count}" for c in stats.connections),
        "",
        "tables (table, data bytes, index bytes, live rows, dead rows)",
        *(
            f"  {t.table:<24} {t.table_bytes:>14} {t.index_bytes:>14} {t.live_rows:>12} "
            f"{t.dead_rows:>10}"
            for t in stats.tables
        ),
        "",
        "indexes (table, index, scans, bytes)",
        *(
            f"  {i.table:<24} {i.index:<40} {i.scans:>10} {i.size_bytes:>12}"
            f"{'  UNUSED' if i.unused else ''}"
            for i in stats.indexes
        ),
        "",
    ]
    if stats.statements_available:
        lines.append("slowest statements (mean ms, calls, query)")
        lines += [
            f"  {s.mean_ms:>10.3f} {s.calls:>8}  {' '.join(s.query.split())[:120]}"
            for s in stats.slowest_statements
        ]
    else:
        lines.append(f"slowest statements: {stats.statements_note}")
    return "\n".join(lines)
