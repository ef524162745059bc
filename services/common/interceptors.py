"""The server interceptor every service runs: authenticate, map errors, log.

For every RPC it (1) checks the calling service's bearer token when AUTH_TOKENS
is set, then that the end user named by `x-user-id` may act (the service
passes the check), (2) turns domain errors into gRPC statuses with rich details, database
outages into UNAVAILABLE, a database wait that ran into its bound into its
documented status (`_bounded_wait_error`) and anything unexpected into a bare
INTERNAL (the cause is logged, never sent), and (3) logs method, status code and
duration.

A call's context is only touched while its RPC is running. grpcio releases the
core call as soon as the RPC's task ends (its `finally` in `_schedule_rpc_coro`
sets the call to NULL), and `context.peer()` on a released call dereferences
NULL: the process dies with SIGSEGV. So everything the log line needs (method,
peer, start time) is captured when the call starts, and server streams are
driven here, as a coroutine that writes with `context.write()`, rather than
handed back to grpcio as an async generator: grpcio leaves an async generator
suspended at its `yield` when the client cancels during a write and the event
loop closes it later, after the call was released, so the generator's
`finally` (this interceptor's log line, the handler's clean-up) ran at an
arbitrary later time on a dead call. Driven here, cancellation arrives inside
this coroutine while the call is alive, and the handler's generator is closed
at once.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import string
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from services.common import interrupts, tracing
from services.common.errors import (
    Aborted,
    DatabaseUnavailable,
    DeadlineExceeded,
    DomainError,
    Internal,
    InvalidArgument,
    Unauthenticated,
    Unimplemented,
)
from services.common.identity import Caller, bound_caller, parse_caller
from services.common.logs import REQUEST_ID
from services.common.metrics import observe_rpc
from services.common.pool import CONNECTION_ERRORS, PoolAcquireTimeout, RowLockWaitTimeout
from services.common.types import Context
from services.common.wire import passing_bytes

log = logging.getLogger("services.rpc")

# Every call has a request id: the caller's, when it is a sane token, or a new
# one. It is sent back in the response headers and is in every log line of the
# call (logs.REQUEST_ID) and on its trace span.
REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_MAX = 128
_REQUEST_ID_CHARS = frozenset(string.ascii_letters + string.digits + "-_.:/+=")


def request_id_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The caller's x-request-id if it is 1..REQUEST_ID_MAX characters of
    [A-Za-z0-9-_.:/+=], else a new one (a log line is no place for arbitrary
    caller bytes)."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            if 0 < len(value) <= REQUEST_ID_MAX and _REQUEST_ID_CHARS.issuperset(value):
                return value
            break
    return uuid.uuid4().hex


# Methods callable without a token even when AUTH_TOKENS is set: probes and tooling.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
# A server-streaming handler either yields its responses (an async generator, as
# the services' servicers do) or writes them with context.write() and returns
# None (a coroutine, as grpcio-health-checking's HealthServicer.Watch does).
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any] | Awaitable[None]]
WriterBehavior = Callable[[Any, Context], Awaitable[None]]


def _token_matches(presented: str, tokens: Sequence[str]) -> bool:
    # Constant-time comparison against every configured token (no early exit).
    presented_bytes = presented.encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented_bytes, token.encode())
    return matched


CallerCheck = Callable[[Caller], Awaitable[None]]


async def _any_caller(caller: Caller) -> None:
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
                response_serializer=passing_bytes(handler.response_serializer),
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, needs_token),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=passing_bytes(handler.response_serializer),
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream, method, needs_token),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=passing_bytes(handler.response_serializer),
            )
        # Client-streaming (unused here) or a kind grpcio may add: a handler this
        # interceptor does not wrap would skip authentication, so it is refused.
        return grpc.stream_unary_rpc_method_handler(
            _refuse_unwrapped(method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

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

    @asynccontextmanager
    async def _admitted(
        self, request: Any, context: Context, needs_token: bool
    ) -> AsyncIterator[None]:
        """Authenticate a call and bind its caller for the rest of the block (every
        handler kind the interceptor wraps goes through here)."""
        if needs_token:
            self._authenticate(context)
        _require_decoded(request)  # before the caller check's lookup
        # The one parse of x-user-id; handlers read it with caller_of().
        with bound_caller(parse_caller(context)) as caller:
            await self._check_caller(caller)
            yield

    async def _serve(
        self,
        method: str,
        request: Any,
        context: Context,
        needs_token: bool,
        run: Callable[[], Awaitable[Any]],
    ) -> Any:
        """Run one call's handler (`run`) admitted, then log it; an error becomes
        its status. The one path of every handler kind the interceptor wraps."""
        quiet = self._is_open(method)
        call = _CallRecord.start(method, context, quiet=quiet)
        code = grpc.StatusCode.OK
        metadata = context.invocation_metadata()
        request_id = request_id_of(metadata)
        REQUEST_ID.set(request_id)  # this call's task only: every log line carries it
        span = tracing.start_rpc(method, metadata)
        try:
            await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
            if quiet:
                return await run()
            async with self._admitted(request, context, needs_token):
                return await run()
        except BaseException as exc:
            # Ended from outside with a status (services/common/interrupts.py),
            # e.g. a stream stuck writing to a client that stopped reading.
            why = interrupts.take(asyncio.current_task())
            if why is not None:
                await _drain_write(asyncio.current_task())
            code, error = _classify(why or exc, method, context)
            code = call.outcome(code)
            if error is None:
                raise
            await _abort(context, error)
        finally:
            _log_rpc(call, code)
            tracing.end_rpc(span, code, request_id)

    def _unary(self, inner: UnaryBehavior, method: str, needs_token: bool) -> UnaryBehavior:
        async def behavior(request: Any, context: Context) -> Any:
            return await self._serve(
                method, request, context, needs_token, lambda: inner(request, context)
            )

        return behavior

    def _stream(self, inner: StreamBehavior, method: str, needs_token: bool) -> WriterBehavior:
        # A coroutine function on purpose (see the module docstring): grpcio then
        # awaits it inside the RPC's task, so a cancellation reaches this frame
        # while the call is alive, and the handler's generator is closed here.
        async def behavior(request: Any, context: Context) -> None:
            await self._serve(
                method,
                request,
                context,
                needs_token,
                lambda: _drive(inner(request, context), context),
            )

        return behavior


def _refuse_unwrapped(method: str) -> Callable[[Any, Context], Awaitable[Any]]:
    async def refuse(requests: Any, context: Context) -> Any:
        log.error("%s has a handler kind the interceptor does not wrap: refused", method)
        await _abort(context, Unimplemented(f"{method} is not served"))

    return refuse


# How long an interrupted stream waits for the write it was cancelled in before
# sending its status (a client that reads finishes it at once; one that stopped
# reading never does, and then the status goes out anyway).
WRITE_DRAIN_S = 1.0
# The write each interrupted task was cancelled in, still under way in gRPC core.
_PENDING_WRITES: weakref.WeakKeyDictionary[asyncio.Task[Any], asyncio.Future[Any]] = (
    weakref.WeakKeyDictionary()
)


async def _write(context: Context, response: Any) -> None:
    """context.write(), whose batch outlives a cancellation of this task.

    A cancelled write is still under way in gRPC core; the first one of a call
    also carries its initial metadata. A status sent before it completes would
    send that metadata a second time, which core refuses
    (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS): the call then ends with no status and
    the client waits for ever. So the write is shielded, and an interrupted stream
    drains it (`_drain_write`) before it aborts.
    """
    write = asyncio.ensure_future(context.write(response))
    try:
        await asyncio.shield(write)
    except asyncio.CancelledError:
        write.add_done_callback(_consume)
        task = asyncio.current_task()
        if task is not None:
            _PENDING_WRITES[task] = write
        raise


def _consume(write: asyncio.Future[Any]) -> None:
    if not write.cancelled():
        write.exception()  # retrieved: a write of a call that ended fails quietly


async def _drain_write(task: asyncio.Task[Any] | None) -> None:
    write = _PENDING_WRITES.pop(task, None) if task is not None else None
    if write is not None and not write.done():
        await asyncio.wait([write], timeout=WRITE_DRAIN_S)


async def _drive(responses: AsyncIterator[Any] | Awaitable[None], context: Context) -> None:
    """Run a streaming handler of either shape to its end, writing what it yields."""
    if inspect.isawaitable(responses):  # writes for itself (context.write)
        await responses
        return
    try:
        async for response in responses:
            await _write(context, response)
    finally:
        # Cancelled while writing: the generator sits at its yield. Close it now,
        # so its clean-up (e.g. leaving the stream hub) runs while the call lives.
        aclose = getattr(responses, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass(frozen=True)
class _CallRecord:
    """What the per-RPC log line needs, captured while the call is certainly alive."""

    method: str
    peer: str
    started: float
    quiet: bool  # a probe (health, reflection): its routine lines go to DEBUG
    deadline: float | None  # perf_counter() time of the caller's deadline, if any

    @classmethod
    def start(cls, method: str, context: Context, *, quiet: bool) -> _CallRecord:
        now = time.perf_counter()
        remaining = context.time_remaining()
        deadline = None if remaining is None else now + remaining
        return cls(method, context.peer(), now, quiet, deadline)

    def outcome(self, code: grpc.StatusCode) -> grpc.StatusCode:
        """The code to report: gRPC cancels the handler when the deadline passes
        (and asyncpg then cancels its statement), which is DEADLINE_EXCEEDED for
        the caller, not a cancellation of theirs."""
        passed = self.deadline is not None and time.perf_counter() >= self.deadline
        if code is grpc.StatusCode.CANCELLED and passed:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return code


def _classify(
    exc: BaseException, method: str, context: Context
) -> tuple[grpc.StatusCode, DomainError | None]:
    """The status code `exc` ends the RPC with, and the error to abort with.

    No error means "let it propagate": cancellation, aborts already made, and
    grpcio's own errors of a call that can no longer be written to. Only an
    abort reads the context (its code, set by the abort that just ran, while the
    RPC is still alive); a cancelled call's context is never touched.
    """
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED, None
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN, None
    if isinstance(exc, grpc.aio.BaseError) and not isinstance(exc, grpc.aio.UsageError):
        # A write or status batch failed under the handler (the client went away,
        # or the server is stopping): nothing more can be sent on this call.
        return grpc.StatusCode.CANCELLED, None
    if isinstance(exc, DomainError):
        return exc.code, exc
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, Unimplemented(f"{method} is not implemented")
    bounded = _bounded_wait_error(exc)
    if bounded is not None:
        cause, error = bounded
        log.warning("%s during %s: %s: %s", error.reason, method, type(cause).__name__, cause)
        return error.code, error
    lost = _connection_error_in(exc)
    if lost is not None:
        log.warning("database unavailable during %s: %s: %s", method, type(lost).__name__, lost)
        return grpc.StatusCode.UNAVAILABLE, DatabaseUnavailable(
            "the database is unavailable; retry with backoff"
        )
    if isinstance(exc, Exception):
        log.error("unexpected error in %s", method, exc_info=exc)
        return grpc.StatusCode.INTERNAL, Internal()
    return grpc.StatusCode.UNKNOWN, None


# The RetryInfo delay of a call refused for a busy pool or a lock not granted in time.
RETRY_AFTER_S = 1.0


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it was raised from or while handling, and so on."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        yield current
        seen.add(id(current))
        current = current.__cause__ or current.__context__


def _bounded_wait_error(exc: BaseException) -> tuple[BaseException, DomainError] | None:
    """The documented status of a database wait that ran into its bound, if `exc` is one.

    A stalled server (no answer within DB_COMMAND_TIMEOUT) and a connection that
    could not be opened in time are outages: `_connection_error_in`.
    """
    for cause in _causes(exc):
        if isinstance(cause, RowLockWaitTimeout) and cause.ahead is not None:
            # Its turn never came: it ends as the call ahead of it did when that
            # one found the database or the pool unavailable, else as a lock timeout.
            ahead = _bounded_wait_error(cause.ahead)
            if ahead is not None and ahead[1].code == grpc.StatusCode.UNAVAILABLE:
                return ahead
            lost = _connection_error_in(cause.ahead)
            if lost is not None:
                return lost, DatabaseUnavailable("the database is unavailable; retry with backoff")
        if isinstance(cause, asyncpg.LockNotAvailableError | RowLockWaitTimeout):
            return cause, Aborted(
                "a row this call needs stayed locked by another transaction "
                "(DB_LOCK_TIMEOUT); nothing was written, retry",
                reason="LOCK_TIMEOUT",
                retry_after_s=RETRY_AFTER_S,
            )
        if isinstance(cause, PoolAcquireTimeout) and cause.busy:
            return cause, DatabaseUnavailable(
                "every database connection of this server is in use "
                "(DB_POOL_ACQUIRE_TIMEOUT); retry with backoff",
                reason="DATABASE_BUSY",
                retry_after_s=RETRY_AFTER_S,
            )
        if isinstance(cause, asyncpg.DeadlockDetectedError | asyncpg.SerializationError):
            # Lock orders are kept (users, then threads in id order), so this is a
            # safety net: PostgreSQL rolled the transaction back, nothing was written.
            return cause, Aborted(
                "this call conflicted with a concurrent one and was rolled back; "
                "nothing was written, retry",
                reason="CONCURRENT_CONFLICT",
                retry_after_s=RETRY_AFTER_S,
            )
        if isinstance(cause, asyncpg.QueryCanceledError) and "statement timeout" in str(cause):
            return cause, DeadlineExceeded(
                "a statement ran longer than the server allows (DB_STATEMENT_TIMEOUT); "
                "nothing was written",
                reason="STATEMENT_TIMEOUT",
            )
    return None


def _connection_error_in(exc: BaseException) -> BaseException | None:
    """`exc` if it is a lost database connection, or the one it was raised while handling.

    A connection that dies inside `async with conn.transaction()` surfaces as the
    transaction's own InterfaceError ("cannot call Transaction.__aexit__(): the
    underlying connection is closed"), raised while the connection error that
    caused it propagated: an outage all the same, not a bug.
    """
    for cause in _causes(exc):
        if isinstance(cause, CONNECTION_ERRORS):
            return cause
    return None


async def _abort(context: Context, error: DomainError) -> None:
    """End the RPC with `error`'s code, message and google.rpc.Status details
    (grpcio-status puts the Status in the `grpc-status-details-bin` trailer)."""
    status = rpc_status.to_status(error.to_status())
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


# Levels of the per-RPC line by status code (RPC_LOG_LEVEL=WARNING keeps only failures).
_ERROR_CODES = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)
_ROUTINE_CODES = frozenset({grpc.StatusCode.OK, grpc.StatusCode.CANCELLED})


def rpc_log_level(code: grpc.StatusCode, *, quiet: bool) -> int:
    """OK and CANCELLED (by the client) at INFO, probes' at DEBUG; every other
    failure at WARNING; INTERNAL, UNKNOWN and DATA_LOSS at ERROR."""
    if code in _ERROR_CODES:
        return logging.ERROR
    if code in _ROUTINE_CODES:
        return logging.DEBUG if quiet else logging.INFO
    return logging.WARNING


def _log_rpc(call: _CallRecord, code: grpc.StatusCode) -> None:
    """One line per RPC, from what was captured at its start (never from its context)."""
    elapsed = time.perf_counter() - call.started
    observe_rpc(call.method, code.name, elapsed)
    level = rpc_log_level(code, quiet=call.quiet)
    if log.isEnabledFor(level):
        log.log(
            level,
            "rpc method=%s code=%s duration_ms=%.2f peer=%s",
            call.method,
            code.name,
            elapsed * 1000,
            call.peer,
            # The same as fields of their own, for LOG_FORMAT=json.
            extra={
                "method": call.method,
                "code": code.name,
                "duration_ms": round(elapsed * 1000, 2),
                "peer": call.peer,
            },
        )
