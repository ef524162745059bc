"""The shared server runtime over real sockets: errors, auth, identity, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from services.common import identity, interceptors
from services.common.errors import InvalidArgument
from services.common.identity import parse_caller
from services.common.settings import ServiceSettings
from tests.conftest import health_status, running
from tests.probe_service import PROBE, UPLOADS, call
from tests.rpc_errors import error_info, rich_status, violated_fields

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def probe(
    service_settings: ServiceSettings,
) -> AsyncIterator[grpc.aio.Channel]:
    async with running(PROBE, service_settings) as (_, channel):
        yield channel


async def test_success_and_pool(probe: grpc.aio.Channel) -> None:
    assert await call(probe, b"ok") == b"ok"
    assert await call(probe, b"pool") == b"42"


async def test_invalid_argument_names_the_field(probe: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(probe, b"invalid")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == {"name"}
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"
    assert rich_status(caught.value).code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_the_status_trailer_is_the_google_rpc_status(probe: grpc.aio.Channel) -> None:
    """What clients read without grpcio-status: the serialised Status under its key."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(probe, b"invalid")
    trailer = dict(caught.value.trailing_metadata() or ())["grpc-status-details-bin"]
    expected = InvalidArgument.field("name", "is required").to_status().SerializeToString()
    assert trailer == expected


async def test_not_found_carries_resource_info(probe: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(probe, b"missing")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "t-1" in (caught.value.details() or "")


async def test_unexpected_error_is_internal_without_internals(
    probe: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(probe, b"crash")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "internal error"
    assert "hunter2" not in str(caught.value.trailing_metadata())
    # The cause is logged, with the method, for whoever operates the service.
    assert any("/test.Probe/Call" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_database_outage_is_unavailable(probe: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(probe, b"db-down")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "DATABASE_UNAVAILABLE"


async def test_connection_lost_inside_a_transaction_is_unavailable(
    probe: grpc.aio.Channel,
) -> None:
    # asyncpg replaces the connection error with the transaction's InterfaceError.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(probe, b"db-lost-in-transaction")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "DATABASE_UNAVAILABLE"


async def test_stream_errors_are_mapped_after_items(probe: grpc.aio.Channel) -> None:
    method: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = probe.unary_stream(
        "/test.Probe/Stream"
    )
    stream = method(b"", timeout=10)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in stream:
            received.append(item)
    assert received == [b"0", b"1", b"2"]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == {"after"}


async def test_caller_identity_from_metadata(
    probe: grpc.aio.Channel, db_pool: asyncpg.Pool
) -> None:
    user = str(
        await db_pool.fetchval(
            "INSERT INTO users (email, username) VALUES ('who@example.com', 'who') RETURNING id"
        )
    )
    assert await call(probe, b"whoami") == b"trusted"
    assert await call(probe, b"whoami", (("x-user-id", user),)) == user.encode()

    # A caller must be a user that exists and is active, on every RPC.
    unknown = "6f1c3d2e-8a4b-4c5d-9e6f-0a1b2c3d4e5f"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(probe, b"whoami", (("x-user-id", unknown),))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "USER_UNKNOWN"
    await db_pool.execute("UPDATE users SET is_active = false WHERE id = $1", user)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(probe, b"whoami", (("x-user-id", user),))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "USER_INACTIVE"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(probe, b"whoami", (("x-user-id", "not-a-uuid"),))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == {"x-user-id"}


async def test_the_caller_is_parsed_once_per_call(
    probe: grpc.aio.Channel, db_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interceptor parses x-user-id and carries it; the handler reads, never re-parses."""
    user = str(
        await db_pool.fetchval(
            "INSERT INTO users (email, username) VALUES ('once@example.com', 'once') RETURNING id"
        )
    )
    parses: list[object] = []

    def counting(context: object) -> identity.Caller:
        parses.append(context)
        return parse_caller(context)  # type: ignore[arg-type]

    monkeypatch.setattr(identity, "parse_caller", counting)
    monkeypatch.setattr(interceptors, "parse_caller", counting)
    assert await call(probe, b"whoami", (("x-user-id", user),)) == user.encode()
    assert len(parses) == 1
    assert await call(probe, b"whoami") == b"trusted"
    assert len(parses) == 2


async def test_client_streaming_handlers_fail_closed(probe: grpc.aio.Channel) -> None:
    """A handler kind the interceptor does not wrap would skip authentication: refused."""
    method: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = probe.stream_unary(
        "/test.Probe/Upload"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await method(iter([b"a", b"b"]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert UPLOADS == []


async def test_bearer_tokens_required_when_configured(database_url: str) -> None:
    # AUTH_TOKENS is the setting under test (its default, unset, is every other test).
    settings = ServiceSettings(
        DATABASE_URL=database_url, GRPC_HOST="127.0.0.1", AUTH_TOKENS="alpha, beta", METRICS_PORT=0
    )
    async with running(PROBE, settings) as (_, channel):
        for metadata in [(), (("authorization", "Bearer gamma"),), (("authorization", "beta"),)]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(channel, b"ok", metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await call(channel, b"ok", (("authorization", "Bearer beta"),)) == b"ok"
        # Probes stay open so orchestrators can check health without a token.
        assert await health_status(channel) == "SERVING"


async def test_in_flight_call_finishes_during_graceful_stop(
    service_settings: ServiceSettings,
) -> None:
    async with running(PROBE, service_settings) as (service, channel):
        in_flight = asyncio.ensure_future(call(channel, b"slow"))
        await asyncio.sleep(0.2)  # let the call reach the server
        await service.stop(grace=5.0)
        assert await in_flight == b"done"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, b"ok")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def _service_env(database_url: str, **extra: str) -> dict[str, str]:
    # METRICS_PORT=0: no /metrics port shared with parallel test processes.
    return {**os.environ, "DATABASE_URL": database_url, "METRICS_PORT": "0", **extra}


async def test_service_process_serves_and_stops_on_sigterm(database_url: str) -> None:
    port = "0"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.threads",
        cwd=REPO,
        # LOG_LEVEL=INFO is the default, pinned so that a LOG_LEVEL in the caller's
        # environment cannot hide the start-up line this test reads.
        env=_service_env(database_url, GRPC_PORT=port, GRPC_HOST="127.0.0.1", LOG_LEVEL="INFO"),
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    bound = None
    while bound is None:  # the start-up line names the port it bound
        line = (await asyncio.wait_for(proc.stderr.readline(), timeout=60)).decode()
        assert line, "service exited before serving"
        if "serving chat.v1.ThreadsService on port" in line:
            bound = int(line.rsplit(" ", 1)[1])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{bound}") as channel:
        assert await health_status(channel, "chat.v1.ThreadsService") == "SERVING"
    proc.send_signal(signal.SIGTERM)
    rest = await asyncio.wait_for(proc.stderr.read(), timeout=60)
    assert await proc.wait() == 0
    assert b"threads stopped" in rest


@pytest.mark.parametrize(
    "url",
    ["postgresql://nobody@127.0.0.1:1/chat", "not a url", ""],
)
def test_service_with_unreachable_database_exits_with_one_line(url: str) -> None:
    env = _service_env(url, GRPC_PORT="0")
    if not url:
        del env["DATABASE_URL"]
    result = subprocess.run(
        [sys.executable, "-m", "services.users"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("users: error: ")
    assert "Traceback" not in result.stderr
