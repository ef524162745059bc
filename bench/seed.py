"""Seed the benchmark database fast with COPY (not row-by-row RPCs).

Triggers and foreign-key checks are skipped for the load (session_replication_role
= replica), so positions, activity times and counters are written explicitly,
exactly as the send path would have left them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from services.common.pagination import TIME_ID, PageCodec, PageKind

MESSAGE_COLUMNS = [
    "id", "thread_id", "user_id", "content", "parent_id", "status", "metadata",
    "created_at", "updated_at", "seq", "change_seq", "request_id",
]  # fmt: skip
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DEEP_PAGE_AFTER = 10_000  # the deep page starts after this many messages


@dataclass
class Seeded:
    senders: list[str] = field(default_factory=list)
    spread: list[tuple[str, str]] = field(default_factory=list)  # (thread, sender)
    hot_thread: str = ""
    hot_members: list[str] = field(default_factory=list)
    history: dict[int, str] = field(default_factory=dict)  # thread size -> thread
    history_members: list[str] = field(default_factory=list)  # members of every history thread
    deep_tokens: dict[int, str] = field(default_factory=dict)
    inbox_user: str = ""
    inbox_threads: int = 0
    inbox_backlog: int = 0
    rows: int = 0

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _messages(
    thread: uuid.UUID, authors: list[uuid.UUID], n: int, start: dt.datetime
) -> Iterator[tuple[object, ...]]:
    for i in range(n):
        at = start + dt.timedelta(milliseconds=i)
        yield (uuid.uuid4(), thread, authors[i % len(authors)], f"message {i} of a long history",
               None, "sent", None, at, at, i + 1, i + 1, None)  # fmt: skip


async def _copy_messages(conn: asyncpg.Connection, rows: Iterator[tuple[object, ...]]) -> None:
    await conn.copy_records_to_table("messages", records=rows, columns=MESSAGE_COLUMNS)


async def _thread(
    conn: asyncpg.Connection, name: str, members: list[uuid.UUID], n: int
) -> uuid.UUID:
    last = EPOCH + dt.timedelta(milliseconds=max(n - 1, 0))
    thread: uuid.UUID = await conn.fetchval(
        "INSERT INTO threads (name, last_message_at, last_seq, created_at) "
        "VALUES ($1, $2, $3, $4) RETURNING id",
        name,
        last if n else None,
        n,
        EPOCH - dt.timedelta(days=1),
    )
    await conn.copy_records_to_table(
        "thread_participants",
        records=[(thread, m, "member", None) for m in members],
        columns=["thread_id", "user_id", "role", "last_read_at"],
    )
    return thread


async def seed(conn: asyncpg.Connection, *, scale: float, say: Any) -> Seeded:
    out = Seeded()
    await conn.execute("SET session_replication_role = replica")
    users: list[uuid.UUID] = [uuid.uuid4() for _ in range(300)]
    await conn.copy_records_to_table(
        "users",
        records=[(u, f"bench{i}@example.com", f"bench{i}") for i, u in enumerate(users)],
        columns=["id", "email", "username"],
    )
    out.senders = [str(u) for u in users[:200]]
    # Many small threads for sends spread out, one hot thread everyone writes to.
    for i in range(200):
        pair = [users[i], users[(i + 1) % 200]]
        thread = await _thread(conn, f"pair{i}", pair, 0)
        out.spread.append((str(thread), str(users[i])))
    hot = await _thread(conn, "hot", users[:200], 0)
    out.hot_thread, out.hot_members = str(hot), [str(u) for u in users[:200]]

    sizes = [int(10**k * scale) for k in (4, 5, 6)]
    out.history_members = [str(u) for u in users[200:202]]
    for size in sizes:
        say(f"seeding a thread of {size:,} messages")
        thread = await _thread(conn, f"history{size}", users[200:202], size)
        await _copy_messages(conn, _messages(thread, users[200:202], size, EPOCH))
        out.history[size] = str(thread)
        out.rows += size

    # One user in 500 threads, each with a backlog of unread messages from a partner.
    me, partner = users[250], users[251]
    out.inbox_user = str(me)
    out.inbox_threads, out.inbox_backlog = 500, int(10_000 * scale)
    say(f"seeding an inbox of {out.inbox_threads} threads x {out.inbox_backlog:,} unread")
    for i in range(out.inbox_threads):
        thread = await _thread(conn, f"inbox{i}", [me, partner], out.inbox_backlog)
        await _copy_messages(
            conn, _messages(thread, [partner], out.inbox_backlog, EPOCH + dt.timedelta(seconds=i))
        )
        out.rows += out.inbox_backlog
    await conn.execute("RESET session_replication_role")
    # The unread counters (db/functions/unread.sql), which the load's triggers skipped.
    say("counting unread counters")
    await conn.execute("SELECT chat_unread_recount(array_agg(id)) FROM threads")
    say("vacuum analyze")
    await conn.execute("VACUUM (ANALYZE) messages")
    await conn.execute("VACUUM (ANALYZE) threads")
    await conn.execute("VACUUM (ANALYZE) thread_participants")

    for size, history_thread in out.history.items():
        offset = max(1, min(DEEP_PAGE_AFTER, size - 100))
        row = await conn.fetchrow(
            "SELECT created_at, id FROM messages WHERE thread_id = $1 "
            "ORDER BY created_at DESC, id DESC OFFSET $2 LIMIT 1",
            uuid.UUID(history_thread),
            offset - 1,
        )
        assert row is not None
        out.deep_tokens[size] = PageCodec(PageKind.HISTORY, TIME_ID).encode(
            (row["created_at"], row["id"]), {"thread": history_thread}
        )
    return out
