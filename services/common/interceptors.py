"""The server interceptor every service runs: authenticate, map errors, log.

For every RPC it (1) checks the calling service's bearer token when AUTH_TOKENS
is set, then that the end user named by `x-user-id` may act (the service
passes the check), (2) turns domain errors into gRPC statuses with rich details, database
outages into UNAVAILABLE and anything unexpected into a bare INTERNAL (the cause
is logged, never sent), and (3) logs method, status code and duration.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.common.errors import (
    DomainError,
    Internal,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from services.common.metrics import observe_rpc
from services.common.pool import CONNECTION_ERRORS
from services.common.types import Context

log = logging.getLogger("services.rpc")

# Methods callable without a token even when AUTH_TOKENS is set: probes and tooling.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

STATUS_DETAILS_KEY = "grpc-status-details-bin"

UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]


def _token_matches(presented: str, tokens: Sequence[str]) -> bool:
    # Constant-time comparison against every configured token (no early exit).
    presented_bytes = presented.encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented_bytes, token.encode())
    return matched


CallerCheck = Callable[[Context], Awaitable[None]]


async def _any_caller(context: Context) -> None:
    return None


class Undecodable:
    """Stands in for a request whose bytes do not parse (e.g. a string that is not UTF-8).

    grpcio would answer such a request UNKNOWN with the parser's exception text;
    the behaviour turns it into INVALID_ARGUMENT naming the request instead.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Undecodable(str(exc))

    return decode


def _require_decoded(request: Any) -> None:
    if isinstance(request, Undecodable):
        raise InvalidArgument.field("request", f"cannot be decoded: {request.reason}")


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        tokens: Sequence[str],
        open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES,
        check_caller: CallerCheck = _any_caller,
    ):
        self._tokens = list(tokens)
        self._open_prefixes = tuple(open_prefixes)
        # Runs before every non-open RPC, after the token: e.g. "the end user is active".
        self._check_caller = check_caller

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        needs_token = bool(self._tokens) and not self._is_open(method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, needs_token),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, needs_token),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream, method, needs_token),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler  # client-streaming: not used by this project

    def _is_open(self, method: str) -> bool:
        return method.startswith(self._open_prefixes)

    def _authenticate(self, context: Context) -> None:
        presented = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                presented = value if isinstance(value, str) else value.decode()
        scheme, _, token = presented.partition(" ")
        if scheme.lower() != "bearer" or not _token_matches(token.strip(), self._tokens):
            raise Unauthenticated(
                "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
            )

    def _unary(self, inner: UnaryBehavior, method: str, needs_token: bool) -> UnaryBehavior:
        quiet = self._is_open(method)

        async def behavior(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if not quiet:
                    if needs_token:
                        self._authenticate(context)
                    _require_decoded(request)  # before the caller check's lookup
                    await self._check_caller(context)
                return await inner(request, context)
            except BaseException as exc:
                code, error = _classify(exc, method, context)
                if error is None:
                    raise
                await _abort(context, error)
            finally:
                _log_rpc(method, code, started, context, quiet=quiet)

        return behavior

    def _stream(self, inner: StreamBehavior, method: str, needs_token: bool) -> StreamBehavior:
        quiet = self._is_open(method)

        async def behavior(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if not quiet:
                    if needs_token:
                        self._authenticate(context)
                    _require_decoded(request)  # before the caller check's lookup
                    await self._check_caller(context)
                async for item in inner(request, context):
                    yield item
            except BaseException as exc:
                code, error = _classify(exc, method, context)
                if error is None:
                    raise
                await _abort(context, error)
            finally:
                _log_rpc(method, code, started, context, quiet=quiet)

        return behavior


def _classify(
    exc: BaseException, method: str, context: Context
) -> tuple[grpc.StatusCode, DomainError | None]:
    """The status code `exc` ends the RPC with, and the error to abort with.

    No error means "let it propagate": cancellation, and aborts already made.
    """
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED, None
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN, None
    if isinstance(exc, DomainError):
        return exc.code, exc
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, Unimplemented(f"{method} is not implemented")
    if isinstance(exc, CONNECTION_ERRORS):
        log.warning("database unavailable during %s: %s: %s", method, type(exc).__name__, exc)
        return grpc.StatusCode.UNAVAILABLE, Unavailable(
            "the database is unavailable; retry with backoff"
        )
    if isinstance(exc, Exception):
        log.error("unexpected error in %s", method, exc_info=exc)
        return grpc.StatusCode.INTERNAL, Internal()
    return grpc.StatusCode.UNKNOWN, None


async def _abort(context: Context, error: DomainError) -> None:
    """End the RPC with `error`'s code, message and google.rpc.Status details."""
    await context.abort(
        error.code,
        error.message,
        trailing_metadata=((STATUS_DETAILS_KEY, error.to_status().SerializeToString()),),
    )


def _log_rpc(
    method: str,
    code: grpc.StatusCode,
    started: float,
    context: Context,
    *,
    quiet: bool,
) -> None:
    """One line per RPC; probes (health, reflection) only at DEBUG."""
    elapsed = time.perf_counter() - started
    observe_rpc(method, code.name, elapsed)
    elapsed_ms = elapsed * 1000
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        level = logging.ERROR
    else:
        level = logging.DEBUG if quiet else logging.INFO
    if log.isEnabledFor(level):
        log.log(
            level,
            "rpc method=%s code=%s duration_ms=%.2f peer=%s",
            method,
            code.name,
            elapsed_ms,
            context.peer(),
        )
