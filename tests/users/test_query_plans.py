"""LookupUser and the ListUsers prefix search use indexes at 100k users (EXPLAIN)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from services.users import store

pytestmark = pytest.mark.db


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


async def explain(conn: asyncpg.Connection, sql: str, *args: object) -> list[dict[str, Any]]:
    raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
    return plan_nodes(json.loads(raw)[0]["Plan"])


@pytest.fixture
async def hundred_k_users(database_url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(database_url)
    await conn.execute(
        """
        INSERT INTO users (email, username, first_name, last_name)
        SELECT 'user' || g || '@example.com', 'user' || g,
               (ARRAY['Ada', 'Grace', 'Alan', 'Edsger', 'Barbara'])[1 + g % 5] || g,
               (ARRAY['Lovelace', 'Hopper', 'Turing', 'Dijkstra', 'Liskov'])[1 + g % 5] || g
        FROM generate_series(1, 100000) g
        """
    )
    await conn.execute("ANALYZE users")
    return conn


@pytest.mark.parametrize("plan_mode", ["auto", "force_generic_plan"])
async def test_lookup_and_prefix_search_use_indexes(
    hundred_k_users: asyncpg.Connection, plan_mode: str
) -> None:
    conn = hundred_k_users
    try:
        # Prepared statements may run with a generic plan: both must use indexes.
        await conn.execute(f"SET plan_cache_mode = {plan_mode}")
        for sql, args, index in [
            (store.BY_EMAIL, ("USER77@example.com",), "idx_users_email"),
            (store.BY_USERNAME, ("User77",), "idx_users_username"),
        ]:
            nodes = await explain(conn, sql, *args)
            assert any(n.get("Index Name") == index for n in nodes), nodes
            assert not any(n["Node Type"] == "Seq Scan" for n in nodes)

        # A selective prefix: one index range scan per searched column, OR-ed.
        nodes = await explain(conn, store.SEARCH, None, False, "hopper777", "hopper777", 51)
        used = {n.get("Index Name") for n in nodes}
        assert {
            "idx_users_username",
            "idx_users_email",
            "idx_users_first_name",
            "idx_users_last_name",
        } <= used, nodes
        assert not any(n["Node Type"] == "Seq Scan" for n in nodes)
        # A common prefix: the planner may walk the username index instead; never a seq scan.
        nodes = await explain(conn, store.SEARCH, None, False, "A", "A", 51)
        assert not any(n["Node Type"] == "Seq Scan" for n in nodes), nodes

        nodes = await explain(conn, store.LIST, "user5", False, 51)
        assert any(n.get("Index Name") == "idx_users_username" for n in nodes), nodes
        assert not any(n["Node Type"] in ("Seq Scan", "Sort") for n in nodes)
    finally:
        await conn.close()
