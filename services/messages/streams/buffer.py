"""One open stream's buffer: bounded in events and bytes, with its start and its end.

Shared by thread streams (fanout.py) and user streams (users.py). A consumer
that falls too far behind is ended with RESOURCE_EXHAUSTED `STREAM_BUFFER_FULL`
instead of growing memory; it resumes from its cursor. Ending a buffer also
interrupts the RPC it serves, even while that RPC is stuck writing to a client
that does not read (services/common/interrupts.py).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from prometheus_client import Counter

from services.common import interrupts
from services.common.errors import DomainError, ResourceExhausted

DELIVERED = Counter("chat_stream_events_delivered_total", "Events queued to streams")
DROPPED = Counter(
    "chat_stream_events_dropped_total", "Events not delivered because a stream was cut off"
)

REFUSED = Counter(
    "chat_streams_refused_total", "Streams refused because the process was at STREAM_MAX_OPEN"
)
# How long a stream refused at the open-stream limit is told to wait.
RETRY_AFTER_LIMIT_S = 1.0

Item = TypeVar("Item")


def refuse_past_limit(open_now: int, limit: int) -> None:
    """RESOURCE_EXHAUSTED `STREAM_LIMIT` when `open_now` streams of a kind (thread
    or user streams) already fill this process's STREAM_MAX_OPEN."""
    if open_now >= limit:
        REFUSED.inc()
        raise ResourceExhausted(
            f"this server streams at most {limit} at once; retry shortly (or on another replica)",
            reason="STREAM_LIMIT",
            retry_after_s=RETRY_AFTER_LIMIT_S,
        )


class StreamBuffer(Generic[Item]):
    def __init__(self, max_events: int, max_bytes: int) -> None:
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._items: collections.deque[tuple[Item, int]] = collections.deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        # Set while at most half full (events and bytes): room for another batch.
        self._half_empty = asyncio.Event()
        self._half_empty.set()
        self._error: DomainError | None = None
        self._started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # The RPC this buffer serves: ended from here when the buffer ends.
        self._rpc = asyncio.current_task()

    @property
    def ended(self) -> bool:
        return self._error is not None

    async def started(self) -> int:
        """The start position once the stream may begin; raises why it may not."""
        return await self._started

    def start(self, position: int) -> None:
        if not self._started.done():
            self._started.set_result(position)

    def offer(self, item: Item, size: int) -> None:
        """Queue `item` (`size` serialised bytes); one item always fits."""
        if self._error is not None:
            return
        over_bytes = bool(self._items) and self._bytes + size > self._max_bytes
        if len(self._items) >= self._max_events or over_bytes:
            DROPPED.inc(len(self._items) + 1)
            self.end(
                ResourceExhausted(
                    "the stream fell too far behind; reconnect with your last cursor",
                    reason="STREAM_BUFFER_FULL",
                    retry_after_s=0.0,
                )
            )
            return
        self._items.append((item, size))
        self._bytes += size
        DELIVERED.inc()
        self._wake.set()
        if not self._at_most_half_full():
            self._half_empty.clear()

    def _at_most_half_full(self) -> bool:
        return len(self._items) <= self._max_events // 2 and self._bytes <= self._max_bytes // 2

    @property
    def over_half_full(self) -> bool:
        return not self._half_empty.is_set()

    async def half_empty(self) -> None:
        """Return once at most half full (or ended): room for a batch of half a buffer."""
        await self._half_empty.wait()

    def end(self, error: DomainError) -> None:
        """Stop the stream with `error`; buffered items are dropped (the cursor has them)."""
        if self._error is not None:
            return
        self._error = error
        self._items.clear()
        self._bytes = 0
        self._wake.set()
        self._half_empty.set()
        if not self._started.done():
            self._started.set_exception(error)
            self._started.exception()  # retrieved: nobody may be waiting yet
        if self._rpc is not None and self._rpc is not asyncio.current_task():
            interrupts.interrupt(self._rpc, error)

    async def next(self) -> Item:
        while True:
            if self._error is not None:
                raise self._error
            if self._items:
                item, size = self._items.popleft()
                self._bytes -= size
                if self._at_most_half_full():
                    self._half_empty.set()
                return item
            self._wake.clear()
            await self._wake.wait()


async def until_drained(buffers: Iterable[StreamBuffer[Any]], timeout_s: float) -> None:
    """Wait until none of `buffers` is over half full, for at most `timeout_s`:
    between the batches of a backlog, so a stream whose client keeps reading is
    never cut off by it, and one that does not drain holds the others up by at
    most `timeout_s` (it then gets the next batch, and is cut off if it overflows)."""
    waits = [asyncio.ensure_future(b.half_empty()) for b in buffers if b.over_half_full]
    if not waits:
        return
    _, pending = await asyncio.wait(waits, timeout=timeout_s)
    for wait in pending:
        wait.cancel()
