"""LOG_FORMAT=json and request ids, read from a users process started as `make run`
starts it (LOG_FORMAT is the setting under test; the text default is covered in
test_rpc_log.py, where the request id is checked too)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from chat.v1 import users_pb2, users_pb2_grpc

from devtools.processes import ServiceProcess, start_service_process
from services.common.interceptors import REQUEST_ID_HEADER, REQUEST_ID_MAX

GET_USER = "/chat.v1.UsersService/GetUser"
LINE_WAIT_S = 30.0
GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
async def json_users(database_url: str) -> AsyncIterator[tuple[ServiceProcess, grpc.aio.Channel]]:
    proc = await start_service_process("users", database_url, LOG_FORMAT="json")
    channel = grpc.aio.insecure_channel(proc.address)
    yield proc, channel
    await channel.close()
    await proc.stop()


async def _rpc_line(proc: ServiceProcess, request_id: str) -> dict[str, Any]:
    for _ in range(int(LINE_WAIT_S / 0.05)):  # bounded wait for the drained stderr
        for line in proc.log:
            if line.startswith("{") and request_id in line:
                record = json.loads(line)
                if record.get("method") == GET_USER:
                    return dict(record)
        await asyncio.sleep(0.05)
    pytest.fail(f"no GetUser line for {request_id}:\n{''.join(proc.log[-20:])}")


async def _get_user(
    channel: grpc.aio.Channel, user_id: str, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[str, grpc.StatusCode]:
    """The request id the response headers carry, and the call's status code."""
    call = users_pb2_grpc.UsersServiceStub(channel).GetUser(
        users_pb2.GetUserRequest(id=user_id), metadata=metadata
    )
    with contextlib.suppress(grpc.aio.AioRpcError):  # the code is read below
        await call
    headers = dict(await call.initial_metadata() or ())
    return str(headers[REQUEST_ID_HEADER]), await call.code()


async def test_every_line_is_one_json_object(
    json_users: tuple[ServiceProcess, grpc.aio.Channel],
) -> None:
    proc, channel = json_users
    echoed, code = await _get_user(channel, str(uuid.uuid4()), ((REQUEST_ID_HEADER, "req-42"),))
    assert (echoed, code) == ("req-42", grpc.StatusCode.NOT_FOUND)
    record = await _rpc_line(proc, "req-42")
    assert record["request_id"] == "req-42"
    assert record["service"] == "users" and record["level"] == "WARNING"
    assert record["code"] == "NOT_FOUND" and isinstance(record["duration_ms"], float)
    assert record["peer"].startswith(("ipv4:", "ipv6:"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["time"])
    # Every line the process wrote is JSON, the start-up lines included.
    for line in proc.log:
        json.loads(line)


async def test_a_request_id_is_generated_when_absent_or_unfit(
    json_users: tuple[ServiceProcess, grpc.aio.Channel],
) -> None:
    proc, channel = json_users
    # (gRPC clients refuse control characters and non-ASCII in metadata themselves.)
    unfit = ["x" * (REQUEST_ID_MAX + 1), "two words", "a;b", '{"json": 1}']
    seen = set()
    for given in [None, *unfit]:
        metadata = () if given is None else ((REQUEST_ID_HEADER, given),)
        echoed, _ = await _get_user(channel, str(uuid.uuid4()), metadata)
        assert GENERATED.fullmatch(echoed), (given, echoed)
        assert (await _rpc_line(proc, echoed))["request_id"] == echoed
        seen.add(echoed)
    assert len(seen) == 1 + len(unfit)  # a new one each call
    longest = "a" * REQUEST_ID_MAX  # the limit itself is accepted
    echoed, _ = await _get_user(channel, str(uuid.uuid4()), ((REQUEST_ID_HEADER, longest),))
    assert echoed == longest
