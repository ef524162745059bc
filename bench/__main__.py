"""`make bench` (`python -m bench [--scale S]`): the hot paths against their ceilings.

Runs against the embedded PostgreSQL (a fresh temporary server) or DATABASE_URL
(a fresh database on it), seeds with COPY, starts the real services as separate
processes and drives them over gRPC from separate client processes. In the same
run it measures the ceilings: an empty RPC on the same server stack, the same SQL
straight through asyncpg at the same concurrency, and pgbench -M prepared when
pgbench is on the machine. Prints one table, writes bench/results/*.json and a
PNG chart. Nothing here is a test: no figure is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
from chat.v1 import messages_pb2, messages_pb2_grpc

from bench import report
from bench.load import run_clients, run_subscribers
from bench.seed import Seeded, seed
from db.migrations import load_migrations
from db.runner import Migrator
from devtools.databases import with_database
from devtools.processes import ServiceProcess, start_service_process
from services.common.embedded import EmbeddedPostgres
from services.common.pagination import TIME_ID, PageCodec, PageKind

RESULTS = Path(__file__).resolve().parent / "results"
# ListMessages' page tokens (the seeded deep-page tokens are of this kind).
HISTORY_PAGES = PageCodec(PageKind.HISTORY, TIME_ID)
STREAM_SUBSCRIBERS = 1000
STREAM_RATE = 50  # messages per second while the subscribers listen
STREAM_SECONDS = 10
IDLE_STREAMS = 5000
USER_STREAMS = 1000  # members of one thread, each with a user stream
IDLE_USER_STREAMS = 10_000
# The user streams' log triggers on a send's path (db/functions/events.sql).
LOG_TRIGGERS_ON = (
    "ALTER TABLE messages ENABLE TRIGGER trg_messages_log; "
    "ALTER TABLE thread_participants ENABLE TRIGGER trg_participants_log; "
    "ALTER TABLE thread_participants ENABLE TRIGGER trg_participants_change_log"
)
LOG_TRIGGERS_OFF = LOG_TRIGGERS_ON.replace("ENABLE", "DISABLE")


def say(line: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {line}", flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace, database_url: str, seeded: Seeded) -> None:
        self.args = args
        self.database_url = database_url
        self.seeded = seeded
        self.figures: list[report.Figure] = []
        self.pool = ProcessPoolExecutor(
            max_workers=2, mp_context=multiprocessing.get_context("spawn")
        )

    async def measure(self, spec: dict[str, Any], clients: int) -> tuple[float, float, float]:
        """Throughput, p50 ms, p99 ms of `clients` concurrent callers, split over processes."""
        parts = 2 if clients >= 8 else 1
        spec = {
            **spec,
            "clients": clients // parts,
            "warmup": self.args.warmup,
            "duration": self.args.duration,
            "database_url": self.database_url,
        }
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self.pool, run_clients, spec) for _ in range(parts))
        )
        return report.summarize([x for r in results for x in r], self.args.duration)

    def add(self, figure: report.Figure) -> None:
        self.figures.append(figure)
        ratio = "" if figure.ratio is None else f" ratio {figure.ratio:.2f}"
        say(
            f"{figure.path} [{figure.setting}]: {figure.throughput:,.0f}/s "
            f"p50 {figure.p50_ms:.2f} ms p99 {figure.p99_ms:.2f} ms{ratio}"
        )


async def run(args: argparse.Namespace) -> int:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    embedded = None
    data = None
    admin_url = os.environ.get("DATABASE_URL")
    if not admin_url:
        data = tempfile.mkdtemp(prefix="chat-bench-pg-")
        embedded = EmbeddedPostgres(data)
        admin_url = embedded.start()
    name = f"chat_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    server_version = await admin.fetchval("SHOW server_version")
    await admin.close()
    url = with_database(admin_url, name)
    procs: list[ServiceProcess] = []
    try:
        conn = await asyncpg.connect(url)
        await Migrator(conn, load_migrations()).up()
        started = time.perf_counter()
        seeded = await seed(conn, scale=args.scale, say=say)
        seed_seconds = time.perf_counter() - started
        await conn.close()
        say(f"seeded {seeded.rows:,} messages in {seed_seconds:.0f}s")
        # Every setting at its default, logging included (one INFO line per RPC):
        # the bench measures what a deployment runs. Only the ports differ (free
        # gRPC ports, no /metrics endpoint), see start_service_process.
        threads = await start_service_process("threads", url)
        messages = [await start_service_process("messages", url) for _ in range(2)]
        empty = await start_service_process("users", url, module="bench.empty_server")
        procs = [threads, *messages, empty]
        bench = Bench(args, url, seeded)
        await scenarios(bench, threads, messages, empty)
        idle = await start_service_process("messages", url)
        procs.append(idle)
        await idle_streams(bench, idle)
        await idle_user_streams(bench, idle)
        await pgbench(bench, url)
        meta = {
            "date": stamp,
            "machine": f"{platform.node()} ({os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB), Python {platform.python_version()}",
            "postgres": server_version,
            "scale": args.scale,
            "seeded_messages": seeded.rows,
            "seed_seconds": round(seed_seconds, 1),
            "duration_s": args.duration,
        }
        path = report.write(RESULTS, stamp, meta, bench.figures)
        chart = report.chart(RESULTS, bench.figures)
        print()
        print(f"machine: {meta['machine']}; PostgreSQL {server_version}; {stamp}")
        print(report.table(bench.figures))
        print(f"\nwrote {path}, {RESULTS / 'latest.json'} and {chart}")
        bench.pool.shutdown()
    finally:
        for proc in procs:
            await proc.stop()
        admin = await asyncpg.connect(admin_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        if embedded is not None:
            embedded.stop()
        if data is not None:
            shutil.rmtree(data, ignore_errors=True)
    return 0


async def scenarios(
    bench: Bench, threads: ServiceProcess, messages: list[ServiceProcess], empty: ServiceProcess
) -> None:
    s = bench.seeded
    empty_thr, empty_p50, empty_p99 = await bench.measure(
        {"kind": "empty", "address": empty.address}, 32
    )
    bench.add(
        report.Figure("empty RPC (gRPC ceiling)", "32 clients", empty_thr, empty_p50, empty_p99)
    )

    hot = [(s.hot_thread, member) for member in s.hot_members]
    for target, targets in (("spread", s.spread), ("hot thread", hot)):
        for clients in (1, 8, 32):
            sql = await bench.measure({"kind": "sql_send", "targets": targets}, clients)
            bench.add(report.Figure(f"asyncpg send SQL ({target})", f"{clients} clients", *sql))
            thr, p50, p99 = await bench.measure(
                {"kind": "send", "address": messages[0].address, "targets": targets}, clients
            )
            bench.add(
                report.Figure(
                    f"SendMessage {target}",
                    f"{clients} clients",
                    thr,
                    p50,
                    p99,
                    ceiling="asyncpg send SQL, same clients",
                    ratio=thr / sql[0] if sql[0] else None,
                )
            )

    for size, thread in sorted(s.history.items()):
        for page, token in (("first page", ""), ("deep page", s.deep_tokens[size])):
            position = None
            if token:
                position = HISTORY_PAGES.decode(token, {"thread": thread})
            sql = await bench.measure(
                {"kind": "sql_list", "thread": thread, "position": position}, 8
            )
            thr, p50, p99 = await bench.measure(
                {
                    "kind": "history",
                    "address": messages[0].address,
                    "thread": thread,
                    "token": token,
                },
                8,
            )
            bench.add(
                report.Figure(
                    f"ListMessages {page}",
                    f"{size:,} messages",
                    thr,
                    p50,
                    p99,
                    ceiling=f"asyncpg page SQL p50 {sql[1]:.2f} ms",
                    ratio=p50 / sql[1] if sql[1] else None,
                    note="ratio = p50 / asyncpg p50",
                )
            )

    for kind, path in (("inbox", "ListThreads (page of 50)"), ("unread", "GetUnreadCount")):
        thr, p50, p99 = await bench.measure(
            {"kind": kind, "address": threads.address, "user": s.inbox_user}, 8
        )
        bench.add(
            report.Figure(
                path,
                f"{s.inbox_threads} threads x {s.inbox_backlog:,} unread, 8 clients",
                thr,
                p50,
                p99,
                ceiling="empty RPC",
                ratio=thr / empty_thr if empty_thr else None,
            )
        )
    await live_streams(bench, messages)


async def members_thread(url: str, members: int, *, tag: str) -> tuple[str, list[str]]:
    """A group thread of `members` new users (the bench's own SQL); its id and theirs."""
    conn = await asyncpg.connect(url)
    try:
        users = [
            str(u)
            for u in await conn.fetchval(
                "WITH made AS (INSERT INTO users (email, username) "
                "SELECT $1 || g || '@bench.io', $1 || g FROM generate_series(1, $2) g "
                "RETURNING id) SELECT array_agg(id) FROM made",
                tag,
                members,
            )
        ]
        thread = await conn.fetchval(
            "INSERT INTO threads (name) VALUES ($1) RETURNING id", f"{tag} thread"
        )
        await conn.execute(
            "INSERT INTO thread_participants (thread_id, user_id, role) "
            "SELECT $1, u, CASE WHEN n = 1 THEN 'owner' ELSE 'member' END "
            "FROM unnest($2::uuid[]) WITH ORDINALITY AS x (u, n)",
            thread,
            [uuid.UUID(u) for u in users],
        )
        return str(thread), users
    finally:
        await conn.close()


async def live_streams(bench: Bench, messages: list[ServiceProcess]) -> None:
    await delivery(
        bench,
        messages,
        "StreamThreadMessages delivery",
        bench.seeded.hot_thread,
        bench.seeded.hot_members[:10],
        [{"thread": bench.seeded.hot_thread, "streams": STREAM_SUBSCRIBERS // 2}] * 2,
    )
    thread, users = await members_thread(bench.database_url, USER_STREAMS, tag="live")
    half = USER_STREAMS // 2
    await delivery(
        bench,
        messages,
        "StreamUserEvents delivery",
        thread,
        users[:10],
        [{"users": users[:half]}, {"users": users[half:]}],
    )


async def delivery(
    bench: Bench,
    messages: list[ServiceProcess],
    path: str,
    thread: str,
    senders: list[str],
    streams: list[dict[str, Any]],
) -> None:
    """Sends STREAM_RATE messages/s into `thread` while `streams` (one spec per
    messages process) listen; the delay from each send's acknowledgement to each
    delivery."""
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    settle, drain = 5.0, 5.0
    until = time.time() + settle + STREAM_SECONDS + drain + 20
    subscribers = [
        ctx.Process(
            target=run_subscribers,
            args=(
                {**spec, "address": proc.address, "settle": settle, "until": until},
                ready,
                results,
            ),
        )
        for proc, spec in zip(messages, streams, strict=True)
    ]
    for proc in subscribers:
        proc.start()
    for _ in subscribers:
        await asyncio.to_thread(ready.get, True, 120)
    acks: dict[str, float] = {}
    async with grpc.aio.insecure_channel(messages[0].address) as channel:
        stub = messages_pb2_grpc.MessagesServiceStub(channel)
        start = time.monotonic()
        total = STREAM_RATE * STREAM_SECONDS
        for i in range(total):
            await asyncio.sleep(max(0.0, start + i / STREAM_RATE - time.monotonic()))
            reply = await stub.SendMessage(
                messages_pb2.SendMessageRequest(
                    thread_id=thread, user_id=senders[i % len(senders)], content=f"live {i}"
                )
            )
            acks[reply.message.id] = time.time()
    received: dict[str, list[float]] = {}
    ended: dict[str, int] = {}
    for _ in subscribers:
        result = await asyncio.to_thread(results.get, True, 120)
        for message_id, times in result["received"].items():
            received.setdefault(message_id, []).extend(times)
        for code, count in result["ended"].items():
            ended[code] = ended.get(code, 0) + count
    for proc in subscribers:
        proc.join(30)
    latencies = [max(0.0, t - acks[m]) for m, ts in received.items() if m in acks for t in ts]
    listeners = sum(len(spec.get("users") or ()) or spec["streams"] for spec in streams)
    expected = listeners * len(acks)
    _, p50, p99 = report.summarize(latencies, 1.0)
    bench.add(
        report.Figure(
            path,
            f"{listeners} streams on {len(streams)} processes, {STREAM_RATE} msg/s",
            len(latencies) / STREAM_SECONDS,
            p50,
            p99,
            ceiling="send acknowledgement",
            note=f"{len(latencies):,} of {expected:,} deliveries measured"
            + "".join(f"; {n} streams ended {code}" for code, n in sorted(ended.items())),
        )
    )


async def idle_streams(bench: Bench, server: ServiceProcess) -> None:
    spread = bench.seeded.spread
    await idle_memory(
        server,
        bench,
        "idle streams resident memory",
        IDLE_STREAMS,
        [{"thread": spread[i][0], "streams": IDLE_STREAMS // 2} for i in range(2)],
        target_mb=300,
    )


async def idle_user_streams(bench: Bench, server: ServiceProcess) -> None:
    # Each user a member of 10 threads of 1,000 members (memberships held in memory).
    users: list[str] = []
    for n in range(10):
        _, members = await members_thread(bench.database_url, IDLE_USER_STREAMS // 10, tag=f"i{n}")
        users += members
    conn = await asyncpg.connect(bench.database_url)
    try:
        await conn.execute(
            "INSERT INTO thread_participants (thread_id, user_id) "
            "SELECT t.id, u FROM unnest($1::uuid[]) AS u, "
            "(SELECT id FROM threads WHERE name LIKE 'i_ thread') t "
            "ON CONFLICT DO NOTHING",
            [uuid.UUID(u) for u in users],
        )
    finally:
        await conn.close()
    half = len(users) // 2
    await idle_memory(
        server,
        bench,
        "idle user streams resident memory",
        len(users),
        [{"users": users[:half]}, {"users": users[half:]}],
        target_mb=500,
    )


async def idle_memory(
    server: ServiceProcess,
    bench: Bench,
    path: str,
    count: int,
    specs: list[dict[str, Any]],
    *,
    target_mb: int,
) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    rss_before = psutil.Process(server.process.pid).memory_info().rss
    until = time.time() + 90
    holders = [
        ctx.Process(
            target=run_subscribers,
            args=(
                {**spec, "address": server.address, "settle": 15.0, "until": until},
                ready,
                results,
            ),
        )
        for spec in specs
    ]
    for proc in holders:
        proc.start()
    for _ in holders:
        await asyncio.to_thread(ready.get, True, 120)
    rss = psutil.Process(server.process.pid).memory_info().rss
    for proc in holders:
        proc.terminate()
        proc.join(10)
    bench.add(
        report.Figure(
            path,
            f"{count:,} streams, one process",
            0.0,
            float("nan"),
            float("nan"),
            ceiling=f"target {target_mb} MB",
            ratio=rss / (target_mb * 2**20),
            note=f"RSS {rss / 2**20:.0f} MB (idle process {rss_before / 2**20:.0f} MB)",
        )
    )


async def pgbench(bench: Bench, url: str) -> None:
    binary = shutil.which("pgbench")
    if binary is None:
        say("pgbench not found: skipping the pgbench ceiling")
        return
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE bench_pairs (n int PRIMARY KEY, thread_id uuid, user_id uuid)")
    await conn.executemany(
        "INSERT INTO bench_pairs VALUES ($1, $2, $3)",
        [(i + 1, uuid.UUID(t), uuid.UUID(u)) for i, (t, u) in enumerate(bench.seeded.spread)],
    )
    await conn.close()
    script = Path(tempfile.mkdtemp()) / "send.sql"
    script.write_text(
        f"\\set n random(1, {len(bench.seeded.spread)})\n"
        "SELECT s.* FROM bench_pairs p, "
        "chat_send_message(p.thread_id, p.user_id, 'pgbench', NULL, NULL, NULL, '[]') s "
        "WHERE p.n = :n;\n"
    )
    command = [binary, "-M", "prepared", "-n", "-c", "32", "-j", "2"]
    command += ["-T", str(int(bench.args.duration)), "-f", str(script), url]
    # The same send with and without the user streams' log (its two triggers
    # switched off for the second run only): what the log adds to a send.
    for setting, log_on in (
        ("32 clients, with the event log", True),
        ("32 clients, no log", False),
    ):
        conn = await asyncpg.connect(url)
        await conn.execute(LOG_TRIGGERS_ON if log_on else LOG_TRIGGERS_OFF)
        await conn.close()
        result = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=300
        )
        tps = re.search(r"tps = ([\d.]+)", result.stdout)
        latency = re.search(r"latency average = ([\d.]+) ms", result.stdout)
        if tps is None or latency is None:
            say(f"pgbench failed: {result.stderr.strip()[:300]}")
            continue
        bench.add(
            report.Figure(
                "pgbench -M prepared send function",
                setting,
                float(tps.group(1)),
                float(latency.group(1)),
                float("nan"),
                note="p50 column: pgbench's average latency",
            )
        )
    conn = await asyncpg.connect(url)
    await conn.execute(LOG_TRIGGERS_ON)
    await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply data sizes (default 1)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per figure")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    args = parser.parse_args()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
