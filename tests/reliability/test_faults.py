"""Faults under load lose nothing: a database restart, SIGTERM and SIGKILL of services.

Each test runs the three services as OS processes over their own embedded
PostgreSQL, drives sends (with request_id and attachments), thread creation and
resuming streams through them, injects the fault part-way, and then checks that
what callers were told agrees with the database (tests/reliability/load.py).
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
from chat.v1 import (
    messages_pb2_grpc,
    threads_pb2,
    threads_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)

from devtools.processes import ServiceProcess, start_service_process
from tests.postgres import RestartablePostgres, migrate
from tests.reliability.load import (
    RETRYABLE,
    Outcomes,
    StreamLog,
    assert_consistent,
    created_in_order,
    follow,
    send_reliably,
    send_request,
    wait_until_caught_up,
)

WRITERS = 4
SENDS_PER_WRITER = 60  # 240 sends over 3 threads: under the unread cap of 100 each
THREADS = 3
FAULT_AFTER = 80  # acknowledged sends before the fault
NAMES = ("users", "threads", "messages")


@dataclass
class Stack:
    server: RestartablePostgres
    url: str
    procs: dict[str, ServiceProcess]
    channels: list[grpc.aio.Channel]

    @property
    def users(self) -> users_pb2_grpc.UsersServiceAsyncStub:
        return users_pb2_grpc.UsersServiceStub(self.channels[0])

    @property
    def threads(self) -> threads_pb2_grpc.ThreadsServiceAsyncStub:
        return threads_pb2_grpc.ThreadsServiceStub(self.channels[1])

    @property
    def messages(self) -> messages_pb2_grpc.MessagesServiceAsyncStub:
        return messages_pb2_grpc.MessagesServiceStub(self.channels[2])

    async def restart(self, name: str, sig: int) -> int:
        """Stop a service with `sig` and start it again on the same port."""
        old = self.procs[name]
        code = await old.stop(sig)
        self.procs[name] = await start_service_process(name, self.url, GRPC_PORT=str(old.port))
        return code


@asynccontextmanager
async def stack() -> AsyncIterator[Stack]:
    server = RestartablePostgres()
    url = server.url
    procs: dict[str, ServiceProcess] = {}
    channels: list[grpc.aio.Channel] = []
    try:
        await migrate(url)
        for name in NAMES:
            procs[name] = await start_service_process(name, url)
        channels = [grpc.aio.insecure_channel(procs[n].address) for n in NAMES]
        yield Stack(server, url, procs, channels)
    finally:
        for channel in channels:
            await channel.close()
        for proc in procs.values():
            await proc.stop(signal.SIGKILL)
        await server.close()


@asynccontextmanager
async def connection(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


async def _new_user(s: Stack, tag: str) -> str:
    name = f"{tag}{uuid.uuid4().hex[:8]}"
    reply = await s.users.CreateUser(
        users_pb2.CreateUserRequest(user=users_pb2.User(email=f"{name}@x.io", username=name))
    )
    return reply.user.id


async def _retrying(
    call: Callable[..., Awaitable[object]], request: object, outcomes: Outcomes
) -> None:
    """A call without request_id: retried on UNAVAILABLE (it may then exist twice)."""
    for _ in range(600):
        try:
            await call(request, timeout=10)
            outcomes.codes["OK"] += 1
            return
        except grpc.aio.AioRpcError as err:
            outcomes.codes[err.code().name] += 1
            if err.code() not in RETRYABLE:
                raise
            await asyncio.sleep(0.1)
    pytest.fail("a call never succeeded")


async def run_load(s: Stack, fault: Callable[[], Awaitable[None]]) -> Outcomes:
    """Sends, thread creation and streams; `fault` runs after FAULT_AFTER acknowledged sends."""
    writers = [await _new_user(s, "writer") for _ in range(WRITERS)]
    reader = await _new_user(s, "reader")
    outcomes = Outcomes()
    thread_ids, logs = [], []
    for i in range(THREADS):
        created = await s.threads.CreateThread(
            threads_pb2.CreateThreadRequest(
                name=f"room {i}", creator_id=writers[0], participant_ids=[*writers, reader]
            )
        )
        thread_id = created.thread.id
        thread_ids.append(thread_id)
        marker = await send_reliably(
            s.messages, send_request(thread_id, writers[0], "marker"), outcomes
        )
        async with connection(s.url) as conn:
            marker_seq = await conn.fetchval(
                "SELECT seq FROM messages WHERE id = $1", uuid.UUID(marker.id)
            )
        logs += [(StreamLog(thread_id, marker.cursor), who, marker_seq) for who in writers[:2]]
    followers = [asyncio.create_task(follow(s.messages, log, who)) for log, who, _ in logs]

    fault_time = asyncio.Event()

    async def writer(me: str, n: int) -> None:
        for k in range(SENDS_PER_WRITER):
            thread_id = thread_ids[(n + k) % THREADS]
            await send_reliably(s.messages, send_request(thread_id, me, f"w{n}m{k}"), outcomes)
            if len(outcomes.acknowledged) >= FAULT_AFTER:
                fault_time.set()

    writers_done = asyncio.Event()

    async def creator() -> None:
        # Group threads with their participants, all through the run and the fault,
        # for "no thread without its owner".
        k = 0
        while not writers_done.is_set():
            request = threads_pb2.CreateThreadRequest(
                name=f"load {k}", creator_id=writers[1], participant_ids=writers[2:]
            )
            await _retrying(s.threads.CreateThread, request, outcomes)
            k += 1

    async def all_writers() -> None:
        await asyncio.gather(*(writer(w, n) for n, w in enumerate(writers)))
        writers_done.set()

    async def inject() -> None:
        await fault_time.wait()
        await fault()

    try:
        await asyncio.gather(all_writers(), creator(), inject())
        async with connection(s.url) as conn:  # a new one: the database may have restarted
            expected = {
                log.thread_id: await created_in_order(conn, log.thread_id, seq)
                for log, _, seq in logs
            }
        await wait_until_caught_up([log for log, _, _ in logs], expected)
    finally:
        for task in followers:
            task.cancel()
        for task in followers:
            with suppress(asyncio.CancelledError):
                await task
    for log, _, _ in logs:  # every stream: every message once, in commit order
        assert log.created == expected[log.thread_id], log.endings
    async with connection(s.url) as conn:
        await assert_consistent(conn, s.threads, outcomes, thread_ids=thread_ids, reader=reader)
        ownerless = await conn.fetchval(
            """
            SELECT count(*) FROM threads t
            WHERE NOT t.is_direct AND NOT EXISTS (
                SELECT 1 FROM thread_participants p WHERE p.thread_id = t.id AND p.role = 'owner')
            """
        )
        assert ownerless == 0
        incomplete = await conn.fetchval(
            """
            SELECT count(*) FROM threads t
            WHERE t.name LIKE 'load %'
              AND (SELECT count(*) FROM thread_participants p WHERE p.thread_id = t.id) <> $1
            """,
            1 + len(writers[2:]),
        )
        assert incomplete == 0
    assert len(outcomes.acknowledged) == THREADS + WRITERS * SENDS_PER_WRITER
    # Callers saw only successes and the retryable statuses of the fault.
    assert set(outcomes.codes) <= {"OK", *(c.name for c in RETRYABLE)}, outcomes.codes
    endings: Counter[str] = sum((log.endings for log, _, _ in logs), Counter())
    # The figures docs/reliability.md quotes (shown with pytest -s).
    print(
        f"\nfaults: {len(outcomes.acknowledged)} sends acknowledged, "
        f"{len(outcomes.retried)} of them retried; calls by status {dict(outcomes.codes)}; "
        f"{len(logs)} streams, {sum(len(log.created) for log, _, _ in logs)} created events, "
        f"stream endings {dict(endings)}"
    )
    return outcomes


async def test_database_restart_during_load() -> None:
    async with stack() as s:

        async def restart_database() -> None:
            await s.server.stop()
            await asyncio.sleep(1.0)  # the outage: calls in it fail UNAVAILABLE
            await s.server.start()

        outcomes = await run_load(s, restart_database)
    # The outage was real: some calls failed and were retried.
    assert outcomes.codes["UNAVAILABLE"] > 0
    assert outcomes.retried


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_service_restart_during_load(sig: signal.Signals) -> None:
    async with stack() as s:
        exit_codes: list[int] = []

        async def restart_services() -> None:
            for name in ("messages", "threads"):
                exit_codes.append(await s.restart(name, sig))

        outcomes = await run_load(s, restart_services)
    if sig == signal.SIGTERM:
        assert exit_codes == [0, 0]  # graceful: drained within the grace period
    else:
        assert exit_codes == [-signal.SIGKILL] * 2
    assert outcomes.codes["UNAVAILABLE"] > 0


async def test_sigkill_mid_transaction_leaves_no_partial_message() -> None:
    """Sends provably inside their transactions when the service dies."""
    async with stack() as s:
        writer = await _new_user(s, "writer")
        created = await s.threads.CreateThread(
            threads_pb2.CreateThreadRequest(name="locked", creator_id=writer)
        )
        thread_id = created.thread.id
        outcomes = Outcomes()
        requests = [send_request(thread_id, writer, f"m{i}") for i in range(5)]
        async with connection(s.url) as conn:
            # Hold the thread row: every send blocks inside chat_send_message.
            locker = conn.transaction()
            await locker.start()
            await conn.execute(
                "SELECT 1 FROM threads WHERE id = $1 FOR UPDATE", uuid.UUID(thread_id)
            )
            sends = [asyncio.ensure_future(s.messages.SendMessage(r, timeout=60)) for r in requests]
            for _ in range(600):  # bounded wait until a send waits on the row lock
                waiting = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'chat-messages' AND wait_event_type = 'Lock'"
                )
                if waiting:
                    break
                await asyncio.sleep(0.05)
            assert waiting, "no send reached its transaction"
            s.procs["messages"].process.kill()
            for send in sends:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await send
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            await locker.rollback()
            await s.restart("messages", signal.SIGKILL)
            # The callers retry with their request_ids: each is stored exactly once.
            for request in requests:
                await send_reliably(s.messages, request, outcomes)
            counts = await conn.fetch(
                "SELECT m.request_id, count(DISTINCT m.id) AS messages, count(a.id) AS attached "
                "FROM messages m LEFT JOIN message_attachments a ON a.message_id = m.id "
                "WHERE m.thread_id = $1 GROUP BY m.request_id",
                uuid.UUID(thread_id),
            )
            assert {str(r["request_id"]) for r in counts} == {r.request_id for r in requests}
            assert all(r["messages"] == 1 and r["attached"] == 2 for r in counts)
