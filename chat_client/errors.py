"""Failed calls, decoded: the status code, the `chat.v1.ErrorReason`, the fields at fault
and the server's retry hint, read from the `google.rpc.Status` in the call's trailers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

import grpc
from chat.v1 import errors_pb2
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "chat.v1"
_REASON_PREFIX = "ERROR_REASON_"

Reason: TypeAlias = "errors_pb2.ErrorReason.ValueType"


@dataclass(frozen=True)
class FieldViolation:
    """One offending request field (`content`, `attachments[2].url`, `x-user-id`)."""

    field: str
    description: str


@dataclass(frozen=True)
class ResourceInfo:
    """What a NOT_FOUND could not find."""

    resource_type: str
    resource_name: str


@dataclass(eq=False)  # an exception: compared and hashed by identity
class ChatError(Exception):
    """A call the backend refused or could not answer.

    `reason` is the `chat.v1.ErrorReason` value the server named; a reason this
    client does not know yet (a newer server) or a status without details (a
    transport failure, a bare INTERNAL) is ERROR_REASON_UNSPECIFIED, with the
    raw string still in `reason_name`.
    """

    code: grpc.StatusCode
    message: str
    reason: Reason = errors_pb2.ERROR_REASON_UNSPECIFIED
    reason_name: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: tuple[FieldViolation, ...] = ()
    resource: ResourceInfo | None = None
    # google.rpc.RetryInfo: how long the server asks us to wait before retrying.
    retry_delay_s: float | None = None

    def __post_init__(self) -> None:
        super().__init__(f"{self.code.name} {self.reason_name or '-'}: {self.message}")

    @property
    def fields(self) -> set[str]:
        return {v.field for v in self.field_violations}

    @classmethod
    def from_rpc_error(cls, err: grpc.aio.AioRpcError) -> ChatError:
        error = cls(code=err.code(), message=err.details() or "")
        # grpcio-status also checks that the details' code and message are the call's.
        # Its stub types the argument as a sync grpc.Call; an AioRpcError has the
        # same trailing_metadata/code/details it reads.
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        if status is not None:
            for detail in status.details:
                error._absorb(detail)
        error.__cause__ = err
        return error

    def _absorb(self, detail: any_pb2.Any) -> None:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        resource = error_details_pb2.ResourceInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            self.reason_name = info.reason
            self.reason = reason_of(info.reason)
            self.metadata = dict(info.metadata)
        elif detail.Unpack(bad):
            self.field_violations += tuple(
                FieldViolation(v.field, v.description) for v in bad.field_violations
            )
        elif detail.Unpack(retry):
            self.retry_delay_s = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Unpack(resource):
            self.resource = ResourceInfo(resource.resource_type, resource.resource_name)


def reason_of(name: str) -> Reason:
    """The enum value of an ErrorInfo.reason string (ERROR_REASON_UNSPECIFIED if unknown)."""
    try:
        return errors_pb2.ErrorReason.Value(_REASON_PREFIX + name)
    except ValueError:
        return errors_pb2.ERROR_REASON_UNSPECIFIED
