"""Cancellation never hurts the server: hundreds of streams and calls cancelled at random.

The three services run as separate processes with exactly the defaults of
`make run` (only the database and where to listen are given; the messages
process also gets a /metrics port to read its gauges from). Several clients
stream a few threads, some for an end user (`x-user-id`), some trusted, while a
writer fires bursts of concurrent sends; every stream is cancelled at a random
moment: right after it was opened (before any event), after a random delay
(mid-burst), or after a random number of events. Unary calls are cancelled in
flight, and now and then a whole channel is closed with its streams open.

Afterwards every process is still running and serves a fresh send + stream
round trip, and nothing leaked: no stream is counted open, no pool connection is
in use, no connection of a service is left 'active' or 'idle in transaction',
and no process logged an error. Waits are bounded polls, never timing assertions.

The crash this guards against (issue 13): the interceptor's log line called
`context.peer()` from a server stream's `finally` after the client had
cancelled; grpcio had released the call by then, and the process died with
SIGSEGV within a few rounds.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest
from chat.v1 import (
    messages_pb2,
    messages_pb2_grpc,
)

from devtools.ports import free_port
from devtools.processes import ServiceProcess, start_service_process
from tests.postgres import DatabaseFactory
from tests.reliability.seeding import seed
from tests.reliability.soak import scrape
from tests.rpc_errors import as_user

ROUNDS = 30
STREAMS_PER_ROUND = 10  # ROUNDS x STREAMS_PER_ROUND = 300 cancelled streams
CLIENTS = 4  # channels streaming at once (one of them is closed now and then)
BURST = 10  # concurrent sends per round
UNARY_CANCELS_PER_ROUND = 4
THREADS = 3
USERS = 4
SETTLE_BOUND_S = 30.0  # bound on waiting for gauges and connections to settle
SERVICES = ("users", "threads", "messages")


@dataclass
class System:
    procs: dict[str, ServiceProcess]
    metrics: dict[str, str]  # service -> host:port of its /metrics
    database_url: str


@dataclass
class World:
    users: list[str]
    threads: list[str]
    cursors: dict[str, str]  # thread -> a cursor in it (replays start there)


@dataclass
class Tally:
    streams: Counter[str] = field(default_factory=Counter)  # how each stream ended
    unary: Counter[str] = field(default_factory=Counter)
    events: int = 0


@pytest.fixture
async def system(database_factory: DatabaseFactory) -> AsyncIterator[System]:
    url = await database_factory.create()
    procs: dict[str, ServiceProcess] = {}
    metrics: dict[str, str] = {}
    try:
        for name in SERVICES:
            port = free_port()  # a port, not a behaviour: the gauges are read from it
            procs[name] = await start_service_process(name, url, METRICS_PORT=str(port))
            metrics[name] = f"127.0.0.1:{port}"
        yield System(procs, metrics, url)
    finally:
        for proc in procs.values():
            if proc.process.returncode is not None:
                print(f"{proc.name} exited {proc.process.returncode}:", *proc.log[-40:], sep="")
            await proc.stop()
        await database_factory.drop(url)


async def _world(system: System) -> World:
    seeded = await seed(
        system.procs["users"].address,
        system.procs["threads"].address,
        system.procs["messages"].address,
        users=USERS,
        threads=THREADS,
    )
    return World(seeded.users, seeded.threads, seeded.cursors)


async def _ended(call: Any) -> str:
    """How a call ended (a stream or a unary call), as a status code name."""
    code: grpc.StatusCode = await call.code()
    return code.name


async def _stream_then_cancel(
    stub: messages_pb2_grpc.MessagesServiceAsyncStub,
    world: World,
    rng: random.Random,
    tally: Tally,
) -> None:
    thread = rng.choice(world.threads)
    # Half replay from a cursor (events arrive at once), half live-only.
    after = world.cursors[thread] if rng.random() < 0.5 else ""
    reader = rng.choice([None, *world.users])  # None: a trusted service call
    call = stub.StreamThreadMessages(
        messages_pb2.StreamThreadMessagesRequest(thread_id=thread, after=after),
        metadata=as_user(reader) if reader else (),
    )
    how = rng.choice(["at-once", "after-delay", "after-events"])
    try:
        if how == "after-delay":
            await asyncio.sleep(rng.uniform(0, 0.08))
        elif how == "after-events":
            wanted = rng.randint(1, 6)
            # Bounded: a live-only stream opened after the burst may get nothing.
            async with asyncio.timeout(rng.uniform(0.05, 0.5)):
                while wanted and await call.read() is not grpc.aio.EOF:
                    wanted -= 1
                    tally.events += 1
    except TimeoutError:
        pass
    except grpc.aio.AioRpcError as err:  # ended by the server
        tally.streams[f"{how}:{err.code().name}"] += 1
        return
    except asyncio.CancelledError:
        if not call.cancelled():  # this task itself was cancelled: not ours to swallow
            raise
        tally.streams[f"{how}:channel-closed"] += 1  # its channel closed under it
        return
    call.cancel()
    tally.streams[f"{how}:{await _ended(call)}"] += 1


async def _unary_then_cancel(
    stub: messages_pb2_grpc.MessagesServiceAsyncStub,
    world: World,
    rng: random.Random,
    tally: Tally,
) -> None:
    thread = rng.choice(world.threads)
    user = rng.choice(world.users)
    call: Any
    if rng.random() < 0.5:
        call = stub.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=thread, user_id=user, content="cancelled?", request_id=str(uuid.uuid4())
            ),
            metadata=as_user(user),
        )
    else:
        call = stub.ListMessages(
            messages_pb2.ListMessagesRequest(thread_id=thread, page_size=50),
            metadata=as_user(user),
        )
    await asyncio.sleep(rng.uniform(0, 0.01))
    call.cancel()
    tally.unary[await _ended(call)] += 1


async def _burst(
    stub: messages_pb2_grpc.MessagesServiceAsyncStub, world: World, rng: random.Random
) -> None:
    async def send(i: int) -> None:
        thread, user = rng.choice(world.threads), rng.choice(world.users)
        await stub.SendMessage(
            messages_pb2.SendMessageRequest(thread_id=thread, user_id=user, content=f"burst {i}"),
            metadata=as_user(user),
            timeout=30,
        )

    await asyncio.gather(*(send(i) for i in range(BURST)))


async def _round(
    address: str,
    writer: messages_pb2_grpc.MessagesServiceAsyncStub,
    world: World,
    rng: random.Random,
    tally: Tally,
) -> None:
    channels = [grpc.aio.insecure_channel(address) for _ in range(CLIENTS)]
    stubs = [messages_pb2_grpc.MessagesServiceStub(c) for c in channels]
    try:
        work = [
            _stream_then_cancel(stubs[i % CLIENTS], world, rng, tally)
            for i in range(STREAMS_PER_ROUND)
        ]
        work += [
            _unary_then_cancel(rng.choice(stubs), world, rng, tally)
            for _ in range(UNARY_CANCELS_PER_ROUND)
        ]
        tasks = [asyncio.ensure_future(w) for w in work]
        await asyncio.sleep(rng.uniform(0, 0.03))
        burst = asyncio.ensure_future(_burst(writer, world, rng))
        if rng.random() < 0.3:  # a client vanishes: its channel closes, streams and all
            await asyncio.sleep(rng.uniform(0, 0.05))
            await channels[0].close(grace=None)
        await asyncio.gather(*tasks)
        await burst
    finally:
        for channel in channels:
            await channel.close(grace=None)


async def _busy_connections(database_url: str) -> list[tuple[str, str, str]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """
            SELECT application_name, state, left(query, 80) AS query
            FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid()
              AND application_name LIKE 'chat-%'
              AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')
            """
        )
    finally:
        await conn.close()
    return [(r["application_name"], r["state"], r["query"]) for r in rows]


async def _settled(what: str, check: Any) -> None:
    """Poll `check` (returns a list of problems) until it returns none, or fail."""
    problems: Any = None
    for _ in range(int(SETTLE_BOUND_S / 0.1)):
        problems = await check()
        if not problems:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{what} did not settle within {SETTLE_BOUND_S:.0f}s: {problems}")


async def _round_trip(address: str, world: World) -> None:
    """A fresh send, delivered through a fresh stream (replay or live, either is fine)."""
    thread, writer, reader = world.threads[0], world.users[0], world.users[1]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = messages_pb2_grpc.MessagesServiceStub(channel)
        first = await stub.SendMessage(
            messages_pb2.SendMessageRequest(thread_id=thread, user_id=writer, content="after"),
            metadata=as_user(writer),
            timeout=30,
        )
        stream = stub.StreamThreadMessages(
            messages_pb2.StreamThreadMessagesRequest(thread_id=thread, after=first.message.cursor),
            metadata=as_user(reader),
        )
        second = await stub.SendMessage(
            messages_pb2.SendMessageRequest(thread_id=thread, user_id=writer, content="again"),
            metadata=as_user(writer),
            timeout=30,
        )
        wanted = second.message.id
        async with asyncio.timeout(30):  # a bound on waiting, not an expectation
            while True:
                event = await stream.read()
                assert isinstance(event, messages_pb2.StreamThreadMessagesResponse), event
                if event.WhichOneof("event") == "created" and event.created.id == wanted:
                    break
        stream.cancel()


async def test_cancellation_at_random_moments_hurts_nothing(system: System) -> None:
    world = await _world(system)
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    tally = Tally()
    address = system.procs["messages"].address

    async with grpc.aio.insecure_channel(address) as writer_channel:
        writer = messages_pb2_grpc.MessagesServiceStub(writer_channel)
        for i in range(ROUNDS):
            await _round(address, writer, world, rng, tally)
            dead = [p.name for p in system.procs.values() if p.process.returncode is not None]
            assert not dead, f"{dead} died in round {i} (seed {seed}); tally {tally}"

    assert sum(tally.streams.values()) == ROUNDS * STREAMS_PER_ROUND, tally
    # Every stream ended because its client cancelled it (or closed its channel),
    # none with a code of the server's; unary calls: cancelled, or done before.
    ends = {key.partition(":")[2] for key in tally.streams}
    assert ends <= {"CANCELLED", "channel-closed"}, (seed, tally)
    assert set(tally.unary) <= {"CANCELLED", "OK"}, (seed, tally)
    for proc in system.procs.values():
        assert proc.process.returncode is None, f"{proc.name} exited (seed {seed})"
    await _round_trip(address, world)

    async def gauges() -> list[str]:
        problems = []
        for name, host_port in system.metrics.items():
            values = await scrape(host_port)
            if values.get("pool_in_use") != 0:
                problems.append(f"{name}: {values.get('pool_in_use')} pool connections in use")
            if name == "messages" and values.get("streams_open") != 0:
                problems.append(f"messages: {values.get('streams_open')} streams open")
        return problems

    async def connections() -> list[tuple[str, str, str]]:
        return await _busy_connections(system.database_url)

    await _settled("the stream and pool gauges", gauges)
    await _settled("the services' database connections", connections)

    for proc in system.procs.values():
        errors = [i for i, line in enumerate(proc.log) if " ERROR " in line or "Traceback" in line]
        first = "".join(proc.log[errors[0] : errors[0] + 40]) if errors else ""
        assert not errors, f"{proc.name} logged {len(errors)} errors (seed {seed}), first:\n{first}"
    cancelled = sum(
        "StreamThreadMessages code=CANCELLED" in line for line in system.procs["messages"].log
    )
    print(
        f"seed {seed}: streams {dict(tally.streams)}, unary {dict(tally.unary)}, "
        f"events read {tally.events}, server-side CANCELLED stream lines {cancelled}"
    )
