"""Realistic rows in every table, written the way the services write them.

Users, group and direct threads, participants with read marks and roles,
messages with replies, metadata, attachments, edits and soft deletes go through
the services' stores (so they carry the positions, request digests and side
effects the services give them); archives go through db/archive.py.

`fill_rebuildable` writes only what every down part can give back (no
request_id, each message changed at most once, no deleted user, nothing
archived); `fill_everything` adds what cannot be rebuilt, until every table has
rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from db.archive import archive_older_than
from services.messages import store as messages
from services.threads import store as threads
from services.users import store as users

Row = dict[str, Any]


async def connect(url: str) -> asyncpg.Connection:
    """A connection with the services' jsonb codec and no statement cache (the
    schema changes under it)."""
    conn: asyncpg.Connection = await asyncpg.connect(url, statement_cache_size=0)
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog", format="text"
    )
    return conn


@dataclass
class World:
    users: dict[str, UUID] = field(default_factory=dict)
    threads: dict[str, UUID] = field(default_factory=dict)
    messages: dict[str, messages.MessageRow] = field(default_factory=dict)


async def add_user(
    conn: asyncpg.Connection, world: World, name: str, *, active: bool = True
) -> UUID:
    user_id: UUID = await conn.fetchval(
        "INSERT INTO users (email, username, first_name, last_name, profile_image, is_active,"
        " last_login_at) VALUES ($1, $2, $3, $4, $5, $6, now() - interval '2 hours')"
        " RETURNING id",
        f"{name}.{uuid4().hex[:6]}@example.com",
        f"{name}_{uuid4().hex[:6]}",
        name.capitalize(),
        "Tester",
        f"https://cdn.example.com/{name}.png",
        active,
    )
    world.users[name] = user_id
    return user_id


async def send(
    conn: asyncpg.Connection,
    world: World,
    label: str,
    thread: str,
    author: str,
    *,
    reply_to: str | None = None,
    request_id: bool = False,
    attachments: int = 0,
    metadata: dict[str, Any] | None = None,
) -> messages.MessageRow:
    outcome, row = await messages.send(
        conn,
        thread_id=world.threads[thread],
        user_id=world.users[author],
        content=f"{label}: hello from {author}",
        parent_id=world.messages[reply_to].id if reply_to else None,
        metadata=metadata,
        request_id=uuid4() if request_id else None,
        attachments=[
            messages.NewAttachment(
                url=f"https://files.example.com/{label}/{i}.png",
                type="image/png",
                name=f"{label}-{i}.png",
                size=1024 * (i + 1),
                metadata={"width": 640, "height": 480},
            )
            for i in range(attachments)
        ],
    )
    assert outcome == "created" and row is not None, outcome
    world.messages[label] = row
    return row


async def edit(conn: asyncpg.Connection, world: World, label: str, content: str) -> None:
    async with conn.transaction():
        await messages.lock_thread_of(conn, world.messages[label].id)
        edited = await messages.edit(
            conn, world.messages[label], content=content, metadata=(True, {"edited": True})
        )
    assert edited is not None
    world.messages[label] = edited


async def tombstone(conn: asyncpg.Connection, world: World, label: str) -> None:
    async with conn.transaction():
        await messages.lock_thread_of(conn, world.messages[label].id)
        world.messages[label] = await messages.tombstone(conn, world.messages[label])


async def attach(conn: asyncpg.Connection, world: World, label: str) -> None:
    async with conn.transaction():
        await messages.lock_thread_of(conn, world.messages[label].id)
        await messages.add_attachment(
            conn,
            world.messages[label],
            messages.NewAttachment(
                url=f"https://files.example.com/{label}/late.pdf",
                type="application/pdf",
                name="late.pdf",
                size=99_000,
                metadata=None,
            ),
        )


async def group(conn: asyncpg.Connection, world: World, name: str, members: dict[str, str]) -> UUID:
    thread, _ = await threads.create_group(
        conn, name, {world.users[user]: role for user, role in members.items()}
    )
    world.threads[name] = thread.id
    return thread.id


async def direct(conn: asyncpg.Connection, world: World, name: str, one: str, two: str) -> UUID:
    async with conn.transaction():
        thread, created = await threads.get_or_create_direct(
            conn, world.users[one], world.users[two]
        )
    assert created
    world.threads[name] = thread.id
    return thread.id


async def delete_user(conn: asyncpg.Connection, world: World, name: str) -> None:
    async with conn.transaction():
        await users.delete_user(conn, world.users[name])


async def mark_read(conn: asyncpg.Connection, world: World, thread: str, user: str) -> None:
    await threads.mark_read(conn, world.threads[thread], world.users[user], None)


async def age(conn: asyncpg.Connection, world: World, *names: str) -> None:
    """Make threads look inactive for 200 days (so `archive --older-than 90d` takes them)."""
    await conn.execute(
        "UPDATE threads SET created_at = created_at - interval '200 days',"
        " last_message_at = last_message_at - interval '200 days' WHERE id = ANY ($1::uuid[])",
        [world.threads[n] for n in names],
    )


async def archive_aged(conn: asyncpg.Connection) -> int:
    cutoff: datetime = await conn.fetchval("SELECT now() - interval '90 days'")
    return (await archive_older_than(conn, cutoff)).threads


async def fill_rebuildable(conn: asyncpg.Connection) -> World:
    """Rows every down part can give back exactly (see the module docstring)."""
    world = World()
    for name in ("alice", "bob", "carol", "dave", "erin"):
        await add_user(conn, world, name)
    await add_user(conn, world, "frank", active=False)
    await group(
        conn,
        world,
        "launch",
        {"alice": "owner", "bob": "admin", "carol": "member", "erin": "member", "frank": "member"},
    )
    await direct(conn, world, "alice-bob", "alice", "bob")
    await direct(conn, world, "carol-erin", "carol", "erin")
    await group(conn, world, "quiet", {"dave": "owner"})  # no message at all

    await send(conn, world, "kickoff", "launch", "alice", attachments=2, metadata={"pin": True})
    await send(conn, world, "ack", "launch", "bob", reply_to="kickoff")
    await send(conn, world, "erin-idea", "launch", "erin", metadata={"tags": ["idea"]})
    await send(conn, world, "carol-reply", "launch", "carol", reply_to="erin-idea")
    await send(conn, world, "typo", "launch", "carol")
    await edit(conn, world, "ack", "ack: sounds good")
    await tombstone(conn, world, "typo")
    await attach(conn, world, "kickoff")
    await send(conn, world, "after", "launch", "alice", reply_to="ack")
    await send(conn, world, "dm1", "alice-bob", "alice")
    await send(conn, world, "dm2", "alice-bob", "bob", reply_to="dm1", attachments=1)
    await send(conn, world, "ce1", "carol-erin", "erin")
    await send(conn, world, "ce2", "carol-erin", "carol", reply_to="ce1")
    await mark_read(conn, world, "launch", "bob")
    await mark_read(conn, world, "alice-bob", "alice")
    return world


async def fill_everything(conn: asyncpg.Connection) -> World:
    """`fill_rebuildable`, then what no down part can rebuild, until every table has rows."""
    world = await fill_rebuildable(conn)
    await add_user(conn, world, "grace")
    await add_user(conn, world, "heidi")
    await send(conn, world, "retry-safe", "launch", "bob", request_id=True, attachments=1)
    await edit(conn, world, "erin-idea", "erin-idea: v2")
    await edit(conn, world, "erin-idea", "erin-idea: v3")  # a gap in the positions
    await send(conn, world, "dm3", "alice-bob", "bob", request_id=True)

    # Archived: a group (participants, replies, attachments, a deleted author's
    # removal records) and a direct thread.
    await group(conn, world, "old-plans", {"alice": "owner", "grace": "member", "dave": "admin"})
    await send(conn, world, "op1", "old-plans", "alice", attachments=1, metadata={"v": 1})
    await send(conn, world, "op2", "old-plans", "grace", reply_to="op1", request_id=True)
    await send(conn, world, "op3", "old-plans", "dave", reply_to="op2")
    await edit(conn, world, "op1", "op1: final")
    await mark_read(conn, world, "old-plans", "dave")
    await direct(conn, world, "dave-heidi", "dave", "heidi")
    await send(conn, world, "dh1", "dave-heidi", "heidi", attachments=1)
    await delete_user(conn, world, "grace")  # removal records in old-plans
    await delete_user(conn, world, "erin")  # removal records in launch; carol-erin loses erin
    await age(conn, world, "old-plans", "dave-heidi")
    assert await archive_aged(conn) == 2

    if await conn.fetchval("SELECT to_regclass('user_identity_conflicts') IS NOT NULL"):
        # Migration 0009's report of identities it could not bring to form.
        await conn.execute(
            "INSERT INTO user_identity_conflicts (user_id, field, value, normal_form, reason,"
            " conflicting_user_id) VALUES ($1, 'email', '\u212aate@example.com',"
            " 'kate@example.com', 'collision', $2)",
            world.users["heidi"],
            world.users["dave"],
        )
    empty = [
        table
        for table in await tables(conn)
        if not await conn.fetchval(f'SELECT EXISTS (SELECT 1 FROM "{table}")')
    ]
    assert not empty, f"fill_everything leaves {empty} empty: teach it to fill them"
    return world


async def tables(conn: asyncpg.Connection) -> list[str]:
    """The chat tables (every table in public but the runner's own)."""
    return [
        r["tablename"]
        for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename NOT IN ('schema_migrations', 'schema_functions') ORDER BY tablename"
        )
    ]


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[Row, ...]

    def projected(self, columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
        return sorted((tuple(row[c] for c in columns) for row in self.rows), key=repr)


Snapshot = dict[str, Table]


async def snapshot(conn: asyncpg.Connection) -> Snapshot:
    """Every row of every chat table, with the columns each table has now."""
    result = {}
    for table in await tables(conn):
        columns = tuple(
            r["attname"]
            for r in await conn.fetch(
                "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass"
                " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                table,
            )
        )
        rows = tuple(dict(r) for r in await conn.fetch(f'SELECT * FROM "{table}"'))
        result[table] = Table(columns, rows)
    return result


def differences(
    before: Snapshot,
    after: Snapshot,
    *,
    ignore: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset(),
) -> list[str]:
    """Where `after` does not hold what `before` held, on the tables and columns
    `after` has (so a snapshot taken after a rollback is compared on what the
    rollback left), but for the (table, column) pairs in `ignore`."""
    found = []
    for table, shape in after.items():
        columns = tuple(c for c in shape.columns if (table, c) not in ignore)
        if not columns:
            continue
        if table not in before:
            found.append(f"{table}: new")
            continue
        missing = [c for c in columns if c not in before[table].columns]
        if missing:
            found.append(f"{table}: new columns {missing}")
            continue
        old, new = before[table].projected(columns), after[table].projected(columns)
        if old != new:
            lost = [r for r in old if r not in new][:3]
            gained = [r for r in new if r not in old][:3]
            found.append(f"{table} {columns}: lost {lost}, gained {gained}")
    return found
