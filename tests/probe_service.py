"""A tiny gRPC service on the shared runtime whose request says how to fail.

Used to test the runtime (interceptor, error mapping, identity, shutdown, health)
over real sockets without depending on any chat service's behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import grpc

from services.common.errors import InvalidArgument, NotFound
from services.common.identity import caller_of
from services.common.server import Runtime, ServiceDefinition
from services.common.statement_names import named
from services.common.types import Context

ANSWER_SQL = named("probe.answer", "SELECT 40 + 2")
SECRET = "postgres://admin:hunter2@db.internal/prod"


def _transaction_exit_on_a_closed_connection() -> None:
    raise asyncpg.InterfaceError(
        "cannot call Transaction.__aexit__(): the underlying connection is closed"
    )


async def _probe(request: bytes, context: Context) -> bytes:
    """One test method whose request says how to behave."""
    if request == b"ok":
        return b"ok"
    if request == b"invalid":
        raise InvalidArgument.field("name", "is required")
    if request == b"missing":
        raise NotFound("thread", "t-1")
    if request == b"crash":
        raise RuntimeError(f"connection string {SECRET}")
    if request == b"db-down":
        raise ConnectionRefusedError("connect call failed")
    if request == b"db-lost-in-transaction":
        # What asyncpg raises when the connection dies inside `conn.transaction()`:
        # the transaction's exit fails while the connection error propagates.
        try:
            raise ConnectionResetError("Connection reset by peer")
        except ConnectionResetError:
            _transaction_exit_on_a_closed_connection()
    if request == b"whoami":
        caller = caller_of(context)
        return str(caller.user_id or "trusted").encode()
    if request == b"slow":
        await asyncio.sleep(1.0)
        return b"done"
    if request == b"pool":
        pool: asyncpg.Pool = PROBE_RUNTIME[-1].pool
        return str(await pool.fetchval(ANSWER_SQL)).encode()
    raise AssertionError(request)


async def _probe_stream(request: bytes, context: Context) -> AsyncIterator[bytes]:
    for i in range(3):
        yield str(i).encode()
    raise InvalidArgument.field("after", "bad cursor")


UPLOADS: list[bytes] = []


async def _probe_upload(requests: AsyncIterator[bytes], context: Context) -> bytes:
    """A client-streaming method: the interceptor does not wrap this kind, so it must
    never run (fail closed), whatever the token or the caller."""
    async for request in requests:
        UPLOADS.append(request)
    return b"uploaded"


PROBE_RUNTIME: list[Runtime] = []


async def _register(server: grpc.aio.Server, runtime: Runtime) -> None:
    PROBE_RUNTIME.append(runtime)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Probe",
                {
                    "Call": grpc.unary_unary_rpc_method_handler(_probe),
                    "Stream": grpc.unary_stream_rpc_method_handler(_probe_stream),
                    "Upload": grpc.stream_unary_rpc_method_handler(_probe_upload),
                },
            ),
        )
    )


PROBE = ServiceDefinition(name="users", full_name="test.Probe", register=_register)


async def call(
    channel: grpc.aio.Channel,
    body: bytes,
    metadata: tuple[tuple[str, str], ...] = (),
    deadline_s: float = 10,
) -> bytes:
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Probe/Call")
    result: bytes = await method(body, metadata=metadata, timeout=deadline_s)
    return result
