"""Domain errors and their one mapping to gRPC status codes with rich details.

Servicers and stores raise these; the error interceptor turns each into a gRPC
status carrying a `google.rpc.Status` (grpcio-status) with `ErrorInfo` (a stable
reason) and, for invalid input, `BadRequest` field violations naming the fields.
Anything else becomes INTERNAL with a generic message; the cause is only logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "chat.v1"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base of every error a caller is meant to see."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    # The reason when none is given: the status code's name, unless a class names
    # a more precise one (each reason is listed in protos/chat/v1/errors.proto).
    default_reason = "UNKNOWN"

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        if "default_reason" not in cls.__dict__:
            cls.default_reason = cls.code.name

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = metadata or {}

    def extra_details(self) -> Iterable[object]:
        return ()

    def to_status(self) -> status_pb2.Status:
        details = [
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
            ),
            *self.extra_details(),
        ]
        packed = []
        for detail in details:
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=packed
        )


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        message: str | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        self.violations = list(violations)
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message or f"invalid request: {summary}", reason=reason)

    @classmethod
    def field(cls, field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        return cls([FieldViolation(field, description)], reason=reason)

    def extra_details(self) -> Iterable[object]:
        yield error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in self.violations
            ]
        )


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, resource_type: str, resource_name: str, message: str | None = None) -> None:
        self.resource_type = resource_type
        self.resource_name = resource_name
        super().__init__(message or f"{resource_type} {resource_name} not found")

    def extra_details(self) -> Iterable[object]:
        yield error_details_pb2.ResourceInfo(
            resource_type=self.resource_type, resource_name=self.resource_name
        )


class AlreadyExists(DomainError):
    """A unique value is taken; `field` names the request field that collided."""

    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, field: str, message: str | None = None) -> None:
        self.field = field
        super().__init__(message or f"{field} is already taken", metadata={"field": field})

    def extra_details(self) -> Iterable[object]:
        yield error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=self.field, description="already exists"
                )
            ]
        )


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, *, reason: str | None = None, subject: str = "") -> None:
        self.subject = subject
        super().__init__(message, reason=reason)

    def extra_details(self) -> Iterable[object]:
        yield error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=self.reason, subject=self.subject, description=self.message
                )
            ]
        )


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED


class _Retryable(DomainError):
    """An error the client retries: `retry_after_s` adds a google.rpc.RetryInfo hint."""

    def __init__(
        self, message: str, *, reason: str | None = None, retry_after_s: float | None = None
    ) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, reason=reason)

    def extra_details(self) -> Iterable[object]:
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            yield error_details_pb2.RetryInfo(retry_delay=delay)


class ResourceExhausted(_Retryable):
    """A limit was hit; `retry_after_s` adds a google.rpc.RetryInfo hint."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(_Retryable):
    """Retry with backoff; `retry_after_s` adds a google.rpc.RetryInfo hint.

    The reason says why: DatabaseUnavailable and ShuttingDown below, or one given.
    """

    code = grpc.StatusCode.UNAVAILABLE


class DatabaseUnavailable(Unavailable):
    """The database did not answer (down, stalled or unreachable)."""

    default_reason = "DATABASE_UNAVAILABLE"


class ShuttingDown(Unavailable):
    """This server is stopping: retry on another replica, or resume a stream."""

    default_reason = "SHUTTING_DOWN"


class Aborted(_Retryable):
    """A concurrency conflict (e.g. a row lock not granted in time): nothing was
    written; retry the call, after `retry_after_s` (a google.rpc.RetryInfo)."""

    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(DomainError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(DomainError):
    """What every unexpected failure becomes: no internals in the message."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self) -> None:
        super().__init__("internal error")
