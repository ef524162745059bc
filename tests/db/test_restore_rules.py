"""Restore after the world moved on: deleted authors and participants, a new direct thread.

The rules (db/README.md, "Restoring after the world moved on") are the live
rules: each test builds the same thread twice, archives one, changes the world,
restores, and compares the restored thread with its live twin.
"""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from db.archive import ArchiveError, restore_thread
from services.threads import store as threads
from tests.db import populate
from tests.db.populate import World
from tests.db.test_migrations import run_db_cli

pytestmark = pytest.mark.db

ARCHIVE_TABLES = {
    "archived_threads": "SELECT * FROM archived_threads WHERE id = $1",
    "archived_thread_participants": "SELECT * FROM archived_thread_participants"
    " WHERE thread_id = $1",
    "archived_messages": "SELECT * FROM archived_messages WHERE thread_id = $1",
    "archived_message_attachments": "SELECT a.* FROM archived_message_attachments a"
    " JOIN archived_messages m ON m.id = a.message_id WHERE m.thread_id = $1",
    "archived_message_removals": "SELECT * FROM archived_message_removals WHERE thread_id = $1",
}


async def archived_rows(conn: asyncpg.Connection, thread: UUID) -> dict[str, list[str]]:
    return {
        table: sorted(repr(tuple(r)) for r in await conn.fetch(sql, thread))
        for table, sql in ARCHIVE_TABLES.items()
    }


async def shape(conn: asyncpg.Connection, world: World, thread: UUID) -> dict[str, Any]:
    """A live thread as its readers see it, with message ids replaced by labels
    (twins have the same labels after their "live/" or "arch/" prefix)."""
    label = {row.id: name.split("/", 1)[-1] for name, row in world.messages.items()}
    name = {user: n for n, user in world.users.items()}
    messages = await conn.fetch(
        "SELECT id, user_id, parent_id, status, seq, change_seq,"
        " (SELECT count(*) FROM message_attachments a WHERE a.message_id = m.id) AS attachments"
        " FROM messages m WHERE thread_id = $1 ORDER BY seq",
        thread,
    )
    removals = await conn.fetch(
        "SELECT position, message_id, user_id FROM message_removals"
        " WHERE thread_id = $1 ORDER BY position",
        thread,
    )
    participants = await conn.fetch(
        "SELECT user_id, role FROM thread_participants WHERE thread_id = $1 ORDER BY user_id",
        thread,
    )
    return {
        "last_seq": await conn.fetchval("SELECT last_seq FROM threads WHERE id = $1", thread),
        "messages": [
            (
                label[m["id"]],
                name[m["user_id"]],
                label.get(m["parent_id"]),
                m["status"],
                m["seq"],
                m["change_seq"],
                m["attachments"],
            )
            for m in messages
        ],
        "removals": [(r["position"], label[r["message_id"]], name[r["user_id"]]) for r in removals],
        "participants": sorted((name[p["user_id"]], p["role"]) for p in participants),
    }


class _Sayer:
    """Sends into one twin, labelling messages "<twin>/<label>"."""

    def __init__(self, conn: asyncpg.Connection, world: World, twin: str) -> None:
        self.conn, self.world, self.twin = conn, world, twin

    async def __call__(
        self, label: str, author: str, reply_to: str | None = None, **kw: Any
    ) -> None:
        await populate.send(
            self.conn,
            self.world,
            f"{self.twin}/{label}",
            self.twin,
            author,
            reply_to=f"{self.twin}/{reply_to}" if reply_to else None,
            **kw,
        )


async def twin_groups(conn: asyncpg.Connection, members: dict[str, str]) -> World:
    """Two identical group threads, "live" and "arch", with the same history."""
    world = World()
    for user in members:
        await populate.add_user(conn, world, user)
    for twin in ("live", "arch"):
        await populate.group(conn, world, twin, members)
    for twin in ("live", "arch"):
        say = _Sayer(conn, world, twin)
        await say("a1", "alice", metadata={"topic": "plans"})
        await say("c1", "carol", attachments=2)
        await say("b1", "bob", reply_to="c1")
        await say("c2", "carol", reply_to="a1")
        await say("c3", "carol", reply_to="c1")
        await populate.edit(conn, world, f"{twin}/b1", "b1: on second thought")
        await say("a2", "alice", reply_to="b1", request_id=True)
        await populate.mark_read(conn, world, twin, "bob")
    return world


async def test_deleted_author_and_participant_follow_the_live_rules(database_url: str) -> None:
    conn = await populate.connect(database_url)
    try:
        world = await twin_groups(conn, {"alice": "owner", "bob": "member", "carol": "member"})
        await populate.age(conn, world, "arch")
        assert await populate.archive_aged(conn) == 1
        await populate.delete_user(conn, world, "carol")  # after archival: live twin only

        restored = await restore_thread(conn, world.threads["arch"])

        assert restored.messages == 3  # a1, b1, a2
        assert restored.removed_messages == 3  # c1, c2, c3 leave history ...
        assert restored.orphaned_replies == 1  # ... and bob's reply to c1 loses its parent
        assert restored.dropped_participants == 1  # carol
        assert restored.new_owner is None
        live = await shape(conn, world, world.threads["live"])
        arch = await shape(conn, world, world.threads["arch"])
        assert arch == live  # same messages, positions, removals, participants
        assert [m[0] for m in arch["messages"]] == ["a1", "b1", "a2"]
        # Positions 1-7 were the history (b1's edit at 6); then, as for the live
        # twin, b1 loses its parent at 8 and carol's messages leave at 9, 10, 11.
        assert arch["last_seq"] == 11
        assert arch["messages"][1] == ("b1", "bob", None, "edited", 3, 8, 0)
        assert arch["removals"] == [(9, "c1", "carol"), (10, "c2", "carol"), (11, "c3", "carol")]
        assert all(
            rows == [] for rows in (await archived_rows(conn, world.threads["arch"])).values()
        )
    finally:
        await conn.close()


async def test_a_group_whose_owner_was_deleted_gets_one_as_live_groups_do(
    database_url: str,
) -> None:
    conn = await populate.connect(database_url)
    try:
        world = await twin_groups(conn, {"alice": "owner", "bob": "member", "carol": "admin"})
        await populate.age(conn, world, "arch")
        assert await populate.archive_aged(conn) == 1
        await populate.delete_user(conn, world, "alice")  # the only owner

        restored = await restore_thread(conn, world.threads["arch"])

        assert restored.new_owner == world.users["carol"]  # an admin before a member
        live = await shape(conn, world, world.threads["live"])
        arch = await shape(conn, world, world.threads["arch"])
        assert arch == live
        assert arch["participants"] == [("bob", "member"), ("carol", "owner")]
    finally:
        await conn.close()


async def direct_pair(conn: asyncpg.Connection) -> World:
    world = World()
    for user in ("alice", "bob"):
        await populate.add_user(conn, world, user)
    await populate.direct(conn, world, "dm", "alice", "bob")
    await populate.send(conn, world, "hi", "dm", "alice", attachments=1)
    await populate.send(conn, world, "re", "dm", "bob", reply_to="hi", request_id=True)
    await populate.age(conn, world, "dm")
    assert await populate.archive_aged(conn) == 1
    return world


async def test_a_direct_thread_whose_pair_has_a_new_one_is_refused_intact(
    database_url: str,
) -> None:
    conn = await populate.connect(database_url)
    try:
        world = await direct_pair(conn)
        archived = world.threads["dm"]
        before = await archived_rows(conn, archived)
        async with conn.transaction():
            new, created = await threads.get_or_create_direct(
                conn, world.users["alice"], world.users["bob"]
            )
        assert created

        with pytest.raises(ArchiveError) as refused:
            await restore_thread(conn, archived)
        message = str(refused.value)
        assert f"archived direct thread {archived}" in message
        assert f"have direct thread {new.id} now" in message
        assert "the archive is unchanged" in message
        assert await archived_rows(conn, archived) == before
        assert await conn.fetchval("SELECT count(*) FROM threads WHERE id = $1", archived) == 0

        cli = await asyncio.to_thread(
            run_db_cli, database_url, "restore", "--thread", str(archived)
        )
        assert cli.returncode == 1
        assert cli.stderr.strip().splitlines() == [f"db: error: {message}"]
        assert await archived_rows(conn, archived) == before

        # Once the new thread is gone, the archived one comes back exactly.
        await threads.delete_thread(conn, new.id)
        assert (await restore_thread(conn, archived)).messages == 2
        assert all(rows == [] for rows in (await archived_rows(conn, archived)).values())
    finally:
        await conn.close()


async def test_a_new_direct_thread_committed_during_the_restore_rolls_it_all_back(
    database_url: str,
) -> None:
    """The pair's new thread commits after the restore checked for one: the key's
    unique index refuses, and everything the restore wrote (here: the key it
    rebuilt for a thread that had lost it) rolls back."""
    conn = await populate.connect(database_url)
    other = await populate.connect(database_url)
    try:
        world = await direct_pair(conn)
        archived = world.threads["dm"]
        await conn.execute("UPDATE archived_threads SET direct_key = NULL WHERE id = $1", archived)
        before = await archived_rows(conn, archived)
        racing = other.transaction()
        await racing.start()
        new, _ = await threads.get_or_create_direct(other, world.users["alice"], world.users["bob"])

        restore = asyncio.create_task(restore_thread(conn, archived))
        watcher = await populate.connect(database_url)
        try:
            pid = conn.get_server_pid()
            for _ in range(2000):  # until the restore waits on the new key (at most ~10 s)
                if await watcher.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
                ):
                    break
                await asyncio.sleep(0.005)
            else:
                raise AssertionError("the restore never waited on the new thread's key")
        finally:
            await watcher.close()
        await racing.commit()

        with pytest.raises(ArchiveError, match=f"have direct thread {new.id} now"):
            await restore
        assert await archived_rows(conn, archived) == before  # direct_key still NULL
    finally:
        await other.close()
        await conn.close()


async def test_a_direct_thread_keeps_its_key_when_one_user_was_deleted(database_url: str) -> None:
    conn = await populate.connect(database_url)
    try:
        world = await direct_pair(conn)
        archived = world.threads["dm"]
        key = await conn.fetchval("SELECT direct_key FROM archived_threads WHERE id = $1", archived)
        await populate.delete_user(conn, world, "bob")

        restored = await restore_thread(conn, archived)

        assert (restored.messages, restored.removed_messages) == (1, 1)
        assert restored.dropped_participants == 1 and restored.new_owner is None
        row = await conn.fetchrow(
            "SELECT is_direct, direct_key FROM threads WHERE id = $1", archived
        )
        assert row is not None and (row["is_direct"], row["direct_key"]) == (True, key)
        members = await conn.fetch(
            "SELECT user_id FROM thread_participants WHERE thread_id = $1", archived
        )
        assert [m["user_id"] for m in members] == [world.users["alice"]]
    finally:
        await conn.close()


async def test_a_direct_key_lost_in_a_rollback_comes_back_from_the_pair(
    database_url: str,
) -> None:
    conn = await populate.connect(database_url)
    try:
        world = await direct_pair(conn)
        archived = world.threads["dm"]
        await conn.execute("UPDATE archived_threads SET direct_key = NULL WHERE id = $1", archived)

        await restore_thread(conn, archived)

        low, high = sorted((world.users["alice"], world.users["bob"]))
        assert (
            await conn.fetchval("SELECT direct_key FROM threads WHERE id = $1", archived)
            == f"{low}:{high}"
        )
        async with conn.transaction():
            again, created = await threads.get_or_create_direct(conn, high, low)
        assert (again.id, created) == (archived, False)  # the pair finds its thread
    finally:
        await conn.close()
