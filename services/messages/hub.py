"""Live delivery: one LISTEN connection per process fanning thread events out to streams.

A send (or edit, delete, attachment) commits and NOTIFYs `chat_thread_events`
with "thread_id:position". The hub keeps one feed per thread that has open
streams in this process; for a batch of notifications it fetches each thread's
new rows once (not once per subscriber) and offers them to every subscriber's
bounded queue. A subscriber that falls `stream_buffer` events behind is ended
with RESOURCE_EXHAUSTED instead of growing memory; it resumes from its cursor.
If the listening connection drops, the hub reconnects and re-fetches every feed
from its last position, so nothing committed meanwhile is lost. A
`chat_membership` notification ends the streams of a removed participant (or
all streams of a deleted thread) with NOT_FOUND, and every stream of a user who
was deactivated or deleted with PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any
from uuid import UUID

import asyncpg
from prometheus_client import Counter, Gauge

from services.common import channels
from services.common.errors import DomainError, NotFound, ResourceExhausted, Unavailable
from services.common.identity import user_inactive
from services.common.pool import QUERY_FAILURES, connect
from services.common.settings import DatabaseSettings
from services.messages import store
from services.messages.settings import MessagesSettings

log = logging.getLogger(__name__)

OPEN_STREAMS = Gauge("chat_streams_open", "Open StreamThreadMessages streams")
DELIVERED = Counter("chat_stream_events_delivered_total", "Events queued to streams")
DROPPED = Counter(
    "chat_stream_events_dropped_total", "Events not delivered because a stream was cut off"
)


class Subscription:
    """One open stream's bounded queue of events (None marks its end)."""

    def __init__(self, thread_id: UUID, user_id: UUID | None, buffer: int) -> None:
        self.thread_id = thread_id
        self.user_id = user_id
        self._queue: asyncio.Queue[store.ThreadEvent | None] = asyncio.Queue(maxsize=buffer)
        self._error: DomainError | None = None
        self.start_seq = 0  # the feed's position when this subscription joined
        self.active = False  # joined: events after start_seq reach the queue

    def offer(self, event: store.ThreadEvent) -> None:
        if self._error is not None:
            return
        try:
            self._queue.put_nowait(event)
            DELIVERED.inc()
        except asyncio.QueueFull:
            DROPPED.inc(self._queue.qsize() + 1)
            self.end(
                ResourceExhausted(
                    "the stream fell too far behind; reconnect with your last cursor",
                    reason="STREAM_BUFFER_FULL",
                )
            )

    def end(self, error: DomainError) -> None:
        """Stop the stream with `error`; queued events are dropped (the cursor has them)."""
        if self._error is not None:
            return
        self._error = error
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def next(self) -> store.ThreadEvent:
        event = await self._queue.get()
        if event is None:
            assert self._error is not None
            raise self._error
        return event


class _Feed:
    def __init__(self, thread_id: UUID) -> None:
        self.thread_id = thread_id
        self.position: int | None = None  # last position fetched for this thread
        self.subscribers: set[Subscription] = set()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.opening: asyncio.Task[None] | None = None


class StreamHub:
    def __init__(
        self, pool: asyncpg.Pool, database: DatabaseSettings, settings: MessagesSettings
    ) -> None:
        self._pool = pool
        self._database = database
        self._settings = settings
        self._feeds: dict[UUID, _Feed] = {}
        self._pending: set[UUID] = set()
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._listener_lost = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        await self._listen()
        self._tasks = [
            asyncio.create_task(self._pump(), name="stream-hub-pump"),
            asyncio.create_task(self._supervise(), name="stream-hub-listener"),
        ]

    async def end_all(self, error: DomainError) -> None:
        for feed in self._feeds.values():
            for sub in feed.subscribers:
                sub.end(error)

    async def stop(self) -> None:
        await self.end_all(Unavailable("the server is shutting down; resume from your cursor"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None and not self._listener.is_closed():
            await self._listener.close()

    @property
    def subscriber_count(self) -> int:
        """Subscriptions that have joined (events after their start reach them)."""
        return sum(sub.active for feed in self._feeds.values() for sub in feed.subscribers)

    @property
    def feed_count(self) -> int:
        return len(self._feeds)

    # -- subscriptions -------------------------------------------------------

    async def subscribe(self, thread_id: UUID, user_id: UUID | None) -> Subscription:
        feed = self._feeds.get(thread_id)
        if feed is None:
            feed = _Feed(thread_id)
            self._feeds[thread_id] = feed
            feed.opening = asyncio.create_task(self._open_feed(feed), name=f"feed-{thread_id}")
        sub = Subscription(thread_id, user_id, self._settings.stream_buffer)
        feed.subscribers.add(sub)
        OPEN_STREAMS.inc()
        try:
            await asyncio.shield(feed.ready)
        except BaseException:
            self.unsubscribe(sub)
            raise
        assert feed.position is not None
        sub.start_seq = feed.position
        sub.active = True
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        feed = self._feeds.get(sub.thread_id)
        if feed is None or sub not in feed.subscribers:
            return
        feed.subscribers.discard(sub)
        OPEN_STREAMS.dec()
        if not feed.subscribers:
            del self._feeds[sub.thread_id]

    async def _open_feed(self, feed: _Feed) -> None:
        try:
            async with self._pool.acquire() as conn:
                position = await store.last_seq(conn, feed.thread_id)
            feed.position = position or 0
            feed.ready.set_result(None)
        except BaseException as exc:  # handed to every waiting subscriber
            if self._feeds.get(feed.thread_id) is feed:
                del self._feeds[feed.thread_id]
            if not feed.ready.done():
                feed.ready.set_exception(exc)
            feed.ready.exception()  # retrieved: a feed nobody waits for must not warn
            if isinstance(exc, asyncio.CancelledError):
                raise

    # -- notifications -------------------------------------------------------

    async def _listen(self) -> None:
        conn = await connect(self._database, application_name="chat-messages-listener")
        await conn.add_listener(channels.THREAD_EVENTS, self._on_event)
        await conn.add_listener(channels.MEMBERSHIP, self._on_membership)
        conn.add_termination_listener(lambda _: self._listener_lost.set())
        self._listener = conn
        self._listener_lost.clear()

    def _on_event(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        thread, _, _ = str(payload).partition(":")
        try:
            thread_id = UUID(thread)
        except ValueError:
            log.warning("ignoring malformed notification %r", payload)
            return
        if thread_id in self._feeds:
            self._pending.add(thread_id)
            self._wake.set()

    def _on_membership(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        try:
            change = json.loads(str(payload))
            thread_id = UUID(change["thread_id"]) if change.get("thread_id") else None
            user_id = UUID(change["user_id"]) if change.get("user_id") else None
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed membership notification %r", payload)
            return
        if thread_id is None:  # the user was deactivated or deleted: every thread
            if user_id is not None:
                gone = user_inactive(user_id)
                for each in self._feeds.values():
                    for sub in list(each.subscribers):
                        if sub.user_id == user_id:
                            sub.end(gone)
            return
        feed = self._feeds.get(thread_id)
        if feed is None:
            return
        for sub in list(feed.subscribers):
            if user_id is None or sub.user_id == user_id:
                sub.end(NotFound("thread", str(thread_id)))

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, set()
            for thread_id in batch:
                feed = self._feeds.get(thread_id)
                if feed is None or feed.position is None:
                    continue
                try:
                    await self._fetch(feed)
                except QUERY_FAILURES as exc:
                    log.warning("fetching events of %s failed (%s); retrying", thread_id, exc)
                    self._pending.add(thread_id)
                    await asyncio.sleep(self._settings.listener_retry_s)
                    self._wake.set()

    async def _fetch(self, feed: _Feed) -> None:
        """Everything after the feed's position, once, offered to every subscriber."""
        batch = self._settings.stream_fetch_batch
        while True:
            assert feed.position is not None
            async with self._pool.acquire() as conn:
                events = await store.events_after(conn, feed.thread_id, feed.position, batch)
            for event in events:
                feed.position = event.position
                for sub in list(feed.subscribers):
                    sub.offer(event)
            if len(events) < batch:
                return

    async def _supervise(self) -> None:
        """Re-open a dropped listening connection, then catch every feed up."""
        while True:
            await self._listener_lost.wait()
            log.warning("listening connection lost; reconnecting")
            while True:
                await asyncio.sleep(self._settings.listener_retry_s)
                with contextlib.suppress(*QUERY_FAILURES):
                    await self._listen()
                    break
            log.info("listening again; catching up %d thread feed(s)", len(self._feeds))
            self._pending |= set(self._feeds)
            self._wake.set()
