"""`python -m db maintain`: VACUUM (ANALYZE), index bloat estimates, REINDEX.

1. VACUUM (ANALYZE) every chat table: reclaims dead rows for reuse and
   refreshes the planner's statistics.
2. Estimates each B-tree index's bloat from its size against the size its live
   entries need (reltuples x entry width from pg_stats, at the default 90%
   fill factor), the way the widely used catalog-only estimates do, since
   pgstattuple is not always installed (the embedded server lacks it).
3. Rebuilds indexes over the threshold with REINDEX INDEX CONCURRENTLY (no
   write lock on the table), then ANALYZE again so statistics match.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from db.stats import CHAT_TABLES
from services.common.types import DbConnection

DEFAULT_BLOAT_THRESHOLD = 0.30  # rebuild when 30% or more of the index is waste
DEFAULT_MIN_INDEX_BYTES = 1024 * 1024  # small indexes are not worth rebuilding

# Identifiers cannot be bound parameters, so these statements are literal text.
VACUUM_STATEMENTS = (
    "VACUUM (ANALYZE) users",
    "VACUUM (ANALYZE) threads",
    "VACUUM (ANALYZE) thread_participants",
    "VACUUM (ANALYZE) messages",
    "VACUUM (ANALYZE) message_attachments",
    "VACUUM (ANALYZE) archived_messages",
    "VACUUM (ANALYZE) archived_threads",
    "VACUUM (ANALYZE) archived_thread_participants",
    "VACUUM (ANALYZE) archived_message_attachments",
)
ANALYZE_STATEMENT = "ANALYZE"

_PAGE = 8192
_PAGE_USABLE = _PAGE * 0.90 - 24  # default B-tree fill factor, minus the page header
_ENTRY_OVERHEAD = 8 + 4  # index tuple header + line pointer

_BLOAT = """
SELECT ic.relname AS index, tc.relname AS table, pg_relation_size(ic.oid) AS actual_bytes,
       greatest(ic.reltuples, 0) AS entries,
       coalesce(sum(coalesce(s.avg_width, 16)), 16) AS key_width
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_class tc ON tc.oid = i.indrelid
JOIN pg_am am ON am.oid = ic.relam AND am.amname = 'btree'
JOIN pg_namespace n ON n.oid = tc.relnamespace AND n.nspname = 'public'
LEFT JOIN LATERAL unnest(i.indkey) AS k(attnum) ON true
LEFT JOIN pg_attribute a ON a.attrelid = tc.oid AND a.attnum = k.attnum AND k.attnum > 0
LEFT JOIN pg_stats s
  ON s.schemaname = 'public' AND s.tablename = tc.relname AND s.attname = a.attname
WHERE tc.relname = ANY ($1::text[])
GROUP BY ic.relname, tc.relname, ic.oid, ic.reltuples
ORDER BY tc.relname, ic.relname
"""

_SAFE_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


@dataclass(frozen=True)
class IndexBloat:
    table: str
    index: str
    actual_bytes: int
    expected_bytes: int

    @property
    def ratio(self) -> float:
        """Fraction of the index that is waste (0 when it is no larger than needed)."""
        if self.actual_bytes == 0:
            return 0.0
        return max(0.0, 1.0 - self.expected_bytes / self.actual_bytes)


async def estimate_bloat(conn: DbConnection) -> list[IndexBloat]:
    estimates = []
    for row in await conn.fetch(_BLOAT, list(CHAT_TABLES)):
        entry = _ENTRY_OVERHEAD + float(row["key_width"])
        pages = max(1, -(-float(row["entries"]) * entry // _PAGE_USABLE)) + 1  # + metapage
        estimates.append(
            IndexBloat(row["table"], row["index"], int(row["actual_bytes"]), int(pages * _PAGE))
        )
    return estimates


async def reindex(conn: DbConnection, index: str) -> None:
    # The name comes from the catalog, and is checked to be a plain identifier
    # before it is written into the statement (identifiers cannot be parameters).
    if not _SAFE_IDENTIFIER.match(index):
        raise ValueError(f"refusing to reindex unexpected index name {index!r}")
    await conn.execute(f'REINDEX INDEX CONCURRENTLY "{index}"')


@dataclass
class MaintenanceReport:
    vacuumed: list[str]
    bloat: list[IndexBloat]
    rebuilt: list[str]


async def maintain(
    conn: DbConnection,
    *,
    threshold: float = DEFAULT_BLOAT_THRESHOLD,
    min_index_bytes: int = DEFAULT_MIN_INDEX_BYTES,
    dry_run: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> MaintenanceReport:
    vacuumed = []
    for statement in VACUUM_STATEMENTS:
        if not dry_run:
            await conn.execute(statement)
        vacuumed.append(statement.rsplit(" ", 1)[1])
        say(f"{'would run' if dry_run else 'ran'}: {statement}")
    bloat = await estimate_bloat(conn)
    rebuilt = []
    for item in bloat:
        if item.ratio >= threshold and item.actual_bytes >= min_index_bytes:
            say(
                f"{'would rebuild' if dry_run else 'rebuilding'} {item.index} "
                f"({item.ratio:.0%} estimated bloat, {item.actual_bytes} bytes)"
            )
            if not dry_run:
                await reindex(conn, item.index)
            rebuilt.append(item.index)
    if rebuilt and not dry_run:
        await conn.execute(ANALYZE_STATEMENT)
    return MaintenanceReport(vacuumed, bloat, rebuilt)
