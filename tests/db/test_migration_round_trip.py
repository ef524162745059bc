"""Migrations round-trip on real data; a down part that would destroy data refuses.

Every table is filled the way the services fill it (tests/db/populate.py), then
for every version N: `down --to N` (without --allow-data-loss first: it either
loses nothing or refuses and changes nothing), then `up`. What the rollback kept
must come back unchanged, the schema must be the one a fresh `up` builds, and the
services' invariants must hold. The loop runs over load_migrations(), so every
later migration is covered without editing this file.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from db.archive import restore_thread
from db.migrations import MIGRATIONS_DIR, MigrationFileError, load_migrations, parse_migration
from db.runner import MigrationError, Migrator
from services.messages import store as messages
from tests.db import populate
from tests.db.populate import World
from tests.db.test_migrations import catalog_dump, run_db_cli

pytestmark = pytest.mark.db

LATEST = load_migrations()[-1].version


async def applied_version(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


async def schema_of(conn: asyncpg.Connection) -> dict[str, list[tuple[object, ...]]]:
    """The catalog dump, with each column's place among its table's columns rather
    than its attnum: a column dropped and added again comes back last, under a new
    attnum, and that is the only way PostgreSQL can bring it back."""
    dump = await catalog_dump(conn)
    places: dict[str, list[tuple[object, ...]]] = {}
    for row in dump["columns"]:
        places.setdefault(str(row[0]), []).append(row)
    rank = {
        (table, row[1]): place
        for table, rows in places.items()
        for place, row in enumerate(sorted(rows, key=lambda r: int(str(r[-1]))))
    }
    dump["columns"] = [(*row[:-1], rank[(str(row[0]), row[1])]) for row in dump["columns"]]
    return dump


LIVE_AND_ARCHIVED = {
    "threads": "archived_threads",
    "messages": "archived_messages",
    "thread_participants": "archived_thread_participants",
    "message_attachments": "archived_message_attachments",
    "message_removals": "archived_message_removals",
}


async def assert_invariants(conn: asyncpg.Connection) -> None:
    """What the services rely on, checked over every live and archived row."""
    invalid = await conn.fetch(
        "SELECT conname FROM pg_constraint"
        " WHERE connamespace = 'public'::regnamespace AND NOT convalidated"
    )
    assert invalid == [], "constraints left NOT VALID"
    broken = await conn.fetch(
        "SELECT indexrelid::regclass::text AS name FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indrelid"
        " WHERE c.relnamespace = 'public'::regnamespace AND NOT (indisvalid AND indisready)"
    )
    assert broken == [], "invalid indexes (a failed CONCURRENTLY build)"
    # Archival moves rows with `INSERT ... SELECT *`: each archive table has its
    # live table's columns in the same order.
    for live, archived in LIVE_AND_ARCHIVED.items():
        columns = [
            [
                (r["attname"], r["atttypid"])
                for r in await conn.fetch(
                    "SELECT attname, atttypid FROM pg_attribute WHERE attrelid = $1::regclass"
                    " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                    table,
                )
            ]
            for table in (live, archived)
        ]
        assert columns[0] == columns[1], live
    # Positions, live and archived: unique per thread, a message's change never
    # before its creation, no position beyond the thread's counter, removals at
    # positions of their own.
    for messages_table, threads_table, removals_table in (
        ("messages", "threads", "message_removals"),
        ("archived_messages", "archived_threads", "archived_message_removals"),
    ):
        problems = await conn.fetch(
            f"""
            WITH positions AS (
                SELECT thread_id, seq AS p FROM {messages_table}
                UNION ALL
                SELECT thread_id, change_seq FROM {messages_table} WHERE change_seq <> seq
                UNION ALL
                SELECT thread_id, position FROM {removals_table}
            )
            SELECT 'duplicate position' AS problem, thread_id::text FROM positions
            GROUP BY thread_id, p HAVING count(*) > 1
            UNION ALL
            SELECT 'beyond last_seq', p.thread_id::text FROM positions p
            JOIN {threads_table} t ON t.id = p.thread_id WHERE p.p > t.last_seq OR p.p < 1
            UNION ALL
            SELECT 'no position', id::text FROM {messages_table}
            WHERE seq IS NULL OR change_seq IS NULL OR change_seq < seq
            """
        )
        assert problems == [], (messages_table, [tuple(r) for r in problems])
    # Unread counters (0014, db/functions/unread.sql) are the definition's counts;
    # archived rows hold 0.
    if await conn.fetchval(
        "SELECT 1 FROM pg_attribute WHERE attrelid = 'threads'::regclass"
        " AND attname = 'message_count' AND NOT attisdropped"
    ):
        miscounted = await conn.fetch(
            """
            SELECT p.thread_id, p.user_id FROM thread_participants p
            JOIN threads t ON t.id = p.thread_id
            WHERE t.message_count - p.read_count <> (
                SELECT count(*) FROM messages m
                WHERE m.thread_id = p.thread_id
                  AND m.created_at > coalesce(p.last_read_at, '-infinity')
                  AND m.user_id <> p.user_id AND m.status <> 'deleted')
            UNION ALL
            SELECT t.id, NULL FROM threads t WHERE t.message_count <> (
                SELECT count(*) FROM messages m WHERE m.thread_id = t.id AND m.status <> 'deleted')
            UNION ALL
            SELECT id, NULL FROM archived_threads WHERE message_count <> 0
            UNION ALL
            SELECT thread_id, user_id FROM archived_thread_participants WHERE read_count <> 0
            """
        )
        assert miscounted == [], [tuple(r) for r in miscounted]
    # A direct thread's key is its two participants' pair (services/threads/store.py),
    # or, when it no longer has two, something that is no pair.
    # A deleted user's direct thread keeps the pair it had, or (after a rollback
    # lost it) gets its own id.
    keys = await conn.fetch(
        """
        SELECT t.id, t.direct_key,
               ARRAY(SELECT p.user_id::text FROM thread_participants p
                     WHERE p.thread_id = t.id ORDER BY p.user_id) AS members
        FROM threads t WHERE t.is_direct
        """
    )
    for row in keys:
        members = list(row["members"])
        if len(members) == 2:
            assert row["direct_key"] == ":".join(members), dict(row)
        else:
            assert row["direct_key"] == str(row["id"]) or (
                row["direct_key"].count(":") == 1
                and all(member in row["direct_key"].split(":") for member in members)
            ), dict(row)


async def assert_usable(conn: asyncpg.Connection) -> None:
    """Every live thread takes a message, every archived thread comes back (rolled back)."""
    live = await conn.fetch(
        "SELECT t.id, p.user_id FROM threads t"
        " JOIN LATERAL (SELECT user_id FROM thread_participants WHERE thread_id = t.id"
        "               ORDER BY user_id LIMIT 1) p ON true"
    )
    archived = [r["id"] for r in await conn.fetch("SELECT id FROM archived_threads")]
    outer = conn.transaction()
    await outer.start()
    try:
        for row in live:
            outcome, _ = await messages.send(
                conn,
                thread_id=row["id"],
                user_id=row["user_id"],
                content="after the round trip",
                parent_id=None,
                metadata=None,
                request_id=None,
                attachments=[],
            )
            assert outcome in ("created", "inactive"), outcome
        for thread_id in archived:
            await restore_thread(conn, thread_id)
        await assert_invariants(conn)
    finally:
        await outer.rollback()


async def round_trip(conn: asyncpg.Connection, n: int) -> set[int]:
    """`down --to n` one step at a time, each without the flag first, then `up`.

    A step either loses nothing, or refuses (naming its file and the flag) and
    changes nothing, and is then run with the flag. Every step leaves what it
    does not drop unchanged. After `up` the schema is the one a fresh `up` builds,
    every value comes back except those dropped by flagged steps, and the
    services' invariants hold. Returns the versions that refused.
    """
    before, schema = await populate.snapshot(conn), await schema_of(conn)
    migrator = Migrator(conn, load_migrations())
    refused: set[int] = set()
    may_differ: set[tuple[str, str]] = set()  # (table, column) dropped by flagged steps
    current = before
    while (version := await applied_version(conn)) > n:
        try:
            await migrator.down(version - 1)
        except MigrationError as exc:
            assert f"{version:04d}_" in str(exc), str(exc)  # the runner names the file
            assert "--allow-data-loss" in str(exc), str(exc)
            assert await applied_version(conn) == version
            assert populate.differences(current, await populate.snapshot(conn)) == []
            refused.add(version)
            await migrator.down(version - 1, allow_data_loss=True)
        step = await populate.snapshot(conn)
        # Even with the flag, a step drops only what its migration added.
        assert populate.differences(current, step) == [], f"rolling back {version:04d}"
        if version in refused:
            # What it dropped may come back otherwise; a dropped table, with
            # every column it ever had.
            may_differ |= {
                (table, column)
                for table, shape in before.items()
                if table in current
                for column in shape.columns
                if table not in step
                or (column in current[table].columns and column not in step[table].columns)
            }
        current = step

    await migrator.up()
    assert await schema_of(conn) == schema
    after = await populate.snapshot(conn)
    assert populate.differences(before, after, ignore=may_differ) == []
    await assert_invariants(conn)
    await assert_usable(conn)
    return refused


async def test_down_then_up_on_every_table_filled(database_url: str) -> None:
    """Every table filled (archives included), then `down --to N` and `up` for every N.

    Each round starts from fresh rows in every table (added to what earlier rounds
    left, so the losses of one round cannot hide the next's).
    """
    conn = await populate.connect(database_url)
    try:
        for n in range(LATEST - 1, -1, -1):
            await populate.fill_everything(conn)
            refused = await round_trip(conn, n)
            # What these rows hold that 0013, 0008, 0005, 0004, 0003 and 0001
            # cannot rebuild: user stream events; removal records; archived
            # participants and attachments; request_ids and positions with gaps;
            # keys of archived direct threads and of one whose user was deleted; rows.
            assert {1, 3, 4, 5, 8, 13} & set(range(n + 1, LATEST + 1)) <= refused, (n, refused)
    finally:
        await conn.close()


async def test_rebuildable_data_round_trips_without_the_flag(database_url: str) -> None:
    """Positions and direct keys are rebuilt exactly: no version down to 0001 refuses
    but 0013, whose user stream log (written by every change) cannot be rebuilt."""
    conn = await populate.connect(database_url)
    try:
        await populate.fill_rebuildable(conn)
        for n in range(LATEST - 1, 0, -1):
            assert await round_trip(conn, n) <= {13}, n
        # Below 0001 there are no tables: their rows are the loss.
        assert await round_trip(conn, 0) - {13} == {1}
        assert await conn.fetchval("SELECT count(*) FROM users") == 0
    finally:
        await conn.close()


Lossy = Callable[[asyncpg.Connection, World], Awaitable[None]]


async def _request_id(conn: asyncpg.Connection, world: World) -> None:
    await populate.send(conn, world, "idempotent", "launch", "bob", request_id=True)


async def _edited_twice(conn: asyncpg.Connection, world: World) -> None:
    await populate.edit(conn, world, "dm1", "dm1: v2")
    await populate.edit(conn, world, "dm1", "dm1: v3")


async def _deleted_author(conn: asyncpg.Connection, world: World) -> None:
    await populate.delete_user(conn, world, "erin")


async def _archived_group(conn: asyncpg.Connection, world: World) -> None:
    await populate.age(conn, world, "launch")
    assert await populate.archive_aged(conn) == 1


async def _archived_direct(conn: asyncpg.Connection, world: World) -> None:
    await populate.age(conn, world, "alice-bob")
    assert await populate.archive_aged(conn) == 1


# (what makes the loss, the migration whose down must refuse, words of its message)
GUARDS: dict[str, tuple[Lossy, int, str]] = {
    "removal records": (_deleted_author, 8, "removal record"),
    "archived participants and attachments": (_archived_group, 5, "participant(s)"),
    "a request_id": (_request_id, 4, "1 request_id"),
    "a message edited twice": (_edited_twice, 4, "stream positions"),
    "a removal's position": (_deleted_author, 4, "stream positions"),
    "the key of a direct thread with a deleted user": (_deleted_author, 3, "1 live"),
    "the key of an archived direct thread": (_archived_direct, 3, "1 archived"),
    "rows": (_request_id, 1, "rows"),
}


@pytest.mark.parametrize("case", GUARDS)
async def test_each_down_part_refuses_its_own_loss(database_url: str, case: str) -> None:
    lossy, version, words = GUARDS[case]
    conn = await populate.connect(database_url)
    try:
        world = await populate.fill_rebuildable(conn)
        await lossy(conn, world)
        migrator = Migrator(conn, load_migrations())
        # The later migrations go first (with the flag: the loss may be theirs too) ...
        await migrator.down(version, allow_data_loss=True)
        before = await populate.snapshot(conn)
        # ... then this one refuses, naming what it would drop, and changes nothing.
        with pytest.raises(MigrationError, match=f"rolling back {version:04d}") as refused:
            await migrator.down(version - 1)
        assert words in str(refused.value) and "--allow-data-loss" in str(refused.value)
        assert await applied_version(conn) == version
        assert populate.differences(before, await populate.snapshot(conn)) == []
        await migrator.down(version - 1, allow_data_loss=True)
        assert await applied_version(conn) == version - 1
        await migrator.up()
        await assert_invariants(conn)
        await assert_usable(conn)
    finally:
        await conn.close()


# A down part guarded the documented way (db/README.md).
_GUARDED = """\
-- migrate:up
CREATE TABLE probe_rows (id int);
-- migrate:down
DO $$
DECLARE v_rows bigint;
BEGIN
    SELECT count(*) INTO v_rows FROM probe_rows;
    IF v_rows > 0 AND current_setting('chat.allow_data_loss', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'rolling back would drop probe_rows (% rows); '
            'rerun with --allow-data-loss to drop them', v_rows;
    END IF;
END $$;
DROP TABLE probe_rows;
"""


async def test_allow_data_loss_reaches_the_down_part(
    empty_database_url: str, tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    version = len(load_migrations()) + 1
    (migrations / f"{version:04d}_guarded.sql").write_text(_GUARDED)
    dir_args = ("--migrations-dir", str(migrations))
    conn = await asyncpg.connect(empty_database_url)
    try:
        migrator = Migrator(conn, load_migrations(migrations))
        await migrator.up()
        await conn.execute("INSERT INTO probe_rows VALUES (1), (2)")

        with pytest.raises(MigrationError, match=r"would drop probe_rows \(2 rows\)"):
            await migrator.down(version - 1)
        refused = await asyncio.to_thread(
            run_db_cli, empty_database_url, *dir_args, "down", "--to", str(version - 1)
        )
        assert refused.returncode == 1
        assert "--allow-data-loss" in refused.stderr and "Traceback" not in refused.stderr
        assert await conn.fetchval("SELECT count(*) FROM probe_rows") == 2
        # The setting never leaks into the session: 'off' outside a flagged down.
        assert await conn.fetchval("SELECT current_setting('chat.allow_data_loss', true)") in (
            None,
            "",
            "off",
        )

        allowed = await asyncio.to_thread(
            run_db_cli,
            empty_database_url,
            *dir_args,
            "down",
            "--to",
            str(version - 1),
            "--allow-data-loss",
        )
        assert allowed.returncode == 0, allowed.stderr
        assert await conn.fetchval("SELECT to_regclass('probe_rows')") is None
    finally:
        await conn.close()


AMENDED = [m for m in load_migrations() if m.supersedes]


async def test_databases_that_applied_an_amended_file_accept_it(database_url: str) -> None:
    """The amended files (issue 14) do not break databases that applied their earlier text."""
    assert {m.version for m in AMENDED} >= {1, 3, 4, 5, 8}
    conn = await asyncpg.connect(database_url)
    try:
        for migration in AMENDED:
            await conn.execute(
                "UPDATE schema_migrations SET checksum = $2 WHERE version = $1",
                migration.version,
                min(migration.supersedes),
            )
        migrator = Migrator(conn, load_migrations())
        assert await migrator.problems() == []
        assert await migrator.up() == []
        ok = await asyncio.to_thread(run_db_cli, database_url, "validate")
        assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stderr
        # Any other text is still refused.
        await conn.execute("UPDATE schema_migrations SET checksum = $1 WHERE version = 4", "0" * 64)
        bad = await asyncio.to_thread(run_db_cli, database_url, "validate")
        assert bad.returncode == 1
        assert "0004_messages_stream_and_idempotency.sql was changed" in bad.stderr
    finally:
        await conn.close()


def test_a_malformed_supersedes_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "0001_bad.sql"
    path.write_text("-- migrate:supersedes abc\n-- migrate:up\nSELECT 1;\n-- migrate:down\n")
    with pytest.raises(MigrationFileError, match="migrate:supersedes"):
        parse_migration(path)
