"""History pages cost the same at any depth: EXPLAIN ANALYZE at 10^5 rows.

ListReplies at 100,000 replies to one message: the first page and a page deep in
the list are each one range scan of idx_messages_replies, in order (no Sort), that
reads no more rows than the page asks for.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from services.messages import store

pytestmark = pytest.mark.db

REPLIES = 100_000
PAGE = 51  # page_size 50, plus the one row that says another page follows


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


@pytest.fixture
async def many_replies(database_url: str) -> AsyncIterator[tuple[asyncpg.Connection, uuid.UUID]]:
    conn = await asyncpg.connect(database_url)
    try:
        user = await conn.fetchval(
            "INSERT INTO users (email, username) VALUES ('a@x.io', 'a') RETURNING id"
        )
        thread = await conn.fetchval("INSERT INTO threads (name) VALUES ('t') RETURNING id")
        parent = await conn.fetchval(
            "INSERT INTO messages (thread_id, user_id, content) VALUES ($1, $2, 'root') "
            "RETURNING id",
            thread,
            user,
        )
        # Positions given explicitly (the trigger only assigns missing ones), plus
        # as many messages that are not replies, in another thread.
        await conn.execute(
            """
            INSERT INTO messages (thread_id, user_id, content, parent_id, seq, change_seq,
                                  created_at)
            SELECT $1, $2, 'reply ' || g, $3, g + 1, g + 1,
                   now() - interval '1 day' + g * interval '1 ms'
            FROM generate_series(1, $4) g
            """,
            thread,
            user,
            parent,
            REPLIES,
        )
        other = await conn.fetchval("INSERT INTO threads (name) VALUES ('o') RETURNING id")
        await conn.execute(
            "INSERT INTO messages (thread_id, user_id, content, seq, change_seq) "
            "SELECT $1, $2, 'm' || g, g, g FROM generate_series(1, $3) g",
            other,
            user,
            REPLIES,
        )
        await conn.execute("ANALYZE messages")
        yield conn, parent
    finally:
        await conn.close()


async def _analyze(conn: asyncpg.Connection, *args: object) -> list[dict[str, Any]]:
    raw = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {store.REPLIES_PAGE}", *args)
    return plan_nodes(json.loads(raw)[0]["Plan"])


@pytest.mark.parametrize("plan_mode", ["auto", "force_generic_plan"])
async def test_replies_pages_are_one_ordered_range_scan_at_any_depth(
    many_replies: tuple[asyncpg.Connection, uuid.UUID], plan_mode: str
) -> None:
    conn, parent = many_replies
    await conn.execute(f"SET plan_cache_mode = {plan_mode}")
    deep = await conn.fetchrow(
        "SELECT created_at, id FROM messages WHERE parent_id = $1 "
        "ORDER BY created_at, id OFFSET $2 LIMIT 1",
        parent,
        REPLIES * 9 // 10,
    )
    assert deep is not None
    positions: list[tuple[datetime | None, uuid.UUID | None]] = [
        (None, None),
        (deep["created_at"], deep["id"]),
    ]
    for after_at, after_id in positions:
        nodes = await _analyze(conn, parent, after_at, after_id, PAGE)
        scans = [n for n in nodes if n.get("Index Name") == "idx_messages_replies"]
        assert scans, [n["Node Type"] for n in nodes]
        assert not any(n["Node Type"] in ("Sort", "Seq Scan", "Bitmap Heap Scan") for n in nodes)
        # The scan stops after the page: the same work on page 1 and page 1,800.
        assert scans[0]["Actual Rows"] <= PAGE, scans[0]
