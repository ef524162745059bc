"""Tracing, end to end: the three services run as processes (as `make run` starts
them) with OTEL_TRACES_EXPORTER=otlp, exporting to a real OTLP/gRPC collector in
this test. A client call carrying a W3C traceparent must come back as a SERVER
span of that trace with the caller's span as parent, each statement as a child
span of it, and the stream's fan-out linked to the send that caused it."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from chat.v1 import messages_pb2, messages_pb2_grpc, threads_pb2, threads_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from devtools.processes import ServiceProcess, start_service_process
from tests.factories import new_user

WAIT_S = 30.0
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
CONSUMER = trace_pb2.Span.SPAN_KIND_CONSUMER


@dataclass(frozen=True)
class Received:
    service: str  # the resource's service.name
    span: trace_pb2.Span


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps every span exported to it."""

    def __init__(self) -> None:
        self.spans: list[Received] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            names = [
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            ]
            for scope in resource_spans.scope_spans:
                self.spans.extend(Received(names[0], span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, what: str, found: Any) -> list[Received]:
        for _ in range(int(WAIT_S / 0.1)):  # bounded: the processes batch their exports
            hits = [r for r in self.spans if found(r)]
            if hits:
                return hits
            await asyncio.sleep(0.1)
        pytest.fail(f"no {what} among {[(r.service, r.span.name) for r in self.spans]}")


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    server = grpc.aio.server()
    receiver = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield receiver, port
    await server.stop(None)


@pytest.fixture
async def traced(
    database_url: str, collector: tuple[Collector, int]
) -> AsyncIterator[dict[str, ServiceProcess]]:
    _, port = collector
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        # Export within a tenth of a second rather than OTel's default 5 s.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "LOG_FORMAT": "json",
    }
    started: dict[str, ServiceProcess] = {}
    try:
        for name in ("threads", "messages"):
            started[name] = await start_service_process(name, database_url, **env)
        yield started
    finally:
        for proc in started.values():
            await proc.stop()


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def test_spans_continue_the_callers_trace_down_to_the_database_and_the_stream(
    traced: dict[str, ServiceProcess], collector: tuple[Collector, int], db_pool: Any
) -> None:
    receiver, _ = collector
    owner, member = await new_user(db_pool), await new_user(db_pool)
    threads_channel = grpc.aio.insecure_channel(traced["threads"].address)
    messages_channel = grpc.aio.insecure_channel(traced["messages"].address)
    try:
        created = await threads_pb2_grpc.ThreadsServiceStub(threads_channel).CreateThread(
            threads_pb2.CreateThreadRequest(
                name="traced", creator_id=owner, participant_ids=[member]
            )
        )
        thread_id = created.thread.id
        messages = messages_pb2_grpc.MessagesServiceStub(messages_channel)
        stream = messages.StreamThreadMessages(
            messages_pb2.StreamThreadMessagesRequest(thread_id=thread_id),
            metadata=(("x-user-id", member),),
        )
        first = await stream.read()
        assert isinstance(first, messages_pb2.StreamThreadMessagesResponse)
        assert first.WhichOneof("event") == "caught_up"
        header, trace_id, caller_span = _traceparent()
        sent = await messages.SendMessage(
            messages_pb2.SendMessageRequest(thread_id=thread_id, user_id=owner, content="hi"),
            metadata=(("traceparent", header),),
        )
        delivered = await stream.read()
        assert isinstance(delivered, messages_pb2.StreamThreadMessagesResponse)
        assert delivered.created.id == sent.message.id
        stream.cancel()
    finally:
        await threads_channel.close()
        await messages_channel.close()

    trace = bytes.fromhex(trace_id)
    (send,) = await receiver.wait_for(
        "SendMessage server span",
        lambda r: r.span.name == "chat.v1.MessagesService/SendMessage" and r.span.trace_id == trace,
    )
    assert send.service == "chat-messages"
    assert send.span.kind == SERVER
    assert send.span.parent_span_id == bytes.fromhex(caller_span)
    attributes = {a.key: a.value for a in send.span.attributes}
    assert attributes["rpc.system"].string_value == "grpc"
    assert attributes["rpc.method"].string_value == "SendMessage"
    assert attributes["rpc.grpc.status_code"].int_value == 0

    statements = await receiver.wait_for(
        "statement spans under SendMessage",
        lambda r: r.span.parent_span_id == send.span.span_id,
    )
    assert all(r.span.kind == CLIENT and r.span.trace_id == trace for r in statements)
    assert any("chat_send_message" in _statement(r.span) for r in statements)

    (fanout,) = await receiver.wait_for(
        "a fan-out span linked to the send",
        lambda r: (
            r.span.name == "chat.stream.fanout"
            and any(link.span_id == send.span.span_id for link in r.span.links)
        ),
    )
    assert fanout.span.kind == CONSUMER
    (link,) = [x for x in fanout.span.links if x.span_id == send.span.span_id]
    assert link.trace_id == trace
    # Its own trace is not the send's: delivery serves many sends and streams.
    assert fanout.span.trace_id != trace

    # The send's log line names its trace and span.
    line = next(
        json.loads(x)
        for x in traced["messages"].log
        if '"chat.v1.MessagesService/SendMessage"' in x or "/SendMessage" in x
    )
    assert line["trace_id"] == trace_id
    assert line["span_id"] == send.span.span_id.hex()


def _statement(span: trace_pb2.Span) -> str:
    for attribute in span.attributes:
        if attribute.key in {"db.statement", "db.query.text"}:
            return str(attribute.value.string_value)
    return ""


async def test_untraced_calls_start_a_trace_of_their_own(
    traced: dict[str, ServiceProcess], collector: tuple[Collector, int], db_pool: Any
) -> None:
    receiver, _ = collector
    user = await new_user(db_pool)
    channel = grpc.aio.insecure_channel(traced["threads"].address)
    try:
        await threads_pb2_grpc.ThreadsServiceStub(channel).GetUnreadCount(
            threads_pb2.GetUnreadCountRequest(user_id=user)
        )
    finally:
        await channel.close()
    (root,) = await receiver.wait_for(
        "GetUnreadCount server span",
        lambda r: r.span.name == "chat.v1.ThreadsService/GetUnreadCount",
    )
    assert root.service == "chat-threads" and root.span.parent_span_id == b""


async def test_a_feed_is_no_part_of_its_first_subscribers_trace(
    traced: dict[str, ServiceProcess], collector: tuple[Collector, int], db_pool: Any
) -> None:
    """A thread's feed serves every stream of the thread: its fan-out spans start
    traces of their own (linked to sends), never as children of the call that
    happened to open the first stream (issue 17 attacks: the feed task used to
    inherit that call's context, its span and its request id)."""
    receiver, _ = collector
    owner, member = await new_user(db_pool), await new_user(db_pool)
    threads_channel = grpc.aio.insecure_channel(traced["threads"].address)
    messages_channel = grpc.aio.insecure_channel(traced["messages"].address)
    try:
        created = await threads_pb2_grpc.ThreadsServiceStub(threads_channel).CreateThread(
            threads_pb2.CreateThreadRequest(name="feed", creator_id=owner, participant_ids=[member])
        )
        header, trace_id, _ = _traceparent()
        stream = messages_pb2_grpc.MessagesServiceStub(messages_channel).StreamThreadMessages(
            messages_pb2.StreamThreadMessagesRequest(thread_id=created.thread.id),
            metadata=(("x-user-id", member), ("traceparent", header)),
        )
        first = await stream.read()
        assert isinstance(first, messages_pb2.StreamThreadMessagesResponse)
        assert first.WhichOneof("event") == "caught_up"
        stream.cancel()
    finally:
        await threads_channel.close()
        await messages_channel.close()

    def of_this_thread(r: Received) -> bool:
        attributes = {a.key: a.value.string_value for a in r.span.attributes}
        return (
            r.span.name == "chat.stream.fanout"
            and attributes.get("chat.thread_id") == created.thread.id
        )

    (fanout,) = await receiver.wait_for("the feed's first fan-out span", of_this_thread)
    assert fanout.span.trace_id != bytes.fromhex(trace_id)
    assert fanout.span.parent_span_id == b""


async def test_statements_outside_any_span_start_no_trace(
    traced: dict[str, ServiceProcess], collector: tuple[Collector, int], db_pool: Any
) -> None:
    """The background loops (the user log sequencer every USER_LOG_TICK, health
    probes, listener heartbeats, the pool's reset of a released connection) run
    statements outside any call: each used to export a root span of its own,
    about 40 traces a second from an idle messages process."""
    receiver, _ = collector
    await asyncio.sleep(1.0)  # let the loops run: ~20 sequencer ticks
    user = await new_user(db_pool)
    channel = grpc.aio.insecure_channel(traced["messages"].address)
    try:
        await messages_pb2_grpc.MessagesServiceStub(channel).ListUserMessages(
            messages_pb2.ListUserMessagesRequest(user_id=user), metadata=(("x-user-id", user),)
        )
    finally:
        await channel.close()
    # Spans are exported in the order they ended: once this call's span is in,
    # every background statement before it would be too.
    (listing,) = await receiver.wait_for(
        "the ListUserMessages span",
        lambda r: r.span.name == "chat.v1.MessagesService/ListUserMessages",
    )
    assert await receiver.wait_for(
        "its statements", lambda r: r.span.parent_span_id == listing.span.span_id
    )
    orphans = [r for r in receiver.spans if r.span.kind == CLIENT and not r.span.parent_span_id]
    assert not orphans, [(r.service, _statement(r.span)) for r in orphans[:5]]
