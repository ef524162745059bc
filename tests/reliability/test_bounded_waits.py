"""Every wait on the database is bounded (issue 14).

The two scenarios of the issue run against the threads service as a separate
process, as `make run` starts it, over the real PostgreSQL:

- a stalled database (a TCP proxy that keeps connections open and forwards
  nothing): calls without a client deadline end UNAVAILABLE or DEADLINE_EXCEEDED
  by the server's own bounds, health goes NOT_SERVING, and once the database
  answers again health is SERVING and calls succeed, without a restart;
- one thread row held FOR UPDATE by another session, and more UpdateThread calls
  on it than the pool has connections: calls about other threads succeed while
  the row is held and before any blocked call ended, health stays SERVING, and
  the blocked calls end ABORTED LOCK_TIMEOUT.

Then each documented outcome of a bound, on in-process servers: the RPC's
deadline ends a database wait, an exhausted pool is UNAVAILABLE DATABASE_BUSY
(health still SERVING), a statement timeout is DEADLINE_EXCEEDED STATEMENT_TIMEOUT.

Nothing asserts a duration: "promptly" is "answered while the blocked calls are
all still waiting"; bounds on waiting (GUARD_S) only keep a broken build from
hanging, far above what the bounds under test allow.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from chat.v1 import threads_pb2, threads_pb2_grpc
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2

from devtools.processes import ServiceProcess, start_service_process
from services.common.settings import ServiceSettings
from services.threads.service import DEFINITION as THREADS
from tests.conftest import health_status, running
from tests.reliability.stall_proxy import StallProxy
from tests.rpc_errors import error_info, rich_status

if TYPE_CHECKING:
    Stub = threads_pb2_grpc.ThreadsServiceAsyncStub

# Far above every bound under test: only a hang (a wait nothing bounds) reaches it.
GUARD_S = 60.0
# The defaults under test (README, "Configuration").
POOL_MAX_SIZE = 20
ROW_LOCK_WAITERS = 4
SERVICE = "chat.v1.ThreadsService"


async def _new_user(conn: asyncpg.Connection) -> str:
    tag = f"b{uuid.uuid4().hex[:12]}"
    user_id = await conn.fetchval(
        "INSERT INTO users (email, username) VALUES ($1 || '@x.io', $1) RETURNING id", tag
    )
    return str(user_id)


async def _new_thread(stub: Stub, creator: str, name: str) -> str:
    reply = await stub.CreateThread(threads_pb2.CreateThreadRequest(name=name, creator_id=creator))
    return reply.thread.id


def _rename(thread_id: str, name: str) -> threads_pb2.UpdateThreadRequest:
    return threads_pb2.UpdateThreadRequest(
        thread=threads_pb2.Thread(id=thread_id, name=name),
        update_mask=field_mask_pb2.FieldMask(paths=["name"]),
    )


def _retry_delay(err: grpc.aio.AioRpcError) -> float | None:
    for detail in rich_status(err).details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


async def _outcomes(calls: Sequence[Awaitable[Any]]) -> list[BaseException | Any]:
    async with asyncio.timeout(GUARD_S):
        return list(await asyncio.gather(*calls, return_exceptions=True))


async def _lock_waiters(conn: asyncpg.Connection, application: str = "chat-threads") -> int:
    """Backends of `application` waiting on a lock. `conn` must not be in a transaction:
    PostgreSQL shows a transaction the same pg_stat_activity snapshot throughout."""
    count = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = $1 "
        "AND wait_event_type = 'Lock'",
        application,
    )
    return int(count)


async def _until_lock_waiters(conn: asyncpg.Connection, wanted: int) -> int:
    """Poll until at least `wanted` service backends wait on a lock; their number."""
    waiting = 0
    for _ in range(int(GUARD_S / 0.02)):
        waiting = await _lock_waiters(conn)
        if waiting >= wanted:
            return waiting
        await asyncio.sleep(0.02)
    pytest.fail(f"only {waiting} calls ever waited on the row lock, expected {wanted}")


async def _until_health(channel: grpc.aio.Channel, wanted: str) -> None:
    for _ in range(int(GUARD_S / 0.05)):
        if await health_status(channel, SERVICE) == wanted:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"health never became {wanted}")


@asynccontextmanager
async def _connection(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def _holding(url: str, thread_ids: list[str]) -> AsyncIterator[asyncpg.Connection]:
    """Another session holding the rows of `thread_ids` FOR UPDATE until the block ends."""
    conn = await asyncpg.connect(url, server_settings={"application_name": "chat-test-locker"})
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT 1 FROM threads WHERE id = ANY($1::uuid[]) FOR UPDATE",
                [uuid.UUID(t) for t in thread_ids],
            )
            yield conn
    finally:
        await conn.close()


class _HealthLog:
    """Health/Check of the service, polled until stopped: every answer, in order."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.seen: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._poll(channel))

    async def _poll(self, channel: grpc.aio.Channel) -> None:
        while not self._stop.is_set():
            self.seen[await health_status(channel, SERVICE)] += 1
            await asyncio.sleep(0.02)

    async def stop(self) -> Counter[str]:
        self._stop.set()
        await self._task
        return self.seen

    @classmethod
    @asynccontextmanager
    async def polling(cls, channel: grpc.aio.Channel) -> AsyncIterator[_HealthLog]:
        log = cls(channel)
        try:
            yield log
        finally:
            await log.stop()


@asynccontextmanager
async def _threads_process(url: str, **env: str) -> AsyncIterator[tuple[ServiceProcess, Stub]]:
    proc = await start_service_process("threads", url, **env)
    channel = grpc.aio.insecure_channel(proc.address)
    try:
        yield proc, threads_pb2_grpc.ThreadsServiceStub(channel)
    finally:
        await channel.close()
        await proc.stop(signal.SIGKILL)


async def test_stalled_database_ends_calls_then_health_then_recovers(database_url: str) -> None:
    proxy = await StallProxy(database_url).start()
    try:
        async with _connection(database_url) as conn:
            user = await _new_user(conn)
        # Every setting is the default except three that only decide how long this
        # test takes: DB_COMMAND_TIMEOUT (6 s by default: DB_STATEMENT_TIMEOUT + 1 s)
        # ends the calls that wait on a stalled statement, and the health probe's
        # interval and timeout (5 s and 2 s: NOT_SERVING after up to 17 s) decide
        # when health notices. Opening a connection (DB_CONNECT_TIMEOUT) and waiting
        # for one (DB_POOL_ACQUIRE_TIMEOUT) keep their defaults of 2 s.
        async with _threads_process(
            proxy.url,
            DB_COMMAND_TIMEOUT="1",
            HEALTH_CHECK_INTERVAL="0.2",
            HEALTH_CHECK_TIMEOUT="0.5",
        ) as (proc, stub):
            channel = grpc.aio.insecure_channel(proc.address)
            thread = await _new_thread(stub, user, "before the stall")
            other = await _new_thread(stub, user, "another")
            assert await health_status(channel, SERVICE) == "SERVING"

            proxy.stall()
            started = time.monotonic()
            # More calls than connections, of every kind (reads, locking writes), none
            # with a client deadline: only the server's own bounds can end them.
            calls: list[Awaitable[Any]] = [
                *(stub.GetThread(threads_pb2.GetThreadRequest(id=other)) for _ in range(20)),
                *(stub.ListThreads(threads_pb2.ListThreadsRequest(user_id=user)) for _ in range(5)),
                *(stub.UpdateThread(_rename(thread, f"stalled {i}")) for i in range(10)),
                stub.MarkRead(threads_pb2.MarkReadRequest(thread_id=thread, user_id=user)),
            ]

            async def not_serving() -> float:
                await _until_health(channel, "NOT_SERVING")
                return time.monotonic() - started

            async def ended() -> float:
                outcomes.extend(await _outcomes(calls))
                return time.monotonic() - started

            outcomes: list[Any] = []
            ended_after, not_serving_after = await asyncio.gather(ended(), not_serving())
            codes: Counter[str] = Counter()
            reasons: Counter[str] = Counter()
            for outcome in outcomes:
                assert isinstance(outcome, grpc.aio.AioRpcError), outcome
                codes[outcome.code().name] += 1
                reasons[error_info(outcome).reason] += 1
            assert set(codes) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, codes
            assert set(reasons) <= {"DATABASE_UNAVAILABLE", "DATABASE_BUSY", "STATEMENT_TIMEOUT"}

            assert await health_status(channel) == "NOT_SERVING"

            proxy.resume()
            await _until_health(channel, "SERVING")
            reply = await stub.GetThread(threads_pb2.GetThreadRequest(id=thread))
            assert reply.thread.name == "before the stall"
            renamed = await stub.UpdateThread(_rename(thread, "after the stall"))
            assert renamed.thread.name == "after the stall"
            await channel.close()
        # The figures docs/reliability.md quotes (shown with pytest -s).
        print(
            f"\nstall: {len(calls)} calls ended {dict(codes)} {dict(reasons)}, the last after "
            f"{ended_after:.1f}s; NOT_SERVING seen after {not_serving_after:.1f}s; "
            f"{proxy.accepted} connections through the proxy"
        )
    finally:
        await proxy.close()


async def test_one_locked_thread_leaves_the_pool_to_other_threads(database_url: str) -> None:
    async with _connection(database_url) as conn:
        user = await _new_user(conn)
    # Defaults, except the health probe's interval and timeout: with 5 s and 2 s no
    # probe might even run while the row is held (DB_LOCK_TIMEOUT, 2 s), and none
    # could fail three times; at 0.1 s and 0.2 s a probe that queued behind a busy
    # pool would turn health NOT_SERVING within the window.
    async with _threads_process(
        database_url, HEALTH_CHECK_INTERVAL="0.1", HEALTH_CHECK_TIMEOUT="0.2"
    ) as (proc, stub):
        channel = grpc.aio.insecure_channel(proc.address)
        locked = await _new_thread(stub, user, "locked")
        other = await _new_thread(stub, user, "other")
        # A warm pool, as under steady traffic: the calls below need not open connections.
        await asyncio.gather(
            *(stub.GetThread(threads_pb2.GetThreadRequest(id=other)) for _ in range(POOL_MAX_SIZE))
        )
        async with (
            _HealthLog.polling(channel) as health,
            _connection(database_url) as observer,
            _holding(database_url, [locked]),
        ):
            blocked = [
                asyncio.ensure_future(stub.UpdateThread(_rename(locked, f"n{i}")))
                for i in range(POOL_MAX_SIZE + 10)
            ]
            # Only DB_ROW_LOCK_WAITERS of them hold a connection to wait on the row.
            assert await _until_lock_waiters(observer, ROW_LOCK_WAITERS) == ROW_LOCK_WAITERS
            got, inbox, unread, overall = await asyncio.gather(
                stub.GetThread(threads_pb2.GetThreadRequest(id=other)),
                stub.ListThreads(threads_pb2.ListThreadsRequest(user_id=user)),
                stub.GetUnreadCount(threads_pb2.GetUnreadCountRequest(user_id=user)),
                health_status(channel),
            )
            # Answered while every blocked call still waits (none has ended, so no
            # connection was freed by a timeout), and the row is still held.
            assert not [call for call in blocked if call.done()]
            assert await _lock_waiters(observer) == ROW_LOCK_WAITERS
            assert got.thread.name == "other"
            assert {t.thread.id for t in inbox.threads} == {locked, other}
            assert unread.total_unread == 0
            assert overall == "SERVING"
            outcomes = await _outcomes(blocked)
        seen = health.seen
        for outcome in outcomes:
            assert isinstance(outcome, grpc.aio.AioRpcError), outcome
            assert outcome.code() == grpc.StatusCode.ABORTED, outcome
            assert error_info(outcome).reason == "LOCK_TIMEOUT"
            assert _retry_delay(outcome) == 1.0
        assert set(seen) == {"SERVING"}, seen
        # The row is free again: the same call succeeds.
        renamed = await stub.UpdateThread(_rename(locked, "free"))
        assert renamed.thread.name == "free"
        await channel.close()
    print(
        f"\nlocked row: {len(blocked)} UpdateThread ended ABORTED LOCK_TIMEOUT, "
        f"{ROW_LOCK_WAITERS} of them waiting in the database; GetThread, ListThreads, "
        f"GetUnreadCount answered meanwhile; {seen['SERVING']} health checks all SERVING"
    )


async def test_the_rpc_deadline_ends_a_database_wait(database_url: str) -> None:
    # DB_LOCK_TIMEOUT and DB_STATEMENT_TIMEOUT are raised so that only the deadline
    # can end the wait below.
    settings = ServiceSettings(
        DATABASE_URL=database_url,
        GRPC_HOST="127.0.0.1",
        METRICS_PORT=0,
        DB_LOCK_TIMEOUT=600,
        DB_STATEMENT_TIMEOUT=600,
    )
    async with (
        _connection(database_url) as conn,
        running(THREADS, settings) as (_, channel),
    ):
        user = await _new_user(conn)
        stub = threads_pb2_grpc.ThreadsServiceStub(channel)
        locked = await _new_thread(stub, user, "locked")
        async with _holding(database_url, [locked]):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.UpdateThread(_rename(locked, "late"), timeout=0.5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The server cancelled the statement: nothing waits on the row any more,
            # although it is still held and the lock timeout is far away.
            for _ in range(int(GUARD_S / 0.02)):
                if await _lock_waiters(conn) == 0:
                    break
                await asyncio.sleep(0.02)
            assert await _lock_waiters(conn) == 0
            reply = await stub.GetThread(threads_pb2.GetThreadRequest(id=locked))
            assert reply.thread.name == "locked"


async def test_an_exhausted_pool_is_database_busy_and_health_stays_serving(
    database_url: str,
) -> None:
    # Five locked threads x DB_ROW_LOCK_WAITERS (4) blocked calls take all 20
    # connections. DB_LOCK_TIMEOUT and DB_STATEMENT_TIMEOUT are raised so that they
    # outlast the acquire timeout under test whatever the machine's load; the health
    # probe runs often enough (0.1 s, 0.2 s timeout) to fail three times while the
    # pool is exhausted, were it queued behind the pool.
    settings = ServiceSettings(
        DATABASE_URL=database_url,
        GRPC_HOST="127.0.0.1",
        METRICS_PORT=0,
        DB_LOCK_TIMEOUT=600,
        DB_STATEMENT_TIMEOUT=600,
        HEALTH_CHECK_INTERVAL=0.1,
        HEALTH_CHECK_TIMEOUT=0.2,
    )
    assert settings.pool_max_size == POOL_MAX_SIZE
    async with (
        _connection(database_url) as conn,
        running(THREADS, settings) as (_, channel),
    ):
        user = await _new_user(conn)
        stub = threads_pb2_grpc.ThreadsServiceStub(channel)
        locked = [await _new_thread(stub, user, f"locked {i}") for i in range(5)]
        other = await _new_thread(stub, user, "other")
        async with _HealthLog.polling(channel) as health, _holding(database_url, locked):
            blocked = [
                asyncio.ensure_future(stub.UpdateThread(_rename(t, f"n{i}")))
                for t in locked
                for i in range(ROW_LOCK_WAITERS)
            ]
            await _until_lock_waiters(conn, POOL_MAX_SIZE)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetThread(threads_pb2.GetThreadRequest(id=other))
            assert not [call for call in blocked if call.done()]
        seen = health.seen
        err = caught.value
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(err).reason == "DATABASE_BUSY"
        assert _retry_delay(err) == 1.0
        assert set(seen) == {"SERVING"}, seen
        # The rows are free: every blocked call went through.
        renamed = await _outcomes(blocked)
        assert all(isinstance(r, threads_pb2.UpdateThreadResponse) for r in renamed), renamed


async def test_a_statement_timeout_is_deadline_exceeded(database_url: str) -> None:
    # The lock timeout is turned off and the statement timeout lowered (5 s by
    # default), so that a statement waiting on a held row runs into the latter.
    settings = ServiceSettings(
        DATABASE_URL=database_url,
        GRPC_HOST="127.0.0.1",
        METRICS_PORT=0,
        DB_LOCK_TIMEOUT=0,
        DB_STATEMENT_TIMEOUT=0.3,
    )
    async with (
        _connection(database_url) as conn,
        running(THREADS, settings) as (_, channel),
    ):
        user = await _new_user(conn)
        stub = threads_pb2_grpc.ThreadsServiceStub(channel)
        locked = await _new_thread(stub, user, "locked")
        async with _holding(database_url, [locked]):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.UpdateThread(_rename(locked, "slow"))
            # The connection survived the cancelled statement: the pool serves on.
            reply = await stub.GetThread(threads_pb2.GetThreadRequest(id=locked))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error_info(caught.value).reason == "STATEMENT_TIMEOUT"
        assert reply.thread.name == "locked"
