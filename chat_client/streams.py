"""Followers: async iterators over a thread's or a user's stream that survive disconnects.

The resume contract (services/messages/README.md, "The stream" and "User streams"):
every event carries a cursor, and opening the stream again with `after` set to the
last cursor received replays exactly what came after it, then one `caught_up`,
then live events; no gap, no duplicate. `typing` (user streams) carries no
cursor and is never replayed, so it never moves the resume point.

A follower resumes after UNAVAILABLE (a restart, a shutdown, the database away),
RESOURCE_EXHAUSTED from the server (STREAM_BUFFER_FULL: we fell behind;
STREAM_LIMIT: the process is full, with a RetryInfo), ABORTED, a CANCELLED we did
not ask for, and a stream the server ended without a status. Anything else
(PERMISSION_DENIED, NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION such as
CURSOR_EXPIRED or THREAD_ARCHIVED, UNAUTHENTICATED) is raised as a ChatError:
trying again cannot help, and CURSOR_EXPIRED means the caller must re-read
history (ListThreads / ListMessages) and follow again without `after`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Generic, Literal, Protocol, TypeVar

import grpc
from chat.v1 import messages_pb2, messages_pb2_grpc

from chat_client.backoff import Backoff
from chat_client.errors import ChatError
from chat_client.send import RetryHook

RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
STREAM_BACKOFF = Backoff(initial_s=0.1, max_s=10.0)


class StreamEvent(Protocol):
    """What a follower reads of both streams' responses."""

    @property
    def cursor(self) -> str: ...

    def WhichOneof(self, oneof_group: Literal["event"]) -> str | None: ...


Event = TypeVar("Event", bound=StreamEvent)
# Opens the stream after a cursor ("" = live only).
Opener = Callable[[str], "grpc.aio.UnaryStreamCall[Any, Event]"]


def resumable(error: ChatError) -> bool:
    if error.code not in RESUMABLE:
        return False
    # A RESOURCE_EXHAUSTED gRPC raised here (a response over the receive limit) has
    # no reason and would fail the same way at the same cursor for ever.
    return error.code != grpc.StatusCode.RESOURCE_EXHAUSTED or bool(error.reason_name)


class Follower(Generic[Event]):
    """Iterate with `async for`; every event of the stream is yielded once, in order,
    `caught_up` included (one per (re)connection: live from there on).

    `cursor` is the resume point after the last event yielded (persist it to
    continue in another process). `on_retry(error, delay_s)` is called before each
    reconnect; `max_failures` consecutive failed opens (none reaching `caught_up`)
    raise the last error (default: retry for ever).
    """

    def __init__(
        self,
        open_after: Opener[Event],
        *,
        after: str = "",
        backoff: Backoff = STREAM_BACKOFF,
        on_retry: RetryHook | None = None,
        max_failures: int | None = None,
    ) -> None:
        self._open_after = open_after
        self.cursor = after
        self.backoff = backoff
        self.on_retry = on_retry
        self.max_failures = max_failures
        self.reconnects = 0

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        attempts = self.backoff.start()
        while True:
            call = self._open_after(self.cursor)
            try:
                async for event in call:
                    if event.cursor:
                        self.cursor = event.cursor
                    if event.WhichOneof("event") == "caught_up":
                        attempts.reset()  # this connection worked: start small next time
                    yield event
                # Streams end with a status; an OK end is still a connection lost.
                error = ChatError(grpc.StatusCode.UNAVAILABLE, "the stream ended")
            except grpc.aio.AioRpcError as err:
                error = ChatError.from_rpc_error(err)
            finally:
                call.cancel()  # a no-op once ended; frees the call if the consumer stopped
            if not resumable(error):
                raise error
            delay = attempts.delay_after(error)
            if self.max_failures is not None and attempts.failures >= self.max_failures:
                raise error
            if self.on_retry is not None:
                self.on_retry(error, delay)
            self.reconnects += 1
            await asyncio.sleep(delay)


def follow_thread(
    channel: grpc.aio.Channel,
    thread_id: str,
    *,
    after: str = "",
    metadata: Sequence[tuple[str, str]] | None = None,
    backoff: Backoff = STREAM_BACKOFF,
    on_retry: RetryHook | None = None,
    max_failures: int | None = None,
) -> Follower[messages_pb2.StreamThreadMessagesResponse]:
    """Follow `MessagesService/StreamThreadMessages` of `thread_id` from `after`
    ("" = live only) across disconnects and restarts."""
    stub = messages_pb2_grpc.MessagesServiceStub(channel)

    def open_after(
        cursor: str,
    ) -> grpc.aio.UnaryStreamCall[Any, messages_pb2.StreamThreadMessagesResponse]:
        request = messages_pb2.StreamThreadMessagesRequest(thread_id=thread_id, after=cursor)
        return stub.StreamThreadMessages(request, metadata=metadata)

    return Follower(
        open_after, after=after, backoff=backoff, on_retry=on_retry, max_failures=max_failures
    )


def follow_user(
    channel: grpc.aio.Channel,
    user_id: str,
    *,
    after: str = "",
    metadata: Sequence[tuple[str, str]] | None = None,
    backoff: Backoff = STREAM_BACKOFF,
    on_retry: RetryHook | None = None,
    max_failures: int | None = None,
) -> Follower[messages_pb2.StreamUserEventsResponse]:
    """Follow `MessagesService/StreamUserEvents` of `user_id` (all their threads) from
    `after` ("" = live only) across disconnects and restarts."""
    stub = messages_pb2_grpc.MessagesServiceStub(channel)

    def open_after(
        cursor: str,
    ) -> grpc.aio.UnaryStreamCall[Any, messages_pb2.StreamUserEventsResponse]:
        request = messages_pb2.StreamUserEventsRequest(user_id=user_id, after=cursor)
        return stub.StreamUserEvents(request, metadata=metadata)

    return Follower(
        open_after, after=after, backoff=backoff, on_retry=on_retry, max_failures=max_failures
    )
