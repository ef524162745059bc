"""Migration 0014 counts the rows written before it: unread counters backfilled.

Rows are written at 0013 (no counters yet) in every shape the definition of an
unread count distinguishes: no read mark, a mark between messages, a mark exactly
at a message, a mark before the participant's own messages (a rejoin), deleted
messages before and after marks, an archived thread, and more threads than one
backfill batch (1000). After `up`, every counter matches the definition; a
round trip (down to 0013, up) gives the same counters; and the triggers keep them
from there (a send, a deletion).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from db.migrations import load_migrations
from db.runner import Migrator

pytestmark = pytest.mark.db

BEFORE = 13  # the last migration before 0014

COUNTED = """
SELECT p.thread_id, p.user_id, t.message_count - p.read_count AS counted,
       (SELECT count(*) FROM messages m
        WHERE m.thread_id = p.thread_id
          AND m.created_at > coalesce(p.last_read_at, '-infinity')
          AND m.user_id <> p.user_id AND m.status <> 'deleted') AS defined
FROM thread_participants p JOIN threads t ON t.id = p.thread_id
ORDER BY p.thread_id, p.user_id
"""


@pytest.fixture
async def at_0013(empty_database_url: str) -> AsyncIterator[tuple[asyncpg.Connection, Migrator]]:
    conn = await asyncpg.connect(empty_database_url)
    migrator = Migrator(conn, load_migrations())
    await migrator.up(BEFORE)
    try:
        yield conn, migrator
    finally:
        await conn.close()


async def seed(conn: asyncpg.Connection) -> dict[str, uuid.UUID]:
    """Users a, b, c in thread `main` with crafted marks; 1050 small threads."""
    ids: dict[str, uuid.UUID] = {}
    for name in ("a", "b", "c", "d"):
        ids[name] = await conn.fetchval(
            "INSERT INTO users (email, username) VALUES ($1 || '@x.io', $1) RETURNING id", name
        )
    base = datetime(2026, 1, 1, tzinfo=UTC)
    ids["main"] = await conn.fetchval(
        "INSERT INTO threads (name, last_message_at) VALUES ('main', $1::timestamptz"
        " + interval '20 minutes') RETURNING id",
        base,
    )
    # 20 messages a minute apart, authors a, b, c in turn; every 5th deleted.
    await conn.execute(
        """
        INSERT INTO messages (thread_id, user_id, content, status, created_at, updated_at)
        SELECT $1, (ARRAY[$2::uuid, $3::uuid, $4::uuid])[g % 3 + 1], 'm',
               CASE WHEN g % 5 = 0 THEN 'deleted' ELSE 'sent' END,
               $5::timestamptz + make_interval(mins => g),
               $5::timestamptz + make_interval(mins => g)
        FROM generate_series(1, 20) g
        """,
        ids["main"],
        ids["a"],
        ids["b"],
        ids["c"],
        base,
    )
    # a: no mark; b: exactly at message 11; c: between 12 and 13, before own
    # messages 14 and 17 (as after a rejoin); d: at the last message.
    await conn.execute(
        """
        INSERT INTO thread_participants (thread_id, user_id, role, last_read_at) VALUES
            ($1, $2, 'owner', NULL),
            ($1, $3, 'member', $6::timestamptz + interval '11 minutes'),
            ($1, $4, 'member', $6::timestamptz + interval '12 minutes 30 seconds'),
            ($1, $5, 'member', $6::timestamptz + interval '20 minutes')
        """,
        ids["main"],
        ids["a"],
        ids["b"],
        ids["c"],
        ids["d"],
        base,
    )
    # More threads than one batch, each with a few messages and two members.
    await conn.execute(
        """
        WITH t AS (
            INSERT INTO threads (name, last_message_at)
            SELECT 'small' || g, $3::timestamptz + interval '1 hour' FROM generate_series(1, 1050) g
            RETURNING id
        ), m AS (
            INSERT INTO messages (thread_id, user_id, content, created_at)
            SELECT t.id, CASE WHEN g % 2 = 0 THEN $1::uuid ELSE $2::uuid END, 's',
                   $3::timestamptz + make_interval(secs => g)
            FROM t, generate_series(1, 3) g
        )
        INSERT INTO thread_participants (thread_id, user_id, last_read_at)
        SELECT t.id, u.id, CASE WHEN u.id = $1 THEN $3::timestamptz + interval '2 seconds' END
        FROM t, unnest(ARRAY[$1::uuid, $2::uuid]) AS u(id)
        """,
        ids["a"],
        ids["b"],
        base,
    )
    # An archived thread (counters of archived rows are 0).
    archived = uuid.uuid4()
    await conn.execute(
        "INSERT INTO archived_threads (id, name, last_seq) VALUES ($1, 'old', 1)", archived
    )
    await conn.execute(
        "INSERT INTO archived_thread_participants (thread_id, user_id) VALUES ($1, $2)",
        archived,
        ids["a"],
    )
    await conn.execute(
        "INSERT INTO archived_messages (thread_id, user_id, content, seq, change_seq)"
        " VALUES ($1, $2, 'old', 1, 1)",
        archived,
        ids["b"],
    )
    ids["archived"] = archived
    return ids


async def counted(conn: asyncpg.Connection) -> list[tuple[object, ...]]:
    rows = await conn.fetch(COUNTED)
    wrong = [tuple(r) for r in rows if r["counted"] != r["defined"]]
    assert wrong == [], wrong[:5]
    miscounted_threads = await conn.fetchval(
        "SELECT count(*) FROM threads t WHERE t.message_count <> ("
        " SELECT count(*) FROM messages m WHERE m.thread_id = t.id AND m.status <> 'deleted')"
    )
    assert miscounted_threads == 0
    return [tuple(r) for r in rows]


async def test_backfill_counts_rows_written_before_it(
    at_0013: tuple[asyncpg.Connection, Migrator],
) -> None:
    conn, migrator = at_0013
    ids = await seed(conn)
    await migrator.up()
    rows = await counted(conn)
    assert len(rows) == 4 + 2 * 1050
    main = {r[1]: r[2] for r in rows if r[0] == ids["main"]}
    # 20 messages, 4 deleted (5, 10, 15, 20); authors by g % 3: 1 b, 2 c, 0 a.
    # Message g is by a (g % 3 = 0), b (1) or c (2); 5, 10, 15 and 20 are deleted.
    assert main == {
        ids["a"]: 11,  # b's 1 4 7 13 16 19 and c's 2 8 11 14 17: nothing read
        ids["b"]: 4,  # after 11 (read, at the mark): a's 12 18, c's 14 17
        ids["c"]: 4,  # after 12m30s: b's 13 16 19, a's 18 (14, 17 are c's own)
        ids["d"]: 0,
    }
    assert (
        await conn.fetchval(
            "SELECT message_count FROM archived_threads WHERE id = $1", ids["archived"]
        )
        == 0
    )

    # Down to 0013 and up again: the same counts.
    await migrator.down(BEFORE)
    assert not await conn.fetchval(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'threads'::regclass"
        " AND attname = 'message_count' AND NOT attisdropped"
    )
    await migrator.up()
    assert await counted(conn) == rows

    # From here the triggers keep them: a send, a deletion, a mark.
    outcome = await conn.fetchval(
        "SELECT outcome FROM chat_send_message($1, $2, 'new', NULL, NULL, NULL, '[]')",
        ids["main"],
        ids["b"],
    )
    assert outcome == "created"
    await conn.execute(
        "UPDATE messages SET status = 'deleted' WHERE id = (SELECT id FROM messages"
        " WHERE thread_id = $1 AND status = 'sent' ORDER BY created_at LIMIT 1)",
        ids["main"],
    )
    await conn.execute(
        "UPDATE thread_participants SET last_read_at = now() WHERE thread_id = $1 AND user_id = $2",
        ids["main"],
        ids["c"],
    )
    await counted(conn)
