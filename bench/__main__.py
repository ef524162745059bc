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
import math
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
from chat.v1 import messages_pb2, messages_pb2_grpc

from bench import caches, cpu, report
from bench.empty_server import STREAM_EVENT_BYTES
from bench.load import (
    SQL_APPLICATION_NAME,
    ready,
    run_clients,
    run_empty_stream_readers,
    run_subscribers,
)
from bench.seed import Seeded, seed
from db.migrations import load_migrations
from db.runner import Migrator
from devtools.databases import with_database
from devtools.ports import free_port
from devtools.processes import SETTINGS_VARIABLES, ServiceProcess, start_service_process
from services.common import settings as service_settings
from services.common.embedded import EmbeddedPostgres
from services.common.pagination import TIME_ID, PageCodec, PageKind
from services.messages.service import DEFINITION as MESSAGES
from services.messages.streams.listener import APPLICATION_NAME as LISTENER_APPLICATION_NAME

RESULTS = Path(__file__).resolve().parent / "results"
# ListMessages' page tokens (the seeded deep-page tokens are of this kind).
HISTORY_PAGES = PageCodec(PageKind.HISTORY, TIME_ID)
STREAM_SUBSCRIBERS = 1000
STREAM_RATE = 50  # messages per second while the subscribers listen
STREAM_SECONDS = 10
FLOOR_EVENTS = 100  # events per empty stream (stream_floor)
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
# The clients' processes start on a wall-clock schedule this long after the
# bench asks for them (so every process and the CPU probe share one window).
START_SLACK_S = 1.0
CPU_CLIENTS = 8  # calls in flight in the CPU-per-call rounds (issue 18's setting)
WORKER_CLIENTS = 32  # calls in flight in the WORKERS=1 vs 2 rounds
WORKER_CHANNELS = 4  # connections per client process there (local subchannel pools)
# The /metrics port step between a WORKERS=N service's workers (services/common/settings.py).
METRICS_STRIDE = getattr(service_settings, "WORKER_METRICS_STRIDE", 100)


def say(line: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {line}", flush=True)


@dataclass
class Measured:
    """One measured window: latencies summarised, the calls, and the CPU they cost."""

    throughput: float
    p50_ms: float
    p99_ms: float
    calls: int
    usage: cpu.Usage
    client_s: float
    cache_hit_rates: dict[str, float] | None = None

    def figure(self, path: str, setting: str, **extra: Any) -> report.Figure:
        per = cpu.per_call_us
        if self.usage.lost:
            lost = f"{self.usage.lost} serving backends exited in the window (PG figure low)"
            extra["note"] = "; ".join(x for x in (extra.get("note", ""), lost) if x)
        return report.Figure(
            path,
            setting,
            self.throughput,
            self.p50_ms,
            self.p99_ms,
            calls=self.calls,
            service_cpu_us=per(self.usage.service_s, self.calls),
            client_cpu_us=per(self.client_s, self.calls),
            db_cpu_us=per(self.usage.db_s, self.calls),
            db_tree_cpu_us=per(self.usage.db_tree_s, self.calls),
            cache_hit_rates=self.cache_hit_rates,
            **extra,
        )


def target_of(*procs: ServiceProcess, names: tuple[str, ...] = ()) -> cpu.Target:
    """A figure's CPU target: these service processes and their pools' backends."""
    return cpu.Target(
        pids=[p.process.pid for p in procs],
        app_names=sorted({f"chat-{p.name}" for p in procs} | set(names)),
    )


SQL_TARGET = cpu.Target(pids=[], app_names=[SQL_APPLICATION_NAME])


class Bench:
    def __init__(
        self, args: argparse.Namespace, database_url: str, seeded: Seeded, probe: cpu.Probe
    ) -> None:
        self.args = args
        self.database_url = database_url
        self.seeded = seeded
        self.probe = probe
        self.figures: list[report.Figure] = []
        # service pid -> its workers' /metrics (--metrics)
        self.metrics_urls: dict[int, list[str]] = {}
        self.empty_service_us: float | None = None  # the CPU rounds' empty RPC (median)
        self.notes: list[str] = []
        self.pool = ProcessPoolExecutor(
            max_workers=2, mp_context=multiprocessing.get_context("spawn")
        )
        self.scratch = tempfile.mkdtemp(prefix="chat-bench-")

    async def start_pool(self) -> None:
        """Both client processes up and imported before the first window."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.pool, ready) for _ in range(2)))

    async def measure(self, spec: dict[str, Any], clients: int, target: cpu.Target) -> Measured:
        """`clients` concurrent callers split over the client processes; latencies of
        the calls started in the window, and the CPU of `target` and the clients
        over the same window."""
        parts = 2 if clients >= 8 else 1
        start_at = time.time() + START_SLACK_S
        measure_from = start_at + self.args.warmup
        end = measure_from + self.args.duration
        release = Path(self.scratch) / f"release-{uuid.uuid4().hex}"
        spec = {
            **spec,
            "clients": clients // parts,
            "start_at": start_at,
            "measure_from": measure_from,
            "end": end,
            "release": str(release),
            "database_url": self.database_url,
        }
        loop = asyncio.get_running_loop()
        running = asyncio.gather(
            *(loop.run_in_executor(self.pool, run_clients, spec) for _ in range(parts))
        )
        urls: list[str | None] = [
            u for pid in target.pids for u in self.metrics_urls.get(pid, [None])
        ]
        try:
            await asyncio.sleep(max(0.0, measure_from - time.time()))
            before = await self.probe.snapshot(target)
            counts_before = [caches.read_counts(u) for u in urls]
            await asyncio.sleep(max(0.0, end - time.time()))
            after = await self.probe.snapshot(target)
            counts_after = [caches.read_counts(u) for u in urls]
        finally:
            release.touch()  # the clients may close their connections now
        results = await running
        release.unlink()
        late = max(r["late_s"] for r in results)
        if late > self.args.warmup:
            say(f"warning: a client process started {late:.1f}s late (after its warm-up)")
        latencies = [x for r in results for x in r["latencies"]]
        throughput, p50, p99 = report.summarize(latencies, self.args.duration)
        # CPU per call divides by the calls started while each CPU figure was
        # running: the probe's window for the service and PostgreSQL, each client
        # process's own for its CPU (either may start or end late on a busy machine).
        probed = sum(before.at <= t < after.at for r in results for t in r["starts"])
        client_calls = sum(
            r["cpu_from_at"] <= t < r["cpu_to_at"] for r in results for t in r["starts"]
        )
        client_s = sum(r["cpu_s"] for r in results)
        return Measured(
            throughput,
            p50,
            p99,
            probed,
            cpu.Probe.usage(before, after, target),
            client_s * probed / client_calls if client_calls else 0.0,
            caches.hit_rates(counts_before, counts_after),
        )

    def add(self, figure: report.Figure) -> None:
        self.figures.append(figure)
        ratio = "" if figure.ratio is None else f" ratio {figure.ratio:.2f}"
        cpu_line = ""
        if any(
            x is not None for x in (figure.service_cpu_us, figure.db_cpu_us, figure.db_tree_cpu_us)
        ):
            cpu_line = (
                f" CPU/call: service {report._num(figure.service_cpu_us)} µs"
                f" client {report._num(figure.client_cpu_us)} µs"
                f" PG {report._num(figure.db_cpu_us)} / {report._num(figure.db_tree_cpu_us)} µs"
            )
        say(
            f"{figure.path} [{figure.setting}]: {figure.throughput:,.0f}/s "
            f"p50 {figure.p50_ms:.2f} ms p99 {figure.p99_ms:.2f} ms{ratio}{cpu_line}"
        )


def git_state() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + {len(changed)} changed files" if changed else head


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
        # gRPC ports, no /metrics endpoint unless --metrics), see start_service_process.
        metrics_urls: dict[int, list[str]] = {}

        async def start(name: str, **env: str) -> ServiceProcess:
            if args.metrics:
                env = {"METRICS_PORT": str(free_port()), **env}
            proc = await start_service_process(name, url, **env)
            procs.append(proc)
            if args.metrics:
                # Worker i of a WORKERS=N service serves /metrics METRICS_STRIDE x (i - 1) up.
                base = int(env["METRICS_PORT"])
                metrics_urls[proc.process.pid] = [
                    f"http://127.0.0.1:{base + METRICS_STRIDE * i}/metrics"
                    for i in range(int(env.get("WORKERS", "1")))
                ]
            return proc

        threads = await start("threads")
        messages = [await start("messages") for _ in range(2)]
        users = await start("users")
        empty = await start("users", module="bench.empty_server")
        # The same service with its message cache off: every listing page cold.
        cold = await start("messages", MESSAGE_CACHE_BYTES="0")
        probe = await cpu.Probe.connect(url)
        bench = Bench(args, url, seeded, probe)
        bench.metrics_urls = metrics_urls
        if probe.postmaster is None:
            bench.notes.append("PostgreSQL is not on this machine: no PostgreSQL CPU figures")
        await bench.start_pool()
        await scenarios(bench, threads, messages, users, empty, cold)
        if not args.quick:
            idle = await start("messages")
            await idle_streams(bench, idle)
            await idle_user_streams(bench, idle)
        await pgbench(bench, url)
        # The WORKERS rounds start services of their own: the others stop first,
        # so their pools' connections are not held against max_connections.
        for proc in procs:
            await proc.stop()
        try:
            await workers_rounds(bench, url, start)
        except Exception as exc:  # report everything else measured, and why not this
            note = f"WORKERS=1 vs 2 not measured: {exc!r:.300}"
            say(note)
            bench.notes.append(note)
        # Every figure's CPU as a multiple of the empty RPC's service CPU per call
        # (the median of the CPU rounds' empty RPC, same run).
        for figure in bench.figures:
            figure.scale_to(bench.empty_service_us)
        await probe.close()
        meta = {
            "date": stamp,
            "machine": f"{platform.node()} ({os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB), Python {platform.python_version()}",
            "postgres": server_version,
            "scale": args.scale,
            "seeded_messages": seeded.rows,
            "seed_seconds": round(seed_seconds, 1),
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "repeats": args.repeats,
            "quick": args.quick,
            "empty_service_cpu_us": bench.empty_service_us,
            "cpu_method": cpu.__doc__,
            "notes": bench.notes,
            # The code measured: the services run the working tree as it is when
            # each starts, so say which commit and whether it had local changes.
            "git": git_state(),
        }
        path = report.write(RESULTS, stamp, meta, bench.figures, latest=not args.quick)
        print()
        print(f"machine: {meta['machine']}; PostgreSQL {server_version}; {stamp}")
        print(report.table(bench.figures))
        for note in bench.notes:
            print(f"note: {note}")
        if args.quick:  # a smoke run leaves the latest.* files alone
            print(f"\nwrote {path}")
        else:
            chart = report.chart(RESULTS, bench.figures)
            print(f"\nwrote {path}, {RESULTS / 'latest.json'} and {chart}")
        bench.pool.shutdown()
        shutil.rmtree(bench.scratch, ignore_errors=True)
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
    bench: Bench,
    threads: ServiceProcess,
    messages: list[ServiceProcess],
    users: ServiceProcess,
    empty: ServiceProcess,
    cold: ServiceProcess,
) -> None:
    s = bench.seeded
    empty_32 = await bench.measure(
        {"kind": "empty", "address": empty.address}, 32, target_of(empty)
    )
    bench.add(empty_32.figure("empty RPC (gRPC ceiling)", "32 clients"))
    await cpu_rounds(bench, threads, messages, users, empty, cold, empty_32.throughput)

    hot = [(s.hot_thread, member) for member in s.hot_members]
    for target, targets in (("spread", s.spread), ("hot thread", hot)):
        for clients in (1, 8, 32):
            sql = await bench.measure({"kind": "sql_send", "targets": targets}, clients, SQL_TARGET)
            bench.add(sql.figure(f"asyncpg send SQL ({target})", f"{clients} clients"))
            sent = await bench.measure(
                {"kind": "send", "address": messages[0].address, "targets": targets},
                clients,
                target_of(messages[0]),
            )
            bench.add(
                sent.figure(
                    f"SendMessage {target}",
                    f"{clients} clients",
                    ceiling="asyncpg send SQL, same clients",
                    ratio=sent.throughput / sql.throughput if sql.throughput else None,
                )
            )

    for size, thread in sorted(s.history.items()):
        for page, token in (("first page", ""), ("deep page", s.deep_tokens[size])):
            position = None
            if token:
                position = HISTORY_PAGES.decode(token, {"thread": thread})
            sql = await bench.measure(
                {"kind": "sql_list", "thread": thread, "position": position}, 8, SQL_TARGET
            )
            listed = await bench.measure(
                {
                    "kind": "history",
                    "address": messages[0].address,
                    "thread": thread,
                    "token": token,
                },
                8,
                target_of(messages[0]),
            )
            bench.add(
                listed.figure(
                    f"ListMessages {page}",
                    f"{size:,} messages",
                    ceiling=f"asyncpg page SQL p50 {sql.p50_ms:.2f} ms",
                    ratio=listed.p50_ms / sql.p50_ms if sql.p50_ms else None,
                    note="ratio = p50 / asyncpg p50; asyncpg page SQL: client "
                    f"{report._num(cpu.per_call_us(sql.client_s, sql.calls))} µs, PG "
                    f"{report._num(cpu.per_call_us(sql.usage.db_s, sql.calls))} µs per page",
                )
            )
    if not bench.args.quick:
        floor_us = await stream_floor(bench, empty)
        await live_streams(bench, messages, floor_us)


async def cpu_rounds(
    bench: Bench,
    threads: ServiceProcess,
    messages: list[ServiceProcess],
    users: ServiceProcess,
    empty: ServiceProcess,
    cold: ServiceProcess,
    empty_32_throughput: float,
) -> None:
    """CPU per call of each unary path, CPU_CLIENTS calls in flight, in
    `--repeats` interleaved rounds (every path once per round, the empty RPC
    first): each path's numbers are the medians over the rounds, and its
    *_x_empty the median of its ratios to the same round's empty RPC.

    Trusted calls (no x-user-id) and end-user calls (x-user-id of a member: the
    service adds the active-user lookup, services/common/identity.py). ListMessages
    also from a process with MESSAGE_CACHE_BYTES=0 (`cold`): every page built from
    rows, what a first listing of messages costs."""
    s = bench.seeded
    viewer = s.history_members[0]  # a member of the history threads, active
    smallest = min(s.history)
    page = f"{smallest:,} messages, first page of 50"
    inbox = f"{s.inbox_threads} threads x {s.inbox_backlog:,} unread"
    ids = s.senders[:100]
    paths: list[tuple[str, str, dict[str, Any], ServiceProcess, str, Any]] = [
        ("empty RPC", "", {"kind": "empty"}, empty, "", None),
        ("GetUser trusted", "", {"kind": "get_user", "users": ids}, users, "", None),
        (
            "GetUser end-user (x-user-id)",
            "",
            {"kind": "get_user", "users": ids, "caller": viewer},
            users,
            "",
            None,
        ),
        ("SendMessage spread", "", {"kind": "send", "targets": s.spread}, messages[0], "", None),
        (
            "ListMessages trusted",
            page,
            {"kind": "history", "thread": s.history[smallest], "token": ""},
            messages[0],
            "",
            None,
        ),
        (
            "ListMessages trusted, cache off (cold)",
            page,
            {"kind": "history", "thread": s.history[smallest], "token": ""},
            cold,
            "",
            None,
        ),
        (
            "ListMessages end-user (x-user-id)",
            page,
            {"kind": "history", "thread": s.history[smallest], "token": "", "caller": viewer},
            messages[0],
            "",
            None,
        ),
        ("ListThreads (page of 50)", inbox, {"kind": "inbox", "user": s.inbox_user}, threads,
         "empty RPC at 32 clients (throughput)", empty_32_throughput),
        ("GetUnreadCount", inbox, {"kind": "unread", "user": s.inbox_user}, threads,
         "empty RPC at 32 clients (throughput)", empty_32_throughput),
    ]  # fmt: skip
    rounds: dict[str, list[report.Figure]] = {path: [] for path, *_ in paths}
    for n in range(bench.args.repeats):
        say(f"CPU per call, round {n + 1} of {bench.args.repeats}")
        empty_us: float | None = None
        for path, setting, spec, proc, ceiling, against in paths:
            measured = await bench.measure(
                {**spec, "address": proc.address}, CPU_CLIENTS, target_of(proc)
            )
            setting = ", ".join(x for x in (setting, f"{CPU_CLIENTS} clients") if x)
            figure = measured.figure(
                path,
                setting,
                ceiling=ceiling,
                ratio=measured.throughput / against if against else None,
                note="CPU rounds: medians of interleaved repeats",
            )
            if path == "empty RPC":
                empty_us = figure.service_cpu_us
            figure.scale_to(empty_us)  # against this round's empty RPC
            rounds[path].append(figure)
    for path, *_ in paths:
        figure = report.median_figure(rounds[path])
        if path == "empty RPC":
            bench.empty_service_us = figure.service_cpu_us
        bench.add(figure)


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


async def live_streams(
    bench: Bench, messages: list[ServiceProcess], floor_us: float | None
) -> None:
    await delivery(
        bench,
        floor_us,
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
        floor_us,
        messages,
        "StreamUserEvents delivery",
        thread,
        users[:10],
        [{"users": users[:half]}, {"users": users[half:]}],
    )


async def delivery(
    bench: Bench,
    floor_us: float | None,
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
    # CPU from the first send to the end of the drain: both messages processes
    # (sends, fan-out) with their pool and listener backends, and the subscribers'
    # processes (the sender, 50 calls/s from this process, is not counted).
    target = target_of(*messages, names=(LISTENER_APPLICATION_NAME,))
    before = await bench.probe.snapshot(target)
    clients_before = [cpu.stat_cpu(proc.pid or 0) or 0.0 for proc in subscribers]
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
    await asyncio.sleep(max(0.0, start + STREAM_SECONDS + drain - time.monotonic()))
    after = await bench.probe.snapshot(target)
    clients_s = sum(
        (cpu.stat_cpu(proc.pid or 0) or 0.0) - b
        for proc, b in zip(subscribers, clients_before, strict=True)
    )
    usage = cpu.Probe.usage(before, after, target)
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
    measured = Measured(len(latencies) / STREAM_SECONDS, p50, p99, len(latencies), usage, clients_s)
    service_us = cpu.per_call_us(usage.service_s, len(latencies))
    bench.add(
        measured.figure(
            path,
            f"{listeners} streams on {len(streams)} processes, {STREAM_RATE} msg/s",
            ceiling="send acknowledgement",
            note=f"{len(latencies):,} of {expected:,} deliveries measured"
            + "".join(f"; {n} streams ended {code}" for code, n in sorted(ended.items()))
            + "; CPU per delivered event (sends, fan-out and the subscribers' processes)"
            + (
                f"; service CPU per event {service_us / floor_us:.2f}x the empty stream's"
                if service_us and floor_us
                else ""
            ),
        )
    )


async def stream_floor(bench: Bench, empty: ServiceProcess) -> float | None:
    """The empty stream's service CPU per event (bench.empty_server, `Stream`):
    STREAM_SUBSCRIBERS streams from two processes, FLOOR_EVENTS events each, as the
    delivery figures' streams are spread. Returns it (µs), the floor under fan-out."""
    ctx = multiprocessing.get_context("spawn")
    ready, go, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    spec = {"address": empty.address, "streams": STREAM_SUBSCRIBERS // 2, "events": FLOOR_EVENTS}
    readers = [
        ctx.Process(target=run_empty_stream_readers, args=(spec, ready, go, results))
        for _ in range(2)
    ]
    for proc in readers:
        proc.start()
    for _ in readers:
        await asyncio.to_thread(ready.get, True, 120)
    target = target_of(empty)
    before = await bench.probe.snapshot(target)
    clients_before = [cpu.stat_cpu(proc.pid or 0) or 0.0 for proc in readers]
    started = time.monotonic()
    for _ in readers:
        go.put(1)
    events = 0
    for _ in readers:
        events += await asyncio.to_thread(results.get, True, 600)
    elapsed = time.monotonic() - started
    after = await bench.probe.snapshot(target)
    clients_s = sum(
        (cpu.stat_cpu(proc.pid or 0) or 0.0) - b
        for proc, b in zip(readers, clients_before, strict=True)
    )
    for proc in readers:
        proc.join(30)
    usage = cpu.Probe.usage(before, after, target)
    measured = Measured(events / elapsed, math.nan, math.nan, events, usage, clients_s)
    figure = measured.figure(
        "empty stream (gRPC floor per event)",
        f"{STREAM_SUBSCRIBERS} streams on 2 client processes, {FLOOR_EVENTS} events each",
        note=f"bench.Empty/Stream: {STREAM_EVENT_BYTES}-byte events yielded as fast as they "
        "go, through the services' interceptor; CPU per event",
    )
    bench.add(figure)
    return figure.service_cpu_us


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
    command += ["-T", str(max(1, int(bench.args.duration))), "-f", str(script), url]
    # The send as SendMessage runs it (its session settings: no NOTIFY in the
    # transaction, streams woken after commit), then with the NOTIFY in the
    # transaction as before issue 18 (the ceiling it raised), then without the user
    # streams' log (its two triggers off for that run only): what each costs.
    # Interleaved rounds (--repeats), medians reported; each variant's ratio is the
    # median of its rounds' throughput against the first variant's in the same round.
    as_service = " ".join(f"-c {k}={v}" for k, v in MESSAGES.session_settings.items())
    variants = (
        ("32 clients, as the service sends (wake-ups after commit)", True, as_service),
        ("32 clients, NOTIFY in the transaction (before issue 18)", True, ""),
        ("32 clients, as the service sends, no log", False, as_service),
    )
    rounds: dict[str, list[report.Figure]] = {setting: [] for setting, *_ in variants}
    for n in range(bench.args.repeats):
        say(f"pgbench, round {n + 1} of {bench.args.repeats}")
        for setting, log_on, options in variants:
            figure = await _pgbench_once(bench, url, command, setting, log_on, options)
            if figure is not None:
                rounds[setting].append(figure)
        first = rounds[variants[0][0]]
        for setting, *_ in variants[1:]:
            done = rounds[setting]
            if first and done and len(done) == len(first) and first[-1].throughput:
                done[-1].ratio = done[-1].throughput / first[-1].throughput
    for setting, *_ in variants:
        if rounds[setting]:
            figure = report.median_figure(rounds[setting])
            if setting != variants[0][0]:
                figure.ceiling = "as the service sends, same round"
            bench.add(figure)
    conn = await asyncpg.connect(url)
    await conn.execute(LOG_TRIGGERS_ON)
    await conn.close()


async def _pgbench_once(
    bench: Bench, url: str, command: list[str], setting: str, log_on: bool, options: str
) -> report.Figure | None:
    """One pgbench window of the send function in one variant (session options, the
    user streams' log triggers on or off)."""
    conn = await asyncpg.connect(url)
    await conn.execute(LOG_TRIGGERS_ON if log_on else LOG_TRIGGERS_OFF)
    await conn.close()
    # pgbench's backends are gone when it ends: PostgreSQL's CPU is the tree's
    # (the postmaster keeps its reaped children's CPU); pgbench's own is that
    # of this process's reaped children.
    target = cpu.Target()
    before = await bench.probe.snapshot(target)
    client_before = cpu.rusage_children_s()
    result = await asyncio.to_thread(
        subprocess.run,
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PGOPTIONS": options},
    )
    client_s = cpu.rusage_children_s() - client_before
    after = await bench.probe.snapshot(target)
    tps = re.search(r"tps = ([\d.]+)", result.stdout)
    latency = re.search(r"latency average = ([\d.]+) ms", result.stdout)
    done = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    if tps is None or latency is None:
        say(f"pgbench failed: {result.stderr.strip()[:300]}")
        return None
    calls = int(done.group(1)) if done else 0
    usage = cpu.Probe.usage(before, after, target)
    say(f"pgbench [{setting}]: {float(tps.group(1)):,.0f} tps")
    return report.Figure(
        "pgbench -M prepared send function",
        setting,
        float(tps.group(1)),
        float(latency.group(1)),
        float("nan"),
        note="p50 column: pgbench's average latency; PostgreSQL CPU: the "
        "whole tree over pgbench's run, connections included",
        calls=calls,
        client_cpu_us=cpu.per_call_us(client_s, calls),
        db_tree_cpu_us=cpu.per_call_us(usage.db_tree_s, calls),
    )


def workers_supported() -> bool:
    """Whether services read WORKERS (N processes on one port, SO_REUSEPORT)."""
    return "WORKERS" in SETTINGS_VARIABLES


async def workers_rounds(bench: Bench, url: str, start: Any) -> None:
    """GetUser and SendMessage throughput and CPU per call with WORKERS=1 and 2.

    For each path, its service with WORKERS=1 and with WORKERS=2, both up at
    once; the rounds interleave the settings (`--repeats` of them, medians reported, the
    WORKERS=2 figure's ratio the median of its rounds' throughput against
    WORKERS=1 in the same round). WORKER_CLIENTS calls in flight from the two
    client processes, each over WORKER_CHANNELS connections with their own
    subchannel pools, so the kernel's SO_REUSEPORT hashing spreads them over the
    workers (one shared connection would land on one worker). Service CPU is the
    whole process tree's (bench.cpu.tree_cpu): every worker's.
    """
    if not workers_supported():
        note = (
            "WORKERS=1 vs 2 not measured: the services do not read a WORKERS "
            "setting yet (services/common/settings.py); bench.workers_rounds is ready for it"
        )
        say(note)
        bench.notes.append(note)
        return
    s = bench.seeded
    paths = (
        ("GetUser trusted", "users", {"kind": "get_user", "users": s.senders[:100]}),
        ("SendMessage spread", "messages", {"kind": "send", "targets": s.spread}),
    )
    # One service at a time, its WORKERS=1 and WORKERS=2 processes up together:
    # 3 pools of DB_POOL_MAX_SIZE (default 20) fit the server's max_connections
    # (100 by default); 6 (both services) would not.
    rounds: dict[tuple[str, str], list[report.Figure]] = {}
    for path, name, spec in paths:
        started: list[ServiceProcess] = []
        try:
            for workers in ("1", "2"):
                started.append(await start(name, WORKERS=workers))
            by_workers = dict(zip(("1", "2"), started, strict=True))
            await measure_workers(bench, path, spec, by_workers, rounds)
        finally:
            for proc in started:
                await proc.stop()
    for figures in rounds.values():
        bench.add(report.median_figure(figures))


async def measure_workers(
    bench: Bench,
    path: str,
    spec: dict[str, Any],
    by_workers: dict[str, ServiceProcess],
    rounds: dict[tuple[str, str], list[report.Figure]],
) -> None:
    for n in range(bench.args.repeats):
        say(f"{path}: WORKERS=1 vs 2, round {n + 1} of {bench.args.repeats}")
        one: float | None = None
        for workers, proc in by_workers.items():
            # How the connections spread: each worker's share of the service CPU
            # (around the whole figure, warm-up included).
            children = psutil.Process(proc.process.pid).children()
            before = [cpu.stat_cpu(c.pid) or 0.0 for c in children]
            measured = await bench.measure(
                {**spec, "address": proc.address, "channels": WORKER_CHANNELS},
                WORKER_CLIENTS,
                target_of(proc),
            )
            used = [(cpu.stat_cpu(c.pid) or 0.0) - b for c, b in zip(children, before, strict=True)]
            shares = ""
            if len(used) > 1 and sum(used) > 0:
                shares = "; workers' CPU shares " + " / ".join(
                    f"{u / sum(used):.0%}" for u in sorted(used, reverse=True)
                )
            figure = measured.figure(
                f"{path}, WORKERS={workers}",
                f"{WORKER_CLIENTS} clients over {2 * WORKER_CHANNELS} connections",
                ceiling="" if workers == "1" else "WORKERS=1, same round",
                ratio=None if workers == "1" or not one else measured.throughput / one,
                note="medians of interleaved rounds; service CPU of every worker" + shares,
            )
            if workers == "1":
                one = measured.throughput
            rounds.setdefault((path, workers), []).append(figure)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply data sizes (default 1)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per figure")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved rounds of the CPU-per-call and WORKERS figures (medians; default 3)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: --scale 0.01 --duration 2 --warmup 0.5 unless given, "
        "no stream or idle-memory figures",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="start the services with a /metrics port and report cache hit rates (bench.caches)",
    )
    args = parser.parse_args()
    if args.quick:
        given = {a.split("=")[0] for a in sys.argv[1:]}
        if "--scale" not in given:
            args.scale = 0.01
        if "--duration" not in given:
            args.duration = 2.0
        if "--warmup" not in given:
            args.warmup = 0.5
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
