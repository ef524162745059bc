"""Deadlines reach the database (issue 17): a call's remaining deadline bounds its
statements, and a statement ends when the caller gave up.

The messages service runs as a real gRPC server over the real PostgreSQL with one
pooled connection (DB_POOL_MAX_SIZE=1), so that the call after a cancelled one
runs on the very connection whose statement was cancelled. Another session holds
a thread's row FOR UPDATE; a SendMessage into that thread waits on it in
PostgreSQL until the client's deadline passes. The lock and statement timeouts
are raised far above the test's bounds, so only the deadline can end that wait.

- The client gets DEADLINE_EXCEEDED; no backend of the service still waits on
  the lock or runs anything, while the row is still held; the same connection
  serves the next call; once the row is free, nothing was written.
- The same when the client can no longer say it gave up (its process frozen
  before its deadline, so no cancellation reaches the server): the server ends
  the call at the deadline on its own.
- Without a deadline, or with one longer than the server's own bounds, those
  bounds end the call as before (ABORTED LOCK_TIMEOUT, DEADLINE_EXCEEDED
  STATEMENT_TIMEOUT): the deadline only ever tightens them.
- A stream with a deadline ends at it, and leaves no stream open on the server.

Nothing asserts a duration: the deadline is an input; polls are bounded
(GUARD_S) only so that a broken build cannot hang.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import grpc
import pytest
from chat.v1 import messages_pb2, messages_pb2_grpc

from services.common.settings import ServiceSettings
from services.messages.service import DEFINITION as MESSAGES
from services.messages.streams.hub import StreamHub
from tests.conftest import running
from tests.factories import new_room
from tests.rpc_errors import error_info

# Far above every bound under test: only a hang (a wait nothing bounds) reaches it.
GUARD_S = 60.0
POLL_S = 0.02
# The client's deadline: short, yet long enough for the send to reach the row lock.
DEADLINE_S = 2.0
APPLICATION = "chat-messages"  # the pool's connections (health and LISTEN have others)


def _settings(database_url: str, **bounds: float) -> ServiceSettings:
    values: dict[str, float] = {"DB_LOCK_TIMEOUT": 600, "DB_STATEMENT_TIMEOUT": 600, **bounds}
    return ServiceSettings(
        DATABASE_URL=database_url,
        GRPC_HOST="127.0.0.1",
        METRICS_PORT=0,
        DB_POOL_MAX_SIZE=1,
        **values,  # type: ignore[arg-type]  # pydantic-settings fields by alias
    )


@asynccontextmanager
async def _database(url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def _holding(url: str, thread_id: str) -> AsyncIterator[int]:
    """Another session holding the thread's row FOR UPDATE until the block ends
    (then it commits); its backend pid."""
    conn = await asyncpg.connect(url, server_settings={"application_name": "chat-test-locker"})
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT 1 FROM threads WHERE id = $1 FOR UPDATE", uuid.UUID(thread_id)
            )
            yield conn.get_server_pid()
    finally:
        await conn.close()


async def _backends(db: asyncpg.Pool, holder: int) -> list[asyncpg.Record]:
    """The service's pooled backends: pid, state, whether the holder blocks them."""
    return await db.fetch(
        "SELECT pid, state, $2 = ANY(pg_blocking_pids(pid)) AS blocked, query "
        "FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
        APPLICATION,
        holder,
    )


def _busy(backends: list[asyncpg.Record]) -> list[asyncpg.Record]:
    """Backends waiting on the lock, running a statement or inside a transaction."""
    return [b for b in backends if b["blocked"] or b["state"] != "idle"]


async def _until_blocked(db: asyncpg.Pool, holder: int) -> int:
    """Poll until a backend of the service waits on the holder's lock; its pid."""
    for _ in range(int(GUARD_S / POLL_S)):
        blocked = [b["pid"] for b in await _backends(db, holder) if b["blocked"]]
        if blocked:
            return int(blocked[0])
        await asyncio.sleep(POLL_S)
    pytest.fail("the send never waited on the row lock in PostgreSQL")


async def _until_quiet(db: asyncpg.Pool, holder: int) -> list[asyncpg.Record]:
    """Poll until no backend of the service is busy; the backends then."""
    backends = await _backends(db, holder)
    for _ in range(int(GUARD_S / POLL_S)):
        if not _busy(backends):
            return backends
        await asyncio.sleep(POLL_S)
        backends = await _backends(db, holder)
    pytest.fail(f"backends of the service still busy after the deadline: {_busy(backends)}")


def _send(room_thread: str, sender: str, request_id: str) -> messages_pb2.SendMessageRequest:
    return messages_pb2.SendMessageRequest(
        thread_id=room_thread, user_id=sender, content="late", request_id=request_id
    )


async def test_a_deadline_ends_the_statement_and_nothing_is_written(database_url: str) -> None:
    async with (
        _database(database_url) as db,
        running(MESSAGES, _settings(database_url)) as (_, channel),
    ):
        locked, other = await new_room(db), await new_room(db)
        stub = messages_pb2_grpc.MessagesServiceStub(channel)
        request_id = str(uuid.uuid4())
        async with _holding(database_url, locked.thread_id) as holder:
            call = asyncio.ensure_future(
                stub.SendMessage(
                    _send(locked.thread_id, locked.owner, request_id), timeout=DEADLINE_S
                )
            )
            waiting = await _until_blocked(db, holder)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The row is still held and the lock timeout is far away: only the
            # deadline can have ended the statement in PostgreSQL.
            backends = await _until_quiet(db, holder)
            assert [b["pid"] for b in backends] == [waiting], backends
            # The pool's one connection, whose statement was cancelled, came back
            # clean (no transaction, no cancel pending) and serves the next call.
            sent = await stub.SendMessage(
                _send(other.thread_id, other.owner, str(uuid.uuid4())), timeout=GUARD_S
            )
            assert sent.message.thread_id == other.thread_id
            assert [b["pid"] for b in await _backends(db, holder)] == [waiting]
        # The row is free: nothing of the cancelled send was written.
        written = await db.fetchval(
            "SELECT count(*) FROM messages WHERE thread_id = $1", uuid.UUID(locked.thread_id)
        )
        assert written == 0
        # ...so its retry (same request_id) writes it, once.
        retried = await stub.SendMessage(_send(locked.thread_id, locked.owner, request_id))
        again = await stub.SendMessage(_send(locked.thread_id, locked.owner, request_id))
        assert retried.message.id == again.message.id
        written = await db.fetchval(
            "SELECT count(*) FROM messages WHERE thread_id = $1", uuid.UUID(locked.thread_id)
        )
        assert written == 1


# A client in its own process, so that it can be frozen (SIGSTOP) mid-call: one
# SendMessage (the serialised request in hex) with a deadline, over a plain channel.
_CLIENT = """
import sys, grpc
call = grpc.insecure_channel(sys.argv[1]).unary_unary("/chat.v1.MessagesService/SendMessage")
try:
    call(bytes.fromhex(sys.argv[2]), timeout=float(sys.argv[3]))
except grpc.RpcError:
    pass
"""


async def test_the_server_ends_the_statement_of_a_client_that_vanished(
    database_url: str,
) -> None:
    async with (
        _database(database_url) as db,
        running(MESSAGES, _settings(database_url)) as (service, _),
    ):
        room = await new_room(db)
        request = _send(room.thread_id, room.owner, str(uuid.uuid4()))
        async with _holding(database_url, room.thread_id) as holder:
            client = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _CLIENT,
                service.address,
                request.SerializeToString().hex(),
                str(DEADLINE_S),
            )
            try:
                await _until_blocked(db, holder)
                # Frozen before its deadline: it can send nothing more (no
                # RST_STREAM), as a client on a dead network path.
                client.send_signal(signal.SIGSTOP)
                await _until_quiet(db, holder)
                assert client.returncode is None  # still frozen, never told the server
            finally:
                client.kill()
                await client.wait()
        written = await db.fetchval(
            "SELECT count(*) FROM messages WHERE thread_id = $1", uuid.UUID(room.thread_id)
        )
        assert written == 0


@pytest.mark.parametrize("deadline", [None, GUARD_S], ids=["no-deadline", "longer-deadline"])
@pytest.mark.parametrize(
    ("bounds", "code", "reason"),
    [
        ({"DB_LOCK_TIMEOUT": 0.5}, grpc.StatusCode.ABORTED, "LOCK_TIMEOUT"),
        (
            {"DB_LOCK_TIMEOUT": 0, "DB_STATEMENT_TIMEOUT": 0.5},
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "STATEMENT_TIMEOUT",
        ),
    ],
    ids=["lock-timeout", "statement-timeout"],
)
async def test_the_server_bounds_still_apply(
    database_url: str,
    deadline: float | None,
    bounds: dict[str, float],
    code: grpc.StatusCode,
    reason: str,
) -> None:
    """A call with no deadline, or a longer one, ends by the server's own bound."""
    async with (
        _database(database_url) as db,
        running(MESSAGES, _settings(database_url, **bounds)) as (_, channel),
    ):
        room = await new_room(db)
        stub = messages_pb2_grpc.MessagesServiceStub(channel)
        async with _holding(database_url, room.thread_id) as holder:
            call = asyncio.ensure_future(
                stub.SendMessage(
                    _send(room.thread_id, room.owner, str(uuid.uuid4())), timeout=deadline
                )
            )
            async with asyncio.timeout(GUARD_S):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
            assert caught.value.code() == code
            assert error_info(caught.value).reason == reason
            await _until_quiet(db, holder)
        written = await db.fetchval(
            "SELECT count(*) FROM messages WHERE thread_id = $1", uuid.UUID(room.thread_id)
        )
        assert written == 0


async def test_a_stream_ends_at_its_deadline_and_leaves_nothing_open(database_url: str) -> None:
    async with (
        _database(database_url) as db,
        running(MESSAGES, _settings(database_url)) as (service, channel),
    ):
        hub = service.runtime.extras["hub"]
        assert isinstance(hub, StreamHub)
        room = await new_room(db)
        stub = messages_pb2_grpc.MessagesServiceStub(channel)
        stream = stub.StreamThreadMessages(
            messages_pb2.StreamThreadMessagesRequest(thread_id=room.thread_id),
            timeout=DEADLINE_S,
        )
        received: list[str] = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for response in stream:
                received.append(str(response.WhichOneof("event")))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert received == ["caught_up"]
        for _ in range(int(GUARD_S / POLL_S)):
            if hub.open_count == 0:
                break
            await asyncio.sleep(POLL_S)
        assert hub.open_count == 0
        # The server serves on, on the same single connection.
        sent = await stub.SendMessage(_send(room.thread_id, room.owner, str(uuid.uuid4())))
        assert sent.message.thread_id == room.thread_id
