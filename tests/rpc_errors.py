"""Calling as a user, and reading the rich error details (google.rpc.Status) of failures."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


def rich_status(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status of a failed call, read by grpcio-status (which also
    checks that its code and message are the call's)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is None:
        raise AssertionError(f"{err.code().name} carries no google.rpc.Status details")
    return status


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for detail in rich_status(err).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo in the status details")


def violated_fields(err: grpc.aio.AioRpcError) -> set[str]:
    """Fields named by the BadRequest detail (empty when there is none)."""
    fields: set[str] = set()
    for detail in rich_status(err).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.update(v.field for v in bad.field_violations)
    return fields


def as_user(user_id: str) -> tuple[tuple[str, str], ...]:
    """Metadata that makes a call act for `user_id`."""
    return (("x-user-id", user_id),)


async def error_of(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """The error `call` fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value
