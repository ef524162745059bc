"""Live delivery: one LISTEN connection per process fanning thread events out to streams.

A send (or edit, delete, attachment, removal) commits and NOTIFYs
`chat_thread_events` with "thread_id:position". The hub keeps one feed per
thread that has open streams in this process; when a thread has news it
fetches the new events once (not once per subscriber) and offers them to every
subscriber's bounded buffer. A subscriber that falls too far behind (events or
bytes) is ended with RESOURCE_EXHAUSTED instead of growing memory; it resumes
from its cursor.

Who may still read is decided by the database, never by a notification alone.
Every fetch reads the events first and the subscribers' access second (thread
exists, not archived, each user a participant and active). Whatever committed
after a removal is only visible in a snapshot that also shows the removal, so
the later access read catches it: nothing committed after a removal reaches
the removed user, whether or not its `chat_membership` notification arrived.
That notification only makes the re-check happen at once; after the listening
connection is re-opened (notifications in between are lost) every feed is
re-checked and caught up.

The listening connection is probed with a heartbeat; a probe that fails or
stays unanswered marks it dead (a blackholed TCP connection raises nothing),
and it is re-opened with exponential backoff and jitter. Fetches of different
threads run side by side (bounded), and a failed fetch retries that thread
alone, with backoff.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Iterable
from typing import Any
from uuid import UUID

import asyncpg
from prometheus_client import Counter, Gauge

from services.common import channels, interrupts
from services.common.errors import DomainError, ResourceExhausted, Unavailable
from services.common.pool import QUERY_FAILURES, connect
from services.common.settings import DatabaseSettings
from services.messages import store
from services.messages.convert import StreamEvent, stream_event
from services.messages.policy import stream_refusal
from services.messages.settings import MessagesSettings

log = logging.getLogger(__name__)

OPEN_STREAMS = Gauge("chat_streams_open", "Open StreamThreadMessages streams")
DELIVERED = Counter("chat_stream_events_delivered_total", "Events queued to streams")
DROPPED = Counter(
    "chat_stream_events_dropped_total", "Events not delivered because a stream was cut off"
)
REFUSED = Counter(
    "chat_streams_refused_total", "Streams refused because the process was at STREAM_MAX_OPEN"
)
LISTENER_RECONNECTS = Counter(
    "chat_stream_listener_reconnects_total", "Times the LISTEN connection was re-opened"
)

# A listening connection that fails like this is replaced.
_LISTENER_FAILURES: tuple[type[BaseException], ...] = (TimeoutError, OSError, *QUERY_FAILURES)

# How long a stream refused at the open-stream limit is told to wait.
RETRY_AFTER_LIMIT_S = 1.0


class Subscription:
    """One open stream's buffer, bounded in events and in bytes, and how it ended."""

    def __init__(
        self, thread_id: UUID, user_id: UUID | None, max_events: int, max_bytes: int
    ) -> None:
        self.thread_id = thread_id
        self.user_id = user_id
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._events: collections.deque[StreamEvent] = collections.deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self._error: DomainError | None = None
        # The feed's position when this subscription joined: every event after it
        # is offered here. Set once, when the feed knows its position.
        self.start_seq: int | None = None
        self.started = asyncio.get_running_loop().create_future()
        # The RPC this subscription serves: ended from here when the subscription
        # ends, even while it is stuck writing to a client that does not read.
        self._rpc = asyncio.current_task()

    @property
    def ended(self) -> bool:
        return self._error is not None

    def _start(self, position: int) -> None:
        if self.start_seq is None:
            self.start_seq = position
            if not self.started.done():
                self.started.set_result(None)

    def offer(self, event: StreamEvent) -> None:
        if self._error is not None:
            return
        over_bytes = bool(self._events) and self._bytes + event.size > self._max_bytes
        if len(self._events) >= self._max_events or over_bytes:  # one event always fits
            DROPPED.inc(len(self._events) + 1)
            self.end(
                ResourceExhausted(
                    "the stream fell too far behind; reconnect with your last cursor",
                    reason="STREAM_BUFFER_FULL",
                    retry_after_s=0.0,
                )
            )
            return
        self._events.append(event)
        self._bytes += event.size
        DELIVERED.inc()
        self._wake.set()

    def end(self, error: DomainError) -> None:
        """Stop the stream with `error`; buffered events are dropped (the cursor has them)."""
        if self._error is not None:
            return
        self._error = error
        self._events.clear()
        self._bytes = 0
        self._wake.set()
        if not self.started.done():
            self.started.set_exception(error)
            self.started.exception()  # retrieved: nobody may be waiting yet
        if self._rpc is not None and self._rpc is not asyncio.current_task():
            interrupts.interrupt(self._rpc, error)

    async def next(self) -> StreamEvent:
        while True:
            if self._error is not None:
                raise self._error
            if self._events:
                event = self._events.popleft()
                self._bytes -= event.size
                return event
            self._wake.clear()
            await self._wake.wait()


class _Feed:
    """One thread's live events in this process, shared by its subscribers."""

    def __init__(self, thread_id: UUID) -> None:
        self.thread_id = thread_id
        self.position: int | None = None  # last position fetched (None: not yet known)
        self.subscribers: set[Subscription] = set()
        self.dirty = True  # something may have changed since the last fetch
        # Re-check every subscriber's access on the next fetch even without new
        # events (a membership change, or notifications may have been lost).
        self.recheck = False
        self.task: asyncio.Task[None] | None = None


class StreamHub:
    def __init__(
        self, pool: asyncpg.Pool, database: DatabaseSettings, settings: MessagesSettings
    ) -> None:
        self._pool = pool
        self._database = database
        self._settings = settings
        self._feeds: dict[UUID, _Feed] = {}
        self._open = 0
        self._fetch_slots = asyncio.Semaphore(settings.stream_fetch_concurrency)
        self._listener: asyncpg.Connection | None = None
        self._listener_lost = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        await self._listen()
        self._tasks = [
            asyncio.create_task(self._supervise(), name="stream-hub-listener"),
            asyncio.create_task(self._heartbeat(), name="stream-hub-heartbeat"),
        ]

    async def end_all(self, error: DomainError) -> None:
        for feed in list(self._feeds.values()):
            for sub in list(feed.subscribers):
                sub.end(error)

    async def stop(self) -> None:
        self._stopping = True
        await self.end_all(Unavailable("the server is shutting down; resume from your cursor"))
        tasks = [*self._tasks, *(f.task for f in self._feeds.values() if f.task is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None and not self._listener.is_closed():
            self._listener.terminate()

    @property
    def subscriber_count(self) -> int:
        """Subscriptions that have started (events after their start reach them)."""
        return sum(
            sub.start_seq is not None and not sub.ended
            for feed in self._feeds.values()
            for sub in feed.subscribers
        )

    @property
    def open_count(self) -> int:
        """Registered subscriptions, started or not (what STREAM_MAX_OPEN bounds)."""
        return self._open

    @property
    def feed_count(self) -> int:
        return len(self._feeds)

    # -- subscriptions -------------------------------------------------------

    def subscribe(self, thread_id: UUID, user_id: UUID | None) -> Subscription:
        """Register a stream at once (no await: nothing can slip between the caller's
        steps). Await `sub.started` before reading `sub.start_seq`."""
        if self._stopping:
            raise Unavailable("the server is shutting down; resume from your cursor")
        if self._open >= self._settings.stream_max_open:
            REFUSED.inc()
            raise ResourceExhausted(
                f"this server streams at most {self._settings.stream_max_open} at once; "
                "retry shortly (or on another replica)",
                reason="STREAM_LIMIT",
                retry_after_s=RETRY_AFTER_LIMIT_S,
            )
        sub = Subscription(
            thread_id,
            user_id,
            self._settings.stream_buffer,
            self._settings.stream_buffer_bytes,
        )
        feed = self._feeds.get(thread_id)
        if feed is None:
            feed = self._feeds[thread_id] = _Feed(thread_id)
        feed.subscribers.add(sub)
        self._open += 1
        OPEN_STREAMS.inc()
        # Started only once a fetch has checked its access: an outsider learns
        # nothing (not even a caught_up) before its NOT_FOUND.
        self._kick(feed)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        feed = self._feeds.get(sub.thread_id)
        if feed is None or sub not in feed.subscribers:
            return
        feed.subscribers.discard(sub)
        self._open -= 1
        OPEN_STREAMS.dec()
        if not feed.subscribers:
            del self._feeds[sub.thread_id]
            if feed.task is not None and not feed.task.done():
                feed.task.cancel()

    # -- fetching ------------------------------------------------------------

    def _kick(self, feed: _Feed) -> None:
        """Fetch `feed` soon; one fetch task per feed, re-run while it is dirty."""
        feed.dirty = True
        if self._stopping or (feed.task is not None and not feed.task.done()):
            return
        feed.task = asyncio.create_task(self._run_feed(feed), name=f"feed-{feed.thread_id}")

    async def _run_feed(self, feed: _Feed) -> None:
        delay = self._settings.listener_retry_s
        while feed.dirty and self._feeds.get(feed.thread_id) is feed:
            feed.dirty = False
            try:
                async with self._fetch_slots:
                    await self._fetch(feed)
                delay = self._settings.listener_retry_s
            except QUERY_FAILURES as exc:
                # Only this thread waits; the others keep flowing.
                log.warning(
                    "fetching events of thread %s failed (%s: %s); retrying in %.1fs",
                    feed.thread_id,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                feed.dirty = True
                # Streams still opening are told now rather than left waiting.
                for sub in list(feed.subscribers):
                    if sub.start_seq is None:
                        sub.end(Unavailable("the database is unavailable; retry with backoff"))
                await asyncio.sleep(_jittered(delay))
                delay = min(delay * 2, self._settings.listener_retry_max_s)
            except Exception:
                # A bug, not an outage: say so loudly, and end this feed's streams with
                # a status clients resume from rather than leave them waiting.
                log.exception("fetching events of thread %s failed unexpectedly", feed.thread_id)
                for sub in list(feed.subscribers):
                    sub.end(Unavailable("live delivery failed; resume from your cursor"))
                return

    async def _fetch(self, feed: _Feed) -> None:
        """New events once for every subscriber; then who may still read them."""
        while True:
            recheck, feed.recheck = feed.recheck, False
            batch = store.EventBatch([], complete=True)
            async with self._pool.acquire() as conn:
                if feed.position is not None:
                    batch = await store.events_after(
                        conn,
                        feed.thread_id,
                        feed.position,
                        self._settings.stream_fetch_batch,
                        self._settings.stream_fetch_bytes,
                    )
                # Access after events: see the module docstring. Subscribers that
                # join while a check is in flight are checked in another round.
                # Whoever receives events is checked; with none to deliver, only
                # newcomers are (unless a re-check was asked for): admitting N
                # streams one by one stays linear.
                everyone = recheck or bool(batch.events)
                checked: dict[Subscription, store.StreamAccess | None] = {}
                while pending := [
                    s
                    for s in feed.subscribers
                    if s not in checked and (everyone or s.start_seq is None)
                ]:
                    users = {s.user_id for s in pending if s.user_id is not None}
                    access = await store.stream_access(conn, feed.thread_id, list(users))
                    checked.update(dict.fromkeys(pending, access))
                # Still inside the block: releasing the connection awaits, and a
                # subscriber joining then must not be served unchecked.
                self._distribute(feed, batch, checked)
            if batch.complete:
                return

    def _distribute(
        self,
        feed: _Feed,
        batch: store.EventBatch,
        checked: dict[Subscription, store.StreamAccess | None],
    ) -> None:
        """Offer `batch` to every checked subscriber; end those who lost access.

        Synchronous on purpose: every subscriber of the feed was checked."""
        if feed.position is None:
            feed.position = min((a.last_seq for a in checked.values() if a is not None), default=0)
        converted = [stream_event(event) for event in batch.events]
        for sub in list(feed.subscribers):
            if sub not in checked:
                continue  # started, nothing new for it, not asked to re-check
            error = stream_refusal(feed.thread_id, sub.user_id, checked[sub])
            if error is not None:
                sub.end(error)
                continue
            sub._start(feed.position)
            for event in converted:
                if event.position > sub.start_seq:  # type: ignore[operator]
                    sub.offer(event)
        if batch.events:
            feed.position = batch.events[-1].position

    def _check_threads(self, thread_ids: Iterable[UUID], *, recheck: bool = False) -> None:
        for thread_id in thread_ids:
            feed = self._feeds.get(thread_id)
            if feed is not None:
                feed.recheck = feed.recheck or recheck
                self._kick(feed)

    # -- notifications -------------------------------------------------------

    async def _listen(self) -> None:
        conn = await connect(self._database, application_name="chat-messages-listener")
        try:
            await conn.add_listener(channels.THREAD_EVENTS, self._on_event)
            await conn.add_listener(channels.MEMBERSHIP, self._on_membership)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._on_terminated)
        self._listener = conn
        self._listener_lost.clear()

    def _on_terminated(self, conn: Any) -> None:
        if conn is self._listener:
            self._listener_lost.set()

    def _on_event(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        try:
            event = channels.parse_thread_event(payload)
        except ValueError:
            log.warning("ignoring malformed notification %r", payload)
            return
        self._check_threads((event.thread_id,))

    def _on_membership(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        try:
            change = channels.parse_membership_change(payload)
        except ValueError:
            log.warning("ignoring malformed membership notification %r", payload)
            return
        thread_id, user_id = change.thread_id, change.user_id
        if thread_id is not None:
            self._check_threads((thread_id,), recheck=True)
        elif user_id is not None:  # deactivated or deleted: every feed that user reads
            self._check_threads(
                (
                    feed.thread_id
                    for feed in list(self._feeds.values())
                    if any(sub.user_id == user_id for sub in feed.subscribers)
                ),
                recheck=True,
            )

    async def _heartbeat(self) -> None:
        """Probe the listening connection; one that does not answer is dead."""
        while True:
            await asyncio.sleep(self._settings.listener_heartbeat_s)
            conn = self._listener
            if conn is None or conn.is_closed() or self._listener_lost.is_set():
                continue
            try:
                async with asyncio.timeout(self._settings.listener_heartbeat_timeout_s):
                    await conn.execute("SELECT 1")
            except _LISTENER_FAILURES as exc:
                log.warning(
                    "listening connection failed its heartbeat (%s); replacing it",
                    type(exc).__name__,
                )
                conn.terminate()
                self._listener_lost.set()

    async def _supervise(self) -> None:
        """Re-open a dropped listening connection, then re-check and catch up every feed."""
        while True:
            await self._listener_lost.wait()
            log.warning("listening connection lost; reconnecting")
            delay = self._settings.listener_retry_s
            while True:
                await asyncio.sleep(_jittered(delay))
                try:
                    await self._listen()
                    break
                except _LISTENER_FAILURES as exc:
                    log.warning("re-opening the listening connection failed: %s", exc)
                    delay = min(delay * 2, self._settings.listener_retry_max_s)
            LISTENER_RECONNECTS.inc()
            log.info("listening again; re-checking %d thread feed(s)", len(self._feeds))
            self._check_threads(list(self._feeds), recheck=True)


def _jittered(delay: float) -> float:
    """`delay` spread over [delay/2, delay]: replicas do not reconnect in lockstep."""
    return delay * (0.5 + random.random() / 2)  # not security: spreading reconnects
