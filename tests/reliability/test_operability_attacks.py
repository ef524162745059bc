"""Issue 17 attacks (operability): hostile trace metadata and a collector that
never answers, against service processes started as `make run` starts them with
tracing on (docs/reliability.md, "Issue 17 attacks (operability)").

- A caller's `baggage` and `tracestate` never reach the log: OpenTelemetry's
  parsers of those headers log every malformed member at WARNING with the
  caller's bytes (up to 180 lines for one call), and gRPC core lets a raw HTTP/2
  client put a newline in a header value, which forged a line of the text log.
  The services read only `traceparent` (services/common/tracing.py).
- A collector that accepts connections and never answers cannot hold a stopping
  process: the spans still buffered get tracing.EXIT_FLUSH_S, not the SDK's 30 s.

Waits are bounded polls, never timing assertions.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
import struct
import uuid
from collections.abc import Iterator

import grpc
import pytest
from chat.v1 import users_pb2, users_pb2_grpc

from devtools.processes import start_service_process
from tests.common.test_tracing import Collector, collector  # noqa: F401 (a fixture)

WAIT_S = 30.0


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out, value = [limit], value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    header = struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
    return header + struct.pack(">I", stream) + payload


async def raw_grpc_call(port: int, method: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """One unary call with an empty request over hand-made HTTP/2 frames: header
    values no gRPC library would send (gRPC core accepts a newline in one)."""
    block = b"".join(
        b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value
        for name, value in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", method.encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *headers,
        ]
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""))
    writer.write(_frame(1, 0x4, 1, block))  # HEADERS, END_HEADERS
    writer.write(_frame(0, 0x1, 1, b"\x00\x00\x00\x00\x00"))  # an empty message, END_STREAM
    writer.write(_frame(4, 0x1, 0, b""))  # SETTINGS ack
    received = b""
    try:
        async with asyncio.timeout(WAIT_S):
            while b"grpc-status" not in received:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received += chunk
    finally:
        writer.close()
    return received


async def test_a_callers_baggage_and_tracestate_never_reach_the_log(
    database_url: str,
    collector: tuple[Collector, int],  # noqa: F811
) -> None:
    receiver, port = collector
    proc = await start_service_process(
        "users",
        database_url,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    channel = grpc.aio.insecure_channel(proc.address)
    trace_id = secrets.token_hex(16)
    try:
        # 170 malformed baggage members and a malformed tracestate member: one
        # WARNING line each with the caller's bytes, before the fix.
        with pytest.raises(grpc.aio.AioRpcError):
            await users_pb2_grpc.UsersServiceStub(channel).GetUser(
                users_pb2.GetUserRequest(id=str(uuid.uuid4())),
                metadata=(
                    ("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"),
                    ("tracestate", "caller-bytes-in-tracestate"),
                    ("baggage", ",".join(f"caller-bytes-{i}" for i in range(170))),
                ),
            )
        # A raw HTTP/2 caller: a newline in baggage forged a line of the text log.
        answer = await raw_grpc_call(
            proc.port,
            "/grpc.health.v1.Health/Check",
            [(b"baggage", b"a=1,x\n2026-01-01 00:00:00,000 ERROR users forged-line,")],
        )
        assert b"grpc-status" in answer
        # The traced call still continues the caller's trace (the one header read).
        await receiver.wait_for(
            "the GetUser server span in the caller's trace",
            lambda r: r.span.trace_id == bytes.fromhex(trace_id),
        )
        await receiver.wait_for(
            "the health check's span", lambda r: r.span.name == "grpc.health.v1.Health/Check"
        )
    finally:
        await channel.close()
        await proc.stop()
    log = "".join(proc.log)
    assert "caller-bytes" not in log and "forged-line" not in log
    assert "opentelemetry.baggage" not in log and "opentelemetry.trace.span" not in log


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def test_a_collector_that_never_answers_cannot_hold_a_stopping_process(
    database_url: str, black_hole: int
) -> None:
    proc = await start_service_process(
        "users",
        database_url,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{black_hole}",
        OTEL_BSP_SCHEDULE_DELAY="100",
        # Every export attempt waits far longer than the exit flush allows.
        OTEL_EXPORTER_OTLP_TIMEOUT="300",
    )
    channel = grpc.aio.insecure_channel(proc.address)
    try:
        stub = users_pb2_grpc.UsersServiceStub(channel)
        for _ in range(20):  # spans to export; the calls themselves are served
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetUser(users_pb2.GetUserRequest(id=str(uuid.uuid4())))
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await channel.close()
    # Before the fix the SDK waited 30 s for its worker, then exited without a word.
    assert await proc.stop(signal.SIGTERM) == 0
    assert any("spans not exported within" in line for line in proc.log), "".join(proc.log[-20:])
