"""Tracing with OpenTelemetry: off unless OTEL_TRACES_EXPORTER is set.

Configured by the standard variables, read by the SDK and its exporters:
OTEL_TRACES_EXPORTER (`otlp` or `console`; unset or `none`: off),
OTEL_EXPORTER_OTLP_ENDPOINT (and the other OTEL_EXPORTER_OTLP_* variables),
OTEL_SERVICE_NAME (default `chat-<service>`), OTEL_RESOURCE_ATTRIBUTES, the
batch processor's OTEL_BSP_* and the sampler's OTEL_TRACES_SAMPLER(_ARG).

What makes spans:
- One SERVER span per RPC, made by the interceptor's one serving path
  (interceptors.py), continuing the caller's W3C `traceparent`. Not by
  opentelemetry-instrumentation-grpc: its aio server interceptor wraps a
  server-streaming handler in an async generator of its own, the shape this
  server never hands grpcio (interceptors.py, module docstring: a cancelled
  stream's generator is then closed after its call was released), and it
  cannot wrap the interceptor's streaming behaviours, which are coroutines that
  write with context.write(). The interceptor already sees every call's method,
  metadata and final status code, so the span costs a few lines there.
- A CLIENT child span per database statement: opentelemetry-instrumentation-asyncpg.
- A span per stream fan-out of a thread's new messages, linked to the trace of
  each send that caused it (the send's `traceparent` travels in its NOTIFY).

What does not (issue 17 attacks, docs/reliability.md):
- A statement outside any span: the background loops (the user log sequencer
  every USER_LOG_TICK, health probes, listener heartbeats, the pool's reset of a
  released connection) would otherwise each start a trace of their own, ~40 a
  second from an idle messages process. `_statements_inside_spans` drops them.
- The caller's `baggage` and `tracestate`: only `traceparent` is read. The SDK's
  parsers of those two log every malformed member at WARNING, caller bytes and
  all (a raw HTTP/2 client can put a newline there), up to 180 lines per call.

When tracing is off nothing is installed and every helper here returns at once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import Token
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
# Codes that mean the server failed (OpenTelemetry's gRPC conventions); the
# others are the caller's doing and leave the span's status unset.
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

_tracer: trace.Tracer | None = None  # set by configure_tracing when tracing is on
# How long the spans still buffered at exit may take to export: a collector that
# is down or never answers must not hold the process past its shutdown budget
# (the SDK's own bound is 30 s, and OTEL_BSP_EXPORT_TIMEOUT is not used by it).
EXIT_FLUSH_S = 5.0
# The caller's trace context: W3C traceparent only, whatever OTEL_PROPAGATORS says.
_CALLER_CONTEXT = TraceContextTextMapPropagator()


def _statements_inside_spans(configured: Any) -> Any:
    """A sampler that drops a CLIENT span (a database statement) without a parent
    span; every other decision is `configured`'s (OTEL_TRACES_SAMPLER). Built
    here so that a process without tracing never imports the SDK."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class StatementsInsideSpans(Sampler):
        def should_sample(
            self,
            parent_context: otel_context.Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            *args: Any,
            **kwargs: Any,
        ) -> SamplingResult:
            parent = trace.get_current_span(parent_context).get_span_context()
            if kind is SpanKind.CLIENT and not parent.is_valid:
                return SamplingResult(Decision.DROP)
            decision: SamplingResult = configured.should_sample(
                parent_context, trace_id, name, kind, *args, **kwargs
            )
            return decision

        def get_description(self) -> str:
            return f"StatementsInsideSpans{{{configured.get_description()}}}"

    return StatementsInsideSpans()


def enabled() -> bool:
    return _tracer is not None


def configure_tracing(service: str) -> None:
    """Install the SDK when OTEL_TRACES_EXPORTER asks for it (once per process)."""
    global _tracer
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if exporter_name in {"", "none"} or _tracer is not None:
        return
    # Imported only when on: a process without tracing never loads the SDK.
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporter: SpanExporter
    if exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_* configure it
    elif exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: use otlp, console or none")
    # OTEL_SERVICE_NAME, when set, wins over this default (Resource.create reads it).
    default_name = {SERVICE_NAME: f"chat-{service}"}
    if "OTEL_SERVICE_NAME" in os.environ:
        default_name = {}
    provider = TracerProvider(resource=Resource.create(default_name))
    provider.sampler = _statements_inside_spans(provider.sampler)  # before any get_tracer
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    _tracer = provider.get_tracer("chat.services")
    log.info("tracing on: exporter %s", exporter_name)


def shutdown_tracing(timeout_s: float = EXIT_FLUSH_S) -> None:
    """Export what is buffered (at the end of a process), for at most `timeout_s`."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if not enabled() or shutdown is None:
        return
    # The SDK waits up to 30 s for a collector that does not answer; a daemon
    # thread lets the process exit after `timeout_s` whatever the exporter does.
    flushing = threading.Thread(target=shutdown, name="otel-shutdown", daemon=True)
    flushing.start()
    flushing.join(timeout_s)
    if flushing.is_alive():
        log.warning("tracing: spans not exported within %.0f s at exit are dropped", timeout_s)


def _carrier(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """The caller's traceparent (the first), nothing else of its metadata."""
    for key, value in metadata or ():
        if key == TRACEPARENT and isinstance(value, str):
            return {TRACEPARENT: value}
    return {}


@dataclass(frozen=True, slots=True)
class ServerSpan:
    """A call's SERVER span, current (attached) until end_rpc."""

    span: Span
    token: Token[otel_context.Context]


def start_rpc(method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> ServerSpan | None:
    """Start the SERVER span of one RPC and make it current; None when off."""
    if _tracer is None:
        return None
    service, _, name = method.lstrip("/").rpartition("/")
    span = _tracer.start_span(
        method.lstrip("/"),
        context=_CALLER_CONTEXT.extract(_carrier(metadata)),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        record_exception=False,  # the interceptor logs and maps every error
        set_status_on_exception=False,
    )
    return ServerSpan(span, otel_context.attach(trace.set_span_in_context(span)))


def end_rpc(started: ServerSpan | None, code: grpc.StatusCode, request_id: str) -> None:
    """End a call's server span with its final status code."""
    if started is None:
        return
    span = started.span
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.set_attribute("chat.request_id", request_id)
    if code in SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, code.name))
    otel_context.detach(started.token)
    span.end()


def current_traceparent() -> str | None:
    """The current span's W3C traceparent, to carry through the database; None when off."""
    if _tracer is None:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get(TRACEPARENT)


def _link(traceparent: str) -> Link | None:
    context = trace.get_current_span(propagate.extract({TRACEPARENT: traceparent}))
    span_context = context.get_span_context()
    return Link(span_context) if span_context.is_valid else None


@contextmanager
def fanout_span(name: str, causes: Sequence[str], **attributes: Any) -> Iterator[Span | None]:
    """A span for delivering events to streams, linked to the traces of the
    writes that caused them (`causes`: their traceparents); None when off."""
    if _tracer is None:
        yield None
        return
    links = [link for link in map(_link, causes) if link is not None]
    with _tracer.start_as_current_span(
        name, kind=SpanKind.CONSUMER, links=links, attributes=attributes
    ) as span:
        yield span


def log_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span in hex, for log lines; None when off."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
