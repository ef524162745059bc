"""A bounded soak: mixed traffic through users, threads and messages, then checks.

`run_soak` drives running services (one process each) for `duration_s`: live
StreamThreadMessages streams spread over a few group threads, and `writers`
tasks looping SendMessage, ListMessages, ListThreads, MarkRead, GetUnreadCount,
GetUser and now and then UpdateMessage / AddAttachment. It then checks, and
puts every figure in the report:

- no RPC failed (every outcome is counted by method and status code);
- every stream received, exactly once, every message created in its thread
  after it opened (by id, against the ListMessages history at the end);
- memory is flat: the least-squares RSS slope over the second half of the
  samples (the first half is warm-up) grows the process by less than
  MEMORY_GROWTH_FRACTION of its half-way RSS and less than MEMORY_GROWTH_BYTES;
- no leaked database connections once traffic stopped: no chat-* pool
  connection 'active' or 'idle in transaction', at most DB_POOL_MAX_SIZE per
  service, and each pool's metrics show none in use and no stream left open;
- unread counts agree: GetUnreadCount equals the count computed in SQL from the
  read marks (exact, as services/threads/README.md defines it).

Throughput is reported, never asserted. `make soak` (`python -m
tests.reliability.soak`) runs it long on its own embedded PostgreSQL;
tests/reliability/test_soak.py runs it short.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import grpc
import psutil
from chat.v1 import (
    messages_pb2,
    messages_pb2_grpc,
    threads_pb2,
    threads_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)
from google.protobuf import field_mask_pb2
from prometheus_client.parser import text_string_to_metric_families

from devtools.ports import free_port
from devtools.processes import REPO, ServiceProcess, start_service_process
from services.common.settings import DatabaseSettings
from tests.integration.conftest import Clients, open_live_stream
from tests.postgres import migrate
from tests.rpc_errors import as_user

T = TypeVar("T")
SERVICES = ("users", "threads", "messages")
THREADS = 5
OBSERVERS = 2  # participants that never act: their unread counts are set at the end
MEMORY_GROWTH_FRACTION = 0.10
MEMORY_GROWTH_BYTES = 20 * 2**20
CALL_TIMEOUT_S = 30.0
CATCH_UP_S = 30.0
QUIET_S = 20.0
MiB = 2**20


@dataclass(frozen=True)
class Endpoint:
    """One running service: its gRPC address, its process id, its /metrics host:port."""

    address: str
    pid: int
    metrics: str | None = None


@dataclass
class SoakReport:
    duration_s: float
    streams: int
    writers: int
    rpcs: dict[str, dict[str, int]]
    rpc_total: int
    rpc_per_s: float
    errors: int
    error_samples: list[str]
    messages_sent: int
    stream_events: dict[str, int]
    streams_missing: int
    streams_duplicates: int
    # Missing created events whose message the stream did get, as an 'updated' event.
    streams_missing_seen_as_updated: int
    memory: dict[str, dict[str, float]]
    db_connections: dict[str, dict[str, int]]
    pool_max_size: int
    pool_metrics: dict[str, dict[str, float]]
    unread: dict[str, dict[str, Any]]
    checks: dict[str, bool]
    failures: list[str] = field(default_factory=list)


class Outcomes:
    """Every RPC outcome, by method and status code name."""

    def __init__(self) -> None:
        self.counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.samples: list[str] = []

    def add(self, method: str, code: str, detail: str = "") -> None:
        self.counts[method][code] += 1
        if code != "OK" and len(self.samples) < 20:
            self.samples.append(f"{method}: {code} {detail}".strip())

    async def __call__(self, method: str, call: Awaitable[T]) -> T | None:
        try:
            reply = await asyncio.wait_for(call, CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            self.add(method, err.code().name, err.details() or "")
            return None
        except TimeoutError:
            self.add(method, "CLIENT_TIMEOUT")
            return None
        self.add(method, "OK")
        return reply

    def errors(self) -> int:
        return sum(n for c in self.counts.values() for code, n in c.items() if code != "OK")


@dataclass
class Stream:
    thread_id: str
    call: grpc.aio.UnaryStreamCall  # type: ignore[type-arg]
    created: list[str]
    kinds: Counter[str] = field(default_factory=Counter)
    updated: set[str] = field(default_factory=set)  # to explain a miss, not to count as seen
    stopping: bool = False
    boundary: str | None = None  # the thread's newest message when the stream went live


def clients_for(addresses: Mapping[str, Endpoint]) -> Clients:
    """Stubs on fresh channels (each on its own connection, like a separate caller)."""
    channels = [grpc.aio.insecure_channel(addresses[name].address) for name in SERVICES]
    return Clients(
        users=users_pb2_grpc.UsersServiceStub(channels[0]),
        threads=threads_pb2_grpc.ThreadsServiceStub(channels[1]),
        messages=messages_pb2_grpc.MessagesServiceStub(channels[2]),
        channels=channels,
    )


async def close(clients: Clients) -> None:
    for channel in clients.channels:
        await channel.close()


async def read_stream(stream: Stream, outcomes: Outcomes) -> None:
    # read(), not `async for`: open_live_stream already read caught_up that way.
    try:
        while (event := await stream.call.read()) is not grpc.aio.EOF:
            assert isinstance(event, messages_pb2.StreamThreadMessagesResponse)
            kind = event.WhichOneof("event")
            stream.kinds[str(kind)] += 1
            if kind == "created":
                stream.created.append(event.created.id)
            elif kind == "updated":
                stream.updated.add(event.updated.id)
        outcomes.add("StreamThreadMessages", "ENDED_BY_SERVER")
    except grpc.aio.AioRpcError as err:
        cancelled = stream.stopping and err.code() == grpc.StatusCode.CANCELLED
        outcomes.add("StreamThreadMessages", "OK" if cancelled else err.code().name, str(err))
    except asyncio.CancelledError:
        if not stream.stopping:
            raise
        outcomes.add("StreamThreadMessages", "OK")
    except Exception as exc:  # a client-side failure is an error of the soak too
        outcomes.add("StreamThreadMessages", type(exc).__name__, str(exc))


async def writer(
    clients: Clients, users: list[str], threads: list[str], stop_at: float, outcomes: Outcomes
) -> None:
    rng = random.Random()
    sends = 0
    while time.monotonic() < stop_at:
        user, thread = rng.choice(users), rng.choice(threads)
        me = as_user(user)
        sent = await outcomes(
            "SendMessage",
            clients.messages.SendMessage(
                messages_pb2.SendMessageRequest(
                    thread_id=thread,
                    user_id=user,
                    content=f"soak {sends}",
                    request_id=str(uuid.uuid4()),
                ),
                metadata=me,
            ),
        )
        sends += 1
        await outcomes(
            "ListMessages",
            clients.messages.ListMessages(
                messages_pb2.ListMessagesRequest(thread_id=thread, page_size=20), metadata=me
            ),
        )
        await outcomes(
            "ListThreads",
            clients.threads.ListThreads(
                threads_pb2.ListThreadsRequest(user_id=user, page_size=20), metadata=me
            ),
        )
        await outcomes(
            "MarkRead",
            clients.threads.MarkRead(
                threads_pb2.MarkReadRequest(thread_id=thread, user_id=user), metadata=me
            ),
        )
        await outcomes(
            "GetUnreadCount",
            clients.threads.GetUnreadCount(
                threads_pb2.GetUnreadCountRequest(user_id=user), metadata=me
            ),
        )
        await outcomes(
            "GetUser", clients.users.GetUser(users_pb2.GetUserRequest(id=user), metadata=me)
        )
        if sent is not None and sends % 10 == 0:
            message_id = sent.message.id
            await outcomes(
                "UpdateMessage",
                clients.messages.UpdateMessage(
                    messages_pb2.UpdateMessageRequest(
                        message=messages_pb2.Message(id=message_id, content=f"edited {sends}"),
                        update_mask=field_mask_pb2.FieldMask(paths=["content"]),
                    ),
                    metadata=me,
                ),
            )
            await outcomes(
                "AddAttachment",
                clients.messages.AddAttachment(
                    messages_pb2.AddAttachmentRequest(
                        message_id=message_id,
                        attachment=messages_pb2.Attachment(
                            url="https://example.com/soak.png", type="image/png", name="soak.png"
                        ),
                    ),
                    metadata=me,
                ),
            )


async def sample_rss(pids: Mapping[str, int], until: float) -> dict[str, list[tuple[float, int]]]:
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
    while (now := time.monotonic()) < until:
        for name, proc in procs.items():
            samples[name].append((now, proc.memory_info().rss))
        await asyncio.sleep(1.0)
    return samples


def memory_trend(samples: list[tuple[float, int]]) -> dict[str, float]:
    """Least-squares RSS slope over the second half of the samples, and its bound."""
    half = samples[len(samples) // 2 :]
    if len(half) < 3:
        return {"samples": len(samples), "ok": 0.0}
    times = [t - half[0][0] for t, _ in half]
    slope, _ = statistics.linear_regression(times, [float(r) for _, r in half])
    growth = slope * times[-1]
    rss_mid = half[0][1]
    bound = min(MEMORY_GROWTH_FRACTION * rss_mid, MEMORY_GROWTH_BYTES)
    return {
        "samples": len(samples),
        "rss_start_mib": round(samples[0][1] / MiB, 1),
        "rss_mid_mib": round(rss_mid / MiB, 1),
        "rss_end_mib": round(samples[-1][1] / MiB, 1),
        "rss_max_mib": round(max(r for _, r in samples) / MiB, 1),
        "slope_kib_per_min": round(slope * 60 / 1024, 1),
        "window_s": round(times[-1], 1),
        "growth_mib": round(growth / MiB, 2),
        "bound_mib": round(bound / MiB, 2),
        "ok": float(growth < bound),
    }


async def history(clients: Clients, thread_id: str) -> list[messages_pb2.Message]:
    """A thread's whole history, newest first."""
    out: list[messages_pb2.Message] = []
    token = ""
    while True:
        page = await clients.messages.ListMessages(
            messages_pb2.ListMessagesRequest(thread_id=thread_id, page_size=200, page_token=token)
        )
        out.extend(page.messages)
        token = page.next_page_token
        if not token:
            return out


def expected_ids(stream: Stream, newest_first: list[str]) -> list[str]:
    """Ids created after the stream's caught_up: newer than the boundary it saw."""
    if stream.boundary is None or stream.boundary not in newest_first:
        return newest_first
    return newest_first[: newest_first.index(stream.boundary)]


async def scrape(host_port: str) -> dict[str, float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://{host_port}/metrics", timeout=5) as reply:
            body: bytes = reply.read()
            return body.decode()

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for sample in family.samples:
            if sample.name == "chat_db_pool_connections":
                values[f"pool_{sample.labels['state']}"] = sample.value
            elif sample.name in ("chat_db_pool_waiting", "chat_streams_open"):
                values[sample.name.removeprefix("chat_")] = sample.value
    return values


async def connections(conn: asyncpg.Connection) -> dict[str, dict[str, int]]:
    rows = await conn.fetch(
        "SELECT application_name, state, count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE 'chat-%'"
        " AND application_name <> 'chat-soak' GROUP BY 1, 2"
    )
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for app, state, count in rows:
        out[app][str(state)] = count
    return dict(out)


async def quiet_state(
    conn: asyncpg.Connection, addresses: Mapping[str, Endpoint]
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]], bool]:
    """Connections and pool metrics, polled until nothing is busy (or QUIET_S passed)."""
    deadline = time.monotonic() + QUIET_S
    while True:
        db = await connections(conn)
        metrics = {n: await scrape(e.metrics) for n, e in addresses.items() if e.metrics}
        busy = any(
            db.get(f"chat-{name}", {}).get(state, 0)
            for name in SERVICES
            for state in ("active", "idle in transaction")
        ) or any(m.get("pool_in_use", 0) or m.get("streams_open", 0) for m in metrics.values())
        if not busy or time.monotonic() > deadline:
            return db, metrics, not busy
        await asyncio.sleep(0.5)


UNREAD_SQL = """
SELECT count(m.id) AS n
FROM thread_participants p
JOIN threads t ON t.id = p.thread_id AND NOT t.is_archived
LEFT JOIN messages m ON m.thread_id = p.thread_id
    AND m.created_at > coalesce(p.last_read_at, '-infinity')
    AND m.user_id <> p.user_id AND m.status <> 'deleted'
WHERE p.user_id = $1
GROUP BY p.thread_id
"""


async def unread_check(
    clients: Clients, conn: asyncpg.Connection, user: str, outcomes: Outcomes
) -> dict[str, Any]:
    rpc = await outcomes(
        "GetUnreadCount",
        clients.threads.GetUnreadCount(
            threads_pb2.GetUnreadCountRequest(user_id=user), metadata=as_user(user)
        ),
    )
    counts = [int(r["n"]) for r in await conn.fetch(UNREAD_SQL, uuid.UUID(user))]
    sql = {
        "total_unread": sum(counts),
        "unread_threads": sum(1 for n in counts if n),
        "capped": False,  # deprecated: counts are exact
    }
    got = (
        None
        if rpc is None
        else {
            "total_unread": rpc.total_unread,
            "unread_threads": rpc.unread_threads,
            "capped": rpc.capped,
        }
    )
    return {"rpc": got, "sql": sql, "per_thread": sorted(counts)}


async def run_soak(
    addresses: Mapping[str, Endpoint],
    database_url: str,
    *,
    duration_s: float,
    streams: int,
    writers: int,
) -> SoakReport:
    outcomes = Outcomes()
    setup = clients_for(addresses)
    users = [(await setup.new_user("soak")).id for _ in range(max(writers, 4) + OBSERVERS)]
    active, observers = users[OBSERVERS:], users[:OBSERVERS]
    threads = []
    for i in range(THREADS):
        reply = await setup.threads.CreateThread(
            threads_pb2.CreateThreadRequest(
                name=f"soak {i}", creator_id=active[0], participant_ids=users
            )
        )
        threads.append(reply.thread.id)

    # Streams open one at a time, each live after its caught_up; nothing writes yet,
    # so every message newer than the thread's newest at that moment is expected.
    stream_clients = [clients_for(addresses) for _ in threads]
    open_streams: list[Stream] = []
    for i in range(streams):
        thread, via = threads[i % THREADS], stream_clients[i % THREADS]
        call = await open_live_stream(via.messages, thread, reader=users[i % len(users)])
        newest = await setup.messages.ListMessages(
            messages_pb2.ListMessagesRequest(thread_id=thread, page_size=1)
        )
        boundary = newest.messages[0].id if newest.messages else None
        open_streams.append(Stream(thread, call, [], boundary=boundary))
    readers = [asyncio.create_task(read_stream(s, outcomes)) for s in open_streams]

    started = time.monotonic()
    stop_at = started + duration_s
    sampler = asyncio.create_task(
        sample_rss({name: e.pid for name, e in addresses.items()}, stop_at)
    )
    writer_clients = [clients_for(addresses) for _ in range(writers)]
    await asyncio.gather(*(writer(c, active, threads, stop_at, outcomes) for c in writer_clients))
    elapsed = time.monotonic() - started
    rss = await sampler

    # Delivery: wait until every stream has what history says it should, then close.
    histories = {t: await history(setup, t) for t in threads}
    expected = [expected_ids(s, [m.id for m in histories[s.thread_id]]) for s in open_streams]
    deadline = time.monotonic() + CATCH_UP_S
    while time.monotonic() < deadline:
        if all(set(e) <= set(s.created) for s, e in zip(open_streams, expected, strict=True)):
            break
        await asyncio.sleep(0.2)
    for s in open_streams:
        s.stopping = True
        s.call.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    misses = [set(e) - set(s.created) for s, e in zip(open_streams, expected, strict=True)]
    missing = sum(map(len, misses))
    as_updated = sum(len(m & s.updated) for s, m in zip(open_streams, misses, strict=True))
    duplicates = sum(len(s.created) - len(set(s.created)) for s in open_streams)
    events: Counter[str] = Counter()
    for s in open_streams:
        events.update(s.kinds)

    conn = await asyncpg.connect(database_url, server_settings={"application_name": "chat-soak"})
    try:
        # Observers never act: set their read marks k messages back in each thread.
        marks: dict[str, list[int]] = {}
        for o, observer in enumerate(observers):
            marks[observer] = []
            for j, thread in enumerate(threads):
                full = histories[thread]
                k = min(len(full) - 1, 10 + 13 * j + 5 * o)  # k unread, under the cap
                marks[observer].append(k)
                await outcomes(
                    "MarkRead",
                    setup.threads.MarkRead(
                        threads_pb2.MarkReadRequest(
                            thread_id=thread, user_id=observer, read_at=full[k].created_at
                        ),
                        metadata=as_user(observer),
                    ),
                )
        unread = {u: await unread_check(setup, conn, u, outcomes) for u in [*observers, active[0]]}
        for observer, ks in marks.items():
            unread[observer]["expected_per_thread"] = sorted(ks)
        for c in [setup, *stream_clients, *writer_clients]:
            await close(c)
        db, pool_metrics, quiet = await quiet_state(conn, addresses)
    finally:
        await conn.close()

    pool_max = DatabaseSettings().pool_max_size
    memory = {name: memory_trend(samples) for name, samples in rss.items()}
    rpcs = {method: dict(codes) for method, codes in sorted(outcomes.counts.items())}
    total = sum(sum(codes.values()) for codes in rpcs.values())
    checks = {
        "no_errors": outcomes.errors() == 0,
        "streams_complete": missing == 0 and duplicates == 0,
        "memory_flat": all(m["ok"] for m in memory.values()),
        "db_connections_released": quiet
        and all(sum(db.get(f"chat-{name}", {}).values()) <= pool_max for name in SERVICES)
        and all(m.get("pool_open", 0) <= pool_max for m in pool_metrics.values()),
        "unread_counts_agree": all(
            u["rpc"] == u["sql"]
            and sorted(u["per_thread"]) == u.get("expected_per_thread", sorted(u["per_thread"]))
            for u in unread.values()
        ),
    }
    return SoakReport(
        duration_s=round(elapsed, 1),
        streams=streams,
        writers=writers,
        rpcs=rpcs,
        rpc_total=total,
        rpc_per_s=round(total / elapsed, 1),
        errors=outcomes.errors(),
        error_samples=outcomes.samples,
        messages_sent=rpcs.get("SendMessage", {}).get("OK", 0),
        stream_events=dict(events),
        streams_missing=missing,
        streams_duplicates=duplicates,
        streams_missing_seen_as_updated=as_updated,
        memory=memory,
        db_connections=db,
        pool_max_size=pool_max,
        pool_metrics=pool_metrics,
        unread=unread,
        checks=checks,
        failures=[name for name, ok in checks.items() if not ok],
    )


@asynccontextmanager
async def start_system(database_url: str) -> AsyncIterator[dict[str, Endpoint]]:
    """One process per service on `database_url`, each with a /metrics port."""
    procs: list[ServiceProcess] = []
    endpoints: dict[str, Endpoint] = {}
    try:
        for name in SERVICES:
            port = free_port()
            # Defaults throughout, logging included (one INFO line per RPC, as
            # deployed); METRICS_PORT only gives each process a /metrics port.
            proc = await start_service_process(name, database_url, METRICS_PORT=str(port))
            procs.append(proc)
            endpoints[name] = Endpoint(proc.address, proc.process.pid, f"127.0.0.1:{port}")
        yield endpoints
    finally:
        for proc in procs:
            await proc.stop()


def table(report: SoakReport) -> str:
    lines = [
        f"{report.duration_s:.0f} s, {report.streams} streams, {report.writers} writers: "
        f"{report.rpc_total:,} RPCs ({report.rpc_per_s:,.0f}/s), "
        f"{report.messages_sent:,} messages, {report.errors} errors",
        f"streams: events {report.stream_events}, missing {report.streams_missing}, "
        f"duplicates {report.streams_duplicates} "
        f"(missing but seen as 'updated': {report.streams_missing_seen_as_updated})",
        f"{'service':<10}{'RSS mid MiB':>12}{'RSS end MiB':>12}{'KiB/min':>10}"
        f"{'growth MiB':>11}{'bound MiB':>10}{'DB conns':>9}",
    ]
    for name, m in report.memory.items():
        conns = sum(report.db_connections.get(f"chat-{name}", {}).values())
        lines.append(
            f"{name:<10}{m.get('rss_mid_mib', 0):>12}{m.get('rss_end_mib', 0):>12}"
            f"{m.get('slope_kib_per_min', 0):>10}{m.get('growth_mib', 0):>11}"
            f"{m.get('bound_mib', 0):>10}{conns:>9}"
        )
    lines += [f"{'PASS' if ok else 'FAIL'}  {check}" for check, ok in report.checks.items()]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> int:
    from services.common.embedded import EmbeddedPostgres

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    data = tempfile.mkdtemp(prefix="chat-soak-pg-")
    embedded = EmbeddedPostgres(data)
    try:
        url = embedded.start()
        await migrate(url)
        async with start_system(url) as addresses:
            report = await run_soak(
                addresses,
                url,
                duration_s=args.duration,
                streams=args.streams,
                writers=args.writers,
            )
    finally:
        embedded.stop()
        shutil.rmtree(data, ignore_errors=True)
    body = json.dumps(dataclasses.asdict(report), indent=2)
    print(body)
    print(table(report))
    path = REPO / "bench" / "results" / f"soak-{stamp}.json"
    path.write_text(body + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    parser.add_argument("--streams", type=int, default=50, help="concurrent live streams")
    parser.add_argument("--writers", type=int, default=8, help="concurrent writer loops")
    sys.exit(asyncio.run(main(parser.parse_args())))
