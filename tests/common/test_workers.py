"""WORKERS=N: N processes of a service on one port, under a supervisor (services/common/workers.py).

Every test runs `python -m services.<name>` as a real process with real
channels. Which worker served a call is read from the call's log line: each
worker's lines carry `worker=<index>`, the per-RPC line the request id the test
sent. The kernel spreads connections over the workers (SO_REUSEPORT hashes
each connection), so a test opens channels until it has one on every worker,
at most MAX_CHANNELS (with 2 workers, 64 channels all on one worker has odds
of 2^-63). The waits below are bounds, not expectations.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from chat.v1 import admin_pb2, admin_pb2_grpc, messages_pb2, messages_pb2_grpc

from devtools.databases import with_database
from devtools.processes import REPO, ServiceProcess, start_service_process
from services.common.settings import MAX_WORKERS, ServiceSettings
from services.common.workers import WORKER_OWN_CONNECTIONS, connections_needed
from tests.factories import Room, new_room, send
from tests.rpc_errors import error_info

MAX_CHANNELS = 64
BOUND_S = 60.0
# A channel of its own connection: what the README tells clients to do.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
Channels = dict[int, grpc.aio.Channel]


async def served_by(proc: ServiceProcess, request_id: str) -> int:
    """The worker whose per-RPC log line carries `request_id`."""
    pattern = re.compile(rf"worker=(\d+) request_id={re.escape(request_id)}\b")
    deadline = asyncio.get_running_loop().time() + BOUND_S
    while True:
        for line in reversed(proc.log):
            match = pattern.search(line)
            if match:
                return int(match.group(1))
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"no log line for request {request_id} within {BOUND_S:.0f}s")
        await asyncio.sleep(0.05)


async def probe(proc: ServiceProcess, channel: grpc.aio.Channel) -> int:
    """Make a call on `channel` (a trusted AdminService call, which every service
    serves); the worker that served it."""
    request_id = f"probe-{uuid.uuid4().hex}"
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    await stub.GetDatabaseStats(
        admin_pb2.GetDatabaseStatsRequest(),
        metadata=(("x-request-id", request_id),),
        timeout=BOUND_S,
    )
    return await served_by(proc, request_id)


async def one_channel_per_worker(proc: ServiceProcess, workers: int) -> Channels:
    """A channel (its own connection) on each worker; the other channels opened are closed."""
    found: Channels = {}
    for _ in range(MAX_CHANNELS):
        channel = grpc.aio.insecure_channel(proc.address, options=OWN_CONNECTION)
        worker = await probe(proc, channel)
        if worker in found:
            await channel.close()
        else:
            found[worker] = channel
        if len(found) == workers:
            return found
    pytest.fail(f"{MAX_CHANNELS} channels reached workers {sorted(found)} only")


async def close_all(channels: Channels) -> None:
    for channel in channels.values():
        await channel.close()


def worker_pids(proc: ServiceProcess) -> dict[int, int]:
    """Each worker index's latest pid, from the supervisor's `worker i started (pid p)` lines."""
    pids: dict[int, int] = {}
    for line in proc.log:
        match = re.search(r"worker (\d+) started \(pid (\d+)\)", line)
        if match:
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def serving_lines(proc: ServiceProcess) -> list[str]:
    return [line for line in proc.log if re.search(r"serving [\w.]+ on port \d+", line)]


async def until_logged(proc: ServiceProcess, text: str, count: int = 1) -> None:
    deadline = asyncio.get_running_loop().time() + BOUND_S
    while sum(text in line for line in proc.log) < count:
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{text!r} not logged {count} time(s) within {BOUND_S:.0f}s")
        await asyncio.sleep(0.05)


def running(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def open_stream(channel: grpc.aio.Channel, room: Room) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
    return messages_pb2_grpc.MessagesServiceStub(channel).StreamThreadMessages(
        messages_pb2.StreamThreadMessagesRequest(thread_id=room.thread_id)
    )


async def until_caught_up(stream: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
    while True:
        event = await asyncio.wait_for(stream.read(), timeout=BOUND_S)
        assert isinstance(event, messages_pb2.StreamThreadMessagesResponse), event
        if event.WhichOneof("event") == "caught_up":
            return


async def next_created(stream: grpc.aio.UnaryStreamCall) -> str:  # type: ignore[type-arg]
    event = await asyncio.wait_for(stream.read(), timeout=BOUND_S)
    assert isinstance(event, messages_pb2.StreamThreadMessagesResponse), event
    assert event.WhichOneof("event") == "created", event
    return str(event.created.id)


@pytest.fixture
async def users(database_url: str) -> AsyncIterator[ServiceProcess]:
    proc = await start_service_process("users", database_url, WORKERS="2")
    try:
        yield proc
    finally:
        await proc.stop()


@pytest.fixture
async def messages(database_url: str) -> AsyncIterator[ServiceProcess]:
    proc = await start_service_process("messages", database_url, WORKERS="2")
    try:
        yield proc
    finally:
        await proc.stop()


async def test_separate_connections_reach_both_workers_on_one_port(users: ServiceProcess) -> None:
    # The start-up line tools wait for is logged once, by the supervisor, with the shared port.
    [line] = serving_lines(users)
    assert f"on port {users.port} (2 workers)" in line
    pids = worker_pids(users)
    assert sorted(pids) == [1, 2] and len(set(pids.values())) == 2
    channels = await one_channel_per_worker(users, 2)
    await close_all(channels)


async def test_channels_sharing_the_global_subchannel_pool_share_one_worker(
    users: ServiceProcess,
) -> None:
    """What the README warns about: channels with the same options share one connection."""
    channels = [grpc.aio.insecure_channel(users.address) for _ in range(16)]
    try:
        served = {await probe(users, channel) for channel in channels}
    finally:
        for channel in channels:
            await channel.close()
    assert len(served) == 1


async def test_sigterm_ends_every_workers_streams_and_exits_0(
    messages: ServiceProcess, db_pool: asyncpg.Pool
) -> None:
    room = await new_room(db_pool)
    channels = await one_channel_per_worker(messages, 2)
    try:
        streams = {worker: open_stream(channel, room) for worker, channel in channels.items()}
        for stream in streams.values():
            await until_caught_up(stream)
        sent = await send(db_pool, room.thread_id, room.member, "to both workers")
        for stream in streams.values():  # each worker's own hub delivers it
            assert await next_created(stream) == sent
        stopping = asyncio.ensure_future(messages.stop(signal.SIGTERM))
        for stream in streams.values():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(stream.read(), timeout=BOUND_S)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(caught.value).reason == "SHUTTING_DOWN"
        assert await stopping == 0
    finally:
        await close_all(channels)
    for index in (1, 2):
        assert any(
            "messages stopped" in line and f"worker={index}" in line for line in messages.log
        )
    assert all(not running(pid) for pid in worker_pids(messages).values())


async def test_a_crashed_worker_is_replaced_and_the_other_keeps_its_streams(
    messages: ServiceProcess, db_pool: asyncpg.Pool
) -> None:
    room = await new_room(db_pool)
    channels = await one_channel_per_worker(messages, 2)
    try:
        streams = {worker: open_stream(channel, room) for worker, channel in channels.items()}
        for stream in streams.values():
            await until_caught_up(stream)
        crashed = worker_pids(messages)[1]
        os.kill(crashed, signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(streams[1].read(), timeout=BOUND_S)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # resume elsewhere
        await until_logged(messages, "worker 1 ready on port", count=2)
        replacement = worker_pids(messages)[1]
        assert replacement != crashed and running(replacement)
        assert any("worker 1" in line and "replacing it" in line for line in messages.log)
        # Worker 2 and its stream never noticed.
        sent = await send(db_pool, room.thread_id, room.member, "after the crash")
        assert await next_created(streams[2]) == sent
        # The port serves from both workers again.
        await close_all(channels)
        channels = await one_channel_per_worker(messages, 2)
        assert len(serving_lines(messages)) == 1
    finally:
        await close_all(channels)
    assert await messages.stop() == 0


async def test_a_worker_that_cannot_start_stops_the_service(
    database_url: str, db_pool: asyncpg.Pool
) -> None:
    """A replacement that cannot reach its database exits before serving: the service stops, 1."""
    proc = await start_service_process("users", database_url, WORKERS="2")
    name = await db_pool.fetchval("SELECT current_database()")
    admin = await asyncpg.connect(with_database(database_url, "postgres"))
    try:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        survivor = worker_pids(proc)[2]
        os.kill(worker_pids(proc)[1], signal.SIGKILL)
        code = await asyncio.wait_for(proc.process.wait(), timeout=BOUND_S)
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        await admin.close()
        await proc.stop()
    assert code == 1
    assert any("before it served: stopping the service" in line for line in proc.log)
    assert any("users stopped" in line and "worker=2" in line for line in proc.log)
    assert not running(survivor)


async def test_workers_stop_when_the_supervisor_dies(users: ServiceProcess) -> None:
    """SIGKILL of the supervisor closes the workers' lifeline: no orphan keeps the port."""
    pids = worker_pids(users)
    assert await users.stop(signal.SIGKILL) == -signal.SIGKILL
    deadline = asyncio.get_running_loop().time() + BOUND_S
    while any(running(pid) for pid in pids.values()):
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"workers {pids} still running {BOUND_S:.0f}s after the supervisor died")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_second_copy_on_the_same_port_is_refused(
    users: ServiceProcess, database_url: str, workers: str
) -> None:
    """The supervisor's reservation needs a free port: no silent sharing with another copy."""
    with pytest.raises(RuntimeError, match=r"exited \(1\) before serving") as caught:
        await start_service_process(
            "users", database_url, GRPC_PORT=str(users.port), WORKERS=workers
        )
    assert "users: error:" in str(caught.value)


def _run_with(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.users"],
        cwd=REPO,
        env={**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("workers", ["0", str(MAX_WORKERS + 1), "two"])
def test_workers_out_of_bounds_are_refused(workers: str) -> None:
    result = _run_with({"WORKERS": workers, "METRICS_PORT": "0"})
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("users: error: invalid setting WORKERS: ")


def test_worker_metrics_ports_must_exist() -> None:
    result = _run_with({"WORKERS": "3", "METRICS_PORT": "65500"})
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "METRICS_PORT + 100 x (WORKERS - 1) must be at most 65535" in line


def test_worker_metrics_ports_and_connection_budget() -> None:
    # The defaults (model_construct: this process's environment plays no part).
    settings = ServiceSettings.model_construct(workers=3, pool_max_size=10)
    # The services' adjacent default ports (9101..9103) never collide across workers.
    assert [settings.metrics_port_for("users", i) for i in (1, 2, 3)] == [9101, 9201, 9301]
    assert [settings.metrics_port_for("messages", i) for i in (1, 2, 3)] == [9103, 9203, 9303]
    off = ServiceSettings.model_construct(workers=3, metrics_port=0)
    assert off.metrics_port_for("users", 3) == 0
    # N x (DB_POOL_MAX_SIZE + health probe [+ LISTEN connection]).
    assert connections_needed("users", settings) == 3 * (10 + 1)
    assert connections_needed("messages", settings) == 3 * (10 + 2)
    assert set(WORKER_OWN_CONNECTIONS) == {"users", "threads", "messages"}


async def test_too_many_connections_for_the_server_are_warned_about(database_url: str) -> None:
    """2 x (1000 + 1) connections exceed a default max_connections (100): warned, served anyway."""
    proc = await start_service_process("users", database_url, WORKERS="2", DB_POOL_MAX_SIZE="1000")
    try:
        warning = "2 workers x (DB_POOL_MAX_SIZE 1000 + 1 own) = 2002 connections"
        assert any(warning in line for line in proc.log)
    finally:
        assert await proc.stop() == 0
