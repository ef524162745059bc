"""The one-line-per-RPC log and RPC_LOG_LEVEL, read from a service process's stderr.

RPC_LOG_LEVEL is the setting under test here, so one process runs with it set
to WARNING and its twin with the defaults (INFO), both as `make run` starts them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from chat.v1 import users_pb2, users_pb2_grpc

from devtools.processes import ServiceProcess, start_service_process
from services.common.interceptors import rpc_log_level
from tests.conftest import health_status

GET_USER = "/chat.v1.UsersService/GetUser"
CREATE_USER = "/chat.v1.UsersService/CreateUser"
LINE_WAIT_S = 30.0


def test_levels_by_status_code() -> None:
    errors = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
    routine = {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}
    for code in grpc.StatusCode:
        if code in errors:
            expected = logging.ERROR
        elif code in routine:
            expected = logging.INFO
        else:
            expected = logging.WARNING
        assert rpc_log_level(code, quiet=False) == expected, code
        # Probes (health, reflection): their routine lines drop to DEBUG, failures do not.
        probe = logging.DEBUG if code in routine else expected
        assert rpc_log_level(code, quiet=True) == probe, code


def _lines(proc: ServiceProcess, method: str) -> list[str]:
    return [line for line in proc.log if f"rpc method={method} " in line]


async def _wait_for_line(proc: ServiceProcess, method: str, code: str) -> str:
    for _ in range(int(LINE_WAIT_S / 0.05)):  # bounded wait for the drained stderr
        for line in _lines(proc, method):
            if f" code={code} " in line:
                return line
        await asyncio.sleep(0.05)
    pytest.fail(f"no {method} {code} line in the log:\n{''.join(proc.log[-20:])}")


@pytest.fixture
async def started_users(
    database_url: str,
) -> AsyncIterator[list[tuple[ServiceProcess, grpc.aio.Channel]]]:
    started: list[tuple[ServiceProcess, grpc.aio.Channel]] = []
    yield started
    for proc, channel in started:
        await channel.close()
        await proc.stop()


async def _start_users(
    database_url: str, started: list[tuple[ServiceProcess, grpc.aio.Channel]], **env: str
) -> tuple[ServiceProcess, users_pb2_grpc.UsersServiceAsyncStub, grpc.aio.Channel]:
    proc = await start_service_process("users", database_url, **env)
    channel = grpc.aio.insecure_channel(proc.address)
    started.append((proc, channel))
    return proc, users_pb2_grpc.UsersServiceStub(channel), channel


async def _ok_then_not_found(stub: users_pb2_grpc.UsersServiceAsyncStub) -> None:
    tag = f"log{uuid.uuid4().hex[:10]}"
    created = await stub.CreateUser(
        users_pb2.CreateUserRequest(user=users_pb2.User(email=f"{tag}@example.com", username=tag))
    )
    await stub.GetUser(users_pb2.GetUserRequest(id=created.user.id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetUser(users_pb2.GetUserRequest(id=str(uuid.uuid4())))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_warning_keeps_only_failures(
    database_url: str, started_users: list[tuple[ServiceProcess, grpc.aio.Channel]]
) -> None:
    proc, stub, _ = await _start_users(database_url, started_users, RPC_LOG_LEVEL="WARNING")
    await _ok_then_not_found(stub)
    line = await _wait_for_line(proc, GET_USER, "NOT_FOUND")
    assert " WARNING users services.rpc: " in line
    # stderr is ordered: the OK calls, made first, would be logged before this line.
    assert not [x for x in _lines(proc, GET_USER) if " code=OK " in x]
    assert not _lines(proc, CREATE_USER)


async def test_defaults_log_every_call_at_its_level(
    database_url: str, started_users: list[tuple[ServiceProcess, grpc.aio.Channel]]
) -> None:
    proc, stub, channel = await _start_users(database_url, started_users)
    assert await health_status(channel) == "SERVING"  # a probe: DEBUG, not logged at INFO
    await _ok_then_not_found(stub)
    failed = await _wait_for_line(proc, GET_USER, "NOT_FOUND")
    assert " WARNING users services.rpc: " in failed
    ok = [x for x in _lines(proc, GET_USER) if " code=OK " in x]
    assert len(ok) == 1 and " INFO users services.rpc: " in ok[0], ok
    assert re.search(r"peer=ipv[46]:", ok[0]), ok[0]
    # Every line of a call carries its request id (generated: the client sent none).
    assert re.search(r" request_id=[0-9a-f]{32}$", ok[0].rstrip()), ok[0]
    created = _lines(proc, CREATE_USER)
    assert len(created) == 1 and " code=OK " in created[0], created
    # The health check came first: had it been logged, its line would be here by now.
    assert not [x for x in proc.log if "grpc.health.v1.Health" in x]
