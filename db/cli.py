"""`python -m db`: up, down --to VERSION, status, validate, stats, archive, restore, maintain.

`up` also applies the server-side function files (db/functions) that changed.

DATABASE_URL names the server; when it is unset the embedded PostgreSQL of
`make run` (data in EMBEDDED_PGDATA) is used. Failures print one line and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import asyncpg

from db.archive import (
    DEFAULT_BATCH_MESSAGES,
    ArchiveError,
    ArchiveProgress,
    archive_older_than,
    count_archivable,
    restore_thread,
)
from db.maintenance import DEFAULT_BLOAT_THRESHOLD, DEFAULT_MIN_INDEX_BYTES, maintain
from db.migrations import (
    FUNCTIONS_DIR,
    MIGRATIONS_DIR,
    FunctionFile,
    Migration,
    MigrationFileError,
    load_function_files,
    load_migrations,
)
from db.runner import MigrationError, Migrator
from db.stats import collect_stats, format_stats
from services.common.embedded import EmbeddedPostgres
from services.common.pool import CONNECT_FAILURES, connect, describe_connect_error
from services.common.settings import DatabaseSettings

Command = Callable[[Migrator, argparse.Namespace], Awaitable[int]]


async def _up(migrator: Migrator, args: argparse.Namespace) -> int:
    applied = await migrator.up(args.to)
    for done in applied:
        print(f"applied {_label(done)}")
    if not applied:
        print("database is up to date")
    return 0


async def _down(migrator: Migrator, args: argparse.Namespace) -> int:
    rolled_back = await migrator.down(args.to, allow_data_loss=args.allow_data_loss)
    for migration in rolled_back:
        print(f"rolled back {migration.filename}")
    if not rolled_back:
        print(f"nothing to roll back (already at or below {args.to:04d})")
    return 0


def _label(done: Migration | FunctionFile) -> str:
    return done.filename if isinstance(done, Migration) else f"functions/{done.filename}"


async def _status(migrator: Migrator, args: argparse.Namespace) -> int:
    rows = await migrator.status()
    for row in rows:
        state = f"applied {row.applied_at:%Y-%m-%d %H:%M:%S%z}" if row.applied_at else "pending"
        problem = f"  !! {row.problem}" if row.problem else ""
        print(f"{row.version:04d}  {row.name:<40} {state}{problem}")
    # Function files: "pending" until the next `up` at the latest migration applies them.
    functions = await migrator.function_status()
    for fn in functions:
        state = f"applied {fn.applied_at:%Y-%m-%d %H:%M:%S%z}" if fn.applied_at else "pending"
        problem = f"  !! {fn.problem}" if fn.problem else ""
        print(f"fn    {'functions/' + fn.file:<40} {state}{problem}")
    return 1 if any(row.problem for row in rows) or any(fn.problem for fn in functions) else 0


async def _validate(migrator: Migrator, args: argparse.Namespace) -> int:
    problems = await migrator.problems()
    problems += [fn.problem for fn in await migrator.function_status() if fn.problem]
    for problem in problems:
        print(f"db: invalid: {problem}", file=sys.stderr)
    if not problems:
        applied = len(await migrator.applied())
        functions = len(await migrator.applied_functions())
        print(
            f"ok: {applied} applied migration(s) and {functions} applied function file(s) "
            "match their files"
        )
    return 1 if problems else 0


async def _stats(migrator: Migrator, args: argparse.Namespace) -> int:
    print(format_stats(await collect_stats(migrator.connection)))
    return 0


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """`90d`, `12h`, `2w`, ... as a timedelta."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError("expected a number and a unit: 30s, 15m, 12h, 90d, 2w")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


async def _archive(migrator: Migrator, args: argparse.Namespace) -> int:
    conn = migrator.connection
    cutoff = await conn.fetchval("SELECT now() - $1::interval", args.older_than)
    if args.dry_run:
        threads, messages = await count_archivable(conn, cutoff)
        print(
            f"dry run: would archive {threads} thread(s) with {messages} message(s) "
            f"inactive since {cutoff:%Y-%m-%d %H:%M:%S%z}"
        )
        return 0

    def report(progress: ArchiveProgress) -> None:
        print(
            f"batch {progress.batches}: {progress.threads} thread(s), "
            f"{progress.messages} message(s) archived so far",
            flush=True,
        )

    done = await archive_older_than(conn, cutoff, batch_messages=args.batch, on_batch=report)
    print(
        f"archived {done.threads} thread(s) with {done.messages} message(s) "
        f"in {done.batches} batch(es)"
    )
    return 0


async def _restore(migrator: Migrator, args: argparse.Namespace) -> int:
    try:
        restored = await restore_thread(migrator.connection, args.thread)
    except ArchiveError as exc:
        raise MigrationError(str(exc)) from exc
    print(f"restored thread {args.thread} with {restored.messages} message(s)")
    if restored.removed_messages:
        print(
            f"  {restored.removed_messages} message(s) by deleted users left its history "
            f"(removal records), {restored.orphaned_replies} repl(ies) lost their parent"
        )
    if restored.dropped_participants:
        print(f"  {restored.dropped_participants} deleted participant(s) dropped")
    if restored.new_owner is not None:
        print(f"  no active owner was left: {restored.new_owner} is now an owner")
    return 0


async def _maintain(migrator: Migrator, args: argparse.Namespace) -> int:
    report = await maintain(
        migrator.connection,
        threshold=args.bloat_threshold,
        min_index_bytes=args.min_index_bytes,
        dry_run=args.dry_run,
        say=lambda line: print(line, flush=True),
    )
    print("index bloat estimates (table, index, bytes, estimated waste)")
    for item in report.bloat:
        print(f"  {item.table:<30} {item.index:<44} {item.actual_bytes:>12} {item.ratio:>6.0%}")
    print(f"rebuilt {len(report.rebuilt)} index(es)" + (" (dry run)" if args.dry_run else ""))
    return 0


COMMANDS: dict[str, Command] = {
    "up": _up,
    "down": _down,
    "status": _status,
    "validate": _validate,
    "stats": _stats,
    "archive": _archive,
    "restore": _restore,
    "maintain": _maintain,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m db", description=__doc__)
    parser.add_argument(
        "--migrations-dir",
        type=Path,
        default=MIGRATIONS_DIR,
        help="where the NNNN_name.sql files are (default: db/migrations)",
    )
    parser.add_argument(
        "--functions-dir",
        type=Path,
        default=FUNCTIONS_DIR,
        help="where the function files are (default: db/functions)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="apply pending migrations (to the latest by default)")
    up.add_argument("--to", type=int, default=None, help="stop after this version")
    down = sub.add_parser("down", help="roll back migrations newer than --to")
    down.add_argument("--to", type=int, required=True, help="version to keep; 0 removes all")
    down.add_argument(
        "--allow-data-loss",
        action="store_true",
        help="let down parts drop rows and values they cannot rebuild (they refuse otherwise)",
    )
    sub.add_parser("status", help="list migrations and function files, and whether applied")
    sub.add_parser(
        "validate", help="check applied migrations and function files against the database"
    )
    sub.add_parser("stats", help="index usage, cache hit ratio, connections, sizes, slow queries")
    archive = sub.add_parser("archive", help="move threads inactive for a while to the archive")
    archive.add_argument("--older-than", type=parse_age, required=True, help="e.g. 90d, 12h")
    archive.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH_MESSAGES,
        help="messages per transaction (whole threads; at least one thread per batch)",
    )
    archive.add_argument("--dry-run", action="store_true", help="only count what would move")
    maintenance = sub.add_parser("maintain", help="VACUUM (ANALYZE), bloat report, REINDEX")
    maintenance.add_argument(
        "--bloat-threshold",
        type=float,
        default=DEFAULT_BLOAT_THRESHOLD,
        help="rebuild indexes with at least this estimated waste (0..1, default 0.3)",
    )
    maintenance.add_argument(
        "--min-index-bytes",
        type=int,
        default=DEFAULT_MIN_INDEX_BYTES,
        help="never rebuild indexes smaller than this (default 1 MiB)",
    )
    maintenance.add_argument("--dry-run", action="store_true", help="report only")
    restore = sub.add_parser("restore", help="bring an archived thread back exactly")
    restore.add_argument("--thread", type=UUID, required=True, help="the thread's id")
    return parser


async def run(args: argparse.Namespace, settings: DatabaseSettings) -> int:
    migrations = load_migrations(args.migrations_dir)
    functions = load_function_files(args.functions_dir)
    try:
        conn = await connect(settings, application_name="chat-migrate")
    except CONNECT_FAILURES as exc:
        raise MigrationError(describe_connect_error(exc)) from exc
    try:
        return await COMMANDS[args.command](Migrator(conn, migrations, functions=functions), args)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="db: %(message)s", stream=sys.stderr)
    settings = DatabaseSettings()
    embedded = None
    try:
        if settings.database_url is None:
            embedded = EmbeddedPostgres(settings.embedded_pgdata)
            settings = settings.with_url(embedded.start())
        return asyncio.run(run(args, settings))
    except (MigrationError, MigrationFileError) as exc:
        print(f"db: error: {exc}", file=sys.stderr)
        return 1
    except asyncpg.PostgresError as exc:  # e.g. archive before its migration is applied
        print(f"db: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if embedded is not None:
            embedded.stop()
