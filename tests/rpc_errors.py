"""Calling as a user, and reading the rich error details (google.rpc.Status) of failures."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from services.common.interceptors import STATUS_DETAILS_KEY


def rich_status(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in err.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status()
            status.ParseFromString(value if isinstance(value, bytes) else value.encode())
            return status
    raise AssertionError(f"{err.code().name} carries no google.rpc.Status details")


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
