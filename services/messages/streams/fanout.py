"""Fan-out: one feed per thread with open streams in this process, one bounded
buffer per stream.

When a thread has news its feed fetches the new events once (not once per
subscriber), converts them once and offers them to every subscriber's buffer.
A subscriber that falls too far behind (events or bytes) is ended with
RESOURCE_EXHAUSTED instead of growing memory; it resumes from its cursor.

Who may still read is decided by the database, never by a notification alone.
Every fetch reads the events first and the subscribers' access second (thread
exists, not archived, each user a participant and active; the rule is
policy.stream_refusal). Whatever committed after a removal is only visible in a
snapshot that also shows the removal, so the later access read catches it:
nothing committed after a removal reaches the removed user, whether or not its
`chat_membership` notification arrived. That notification only makes the
re-check happen at once; after the listening connection is re-opened
(notifications in between are lost) every feed is re-checked and caught up.

Fetches of different threads run side by side (bounded), and a failed fetch
retries that thread alone, with backoff.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Iterable
from uuid import UUID

import asyncpg
from prometheus_client import Gauge

from services.common import tracing
from services.common.errors import (
    DatabaseUnavailable,
    DomainError,
    ShuttingDown,
    Unavailable,
)
from services.common.pool import QUERY_FAILURES
from services.messages import store
from services.messages.convert import StreamEvent, stream_event
from services.messages.policy import stream_refusal
from services.messages.settings import MessagesSettings
from services.messages.streams.backoff import jittered
from services.messages.streams.buffer import StreamBuffer, refuse_past_limit, until_drained

log = logging.getLogger(__name__)

# At most this many sends' traces are linked from one fan-out span.
CAUSES_MAX = 32
OPEN_STREAMS = Gauge("chat_streams_open", "Open StreamThreadMessages streams")


class Subscription(StreamBuffer[StreamEvent]):
    """One open thread stream: its buffer, and where in the thread's feed it started."""

    def __init__(
        self, thread_id: UUID, user_id: UUID | None, max_events: int, max_bytes: int
    ) -> None:
        super().__init__(max_events, max_bytes)
        self.thread_id = thread_id
        self.user_id = user_id
        # The feed's position when this subscription started (its access checked):
        # every event after it is offered here. Set once.
        self.start_seq: int | None = None

    def _start(self, position: int) -> None:
        if self.start_seq is None:
            self.start_seq = position
            self.start(position)


class _Feed:
    """One thread's live events in this process, shared by its subscribers."""

    def __init__(self, thread_id: UUID) -> None:
        self.thread_id = thread_id
        self.position: int | None = None  # last position fetched (None: not yet known)
        # The highest position a wake-up asked for: a fetch that starts after that
        # wake-up is scheduled or running, and it covers every position up to it.
        self.wanted: int | None = None
        self.subscribers: set[Subscription] = set()
        self.dirty = True  # something may have changed since the last fetch
        # Re-check every subscriber's access on the next fetch even without new
        # events (a membership change, or notifications may have been lost).
        self.recheck = False
        self.task: asyncio.Task[None] | None = None
        # Traceparents of the writes whose events the next fetch delivers (tracing on).
        self.causes: list[str] = []


class Fanout:
    """Every feed of the process and its subscriptions."""

    def __init__(self, pool: asyncpg.Pool, settings: MessagesSettings) -> None:
        self._pool = pool
        self._settings = settings
        self._feeds: dict[UUID, _Feed] = {}
        self._open = 0
        self._fetch_slots = asyncio.Semaphore(settings.stream_fetch_concurrency)
        # A live batch fits half a stream's buffer (see _room_for_more).
        self._live_batch = min(settings.stream_fetch_batch, max(1, settings.stream_buffer // 2))
        self._live_batch_bytes = min(settings.stream_fetch_bytes, settings.stream_buffer_bytes // 2)
        self._closed = False

    # -- lifecycle -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, error: DomainError) -> None:
        """End every stream with `error` and refuse new ones (shutdown)."""
        self._closed = True
        for feed in list(self._feeds.values()):
            for sub in list(feed.subscribers):
                sub.end(error)

    async def stop(self) -> None:
        """Cancel the fetches still running (after close)."""
        tasks = [f.task for f in self._feeds.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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
        steps). Await `sub.started()` for its start position."""
        if self._closed:
            raise ShuttingDown("the server is shutting down; resume from your cursor")
        refuse_past_limit(self._open, self._settings.stream_max_open)
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

    # -- news (from the listener) --------------------------------------------

    def thread_changed(
        self, thread_id: UUID, position: int | None = None, traceparent: str | None = None
    ) -> None:
        """The thread reached `position` (None: unknown): fetch what is new
        (`traceparent`: of the write, when traced). A position the feed has
        already fetched (this process's own wake-up, heard back) is nothing new."""
        feed = self._feeds.get(thread_id)
        if feed is None:
            return
        if position is not None:
            if feed.position is not None and position <= feed.position:
                return
            # Already asked for (this process's wake-up heard back by NOTIFY while
            # its fetch runs): the fetch after the first ask covers it, and a
            # second fetch would find nothing (and make an empty fan-out span).
            if feed.wanted is not None and position <= feed.wanted:
                return
            feed.wanted = position
        if traceparent is not None and len(feed.causes) < CAUSES_MAX:
            feed.causes.append(traceparent)
        self._kick(feed)

    async def catch_up(self) -> None:
        """Fetch for every feed whose thread moved past what it fetched, and
        re-check those whose thread is gone or archived: what lost or unsent
        notifications would have done (waker.py). Runs every
        STREAM_CATCH_UP_INTERVAL, one query for all feeds."""
        known = {t: f.position for t, f in self._feeds.items() if f.position is not None}
        if not known:
            return
        async with self._pool.acquire() as conn:
            found = await store.thread_positions(conn, list(known))
        for thread_id in known:
            feed = self._feeds.get(thread_id)
            if feed is None:
                continue
            position, archived = found.get(thread_id, (None, True))
            if position is None or archived:
                self._check_threads((thread_id,), recheck=True)
            elif feed.position is not None and position > feed.position:
                self._kick(feed)

    def membership_changed(self, thread_id: UUID | None, user_id: UUID | None) -> None:
        """Who may read changed: re-check the thread's subscribers, or (no thread)
        every feed the user reads (deactivated or deleted)."""
        if thread_id is not None:
            self._check_threads((thread_id,), recheck=True)
        elif user_id is not None:
            self._check_threads(
                (
                    feed.thread_id
                    for feed in list(self._feeds.values())
                    if any(sub.user_id == user_id for sub in feed.subscribers)
                ),
                recheck=True,
            )

    def notifications_lost(self) -> None:
        """Re-check and catch up every feed (the listener was re-opened)."""
        log.info("listening again; re-checking %d thread feed(s)", len(self._feeds))
        self._check_threads(list(self._feeds), recheck=True)

    def _check_threads(self, thread_ids: Iterable[UUID], *, recheck: bool = False) -> None:
        for thread_id in thread_ids:
            feed = self._feeds.get(thread_id)
            if feed is not None:
                feed.recheck = feed.recheck or recheck
                self._kick(feed)

    # -- fetching ------------------------------------------------------------

    def _kick(self, feed: _Feed) -> None:
        """Fetch `feed` soon; one fetch task per feed, re-run while it is dirty."""
        feed.dirty = True
        if self._closed or (feed.task is not None and not feed.task.done()):
            return
        # In a context of its own: a task inherits its creator's context, and the
        # first subscriber's call would otherwise lend the feed, shared by every
        # stream of the thread, its request id (log lines) and its span (the
        # fan-out spans' parent) for as long as the task runs.
        feed.task = asyncio.create_task(
            self._run_feed(feed), name=f"feed-{feed.thread_id}", context=contextvars.Context()
        )

    async def _run_feed(self, feed: _Feed) -> None:
        delay = self._settings.listener_retry_s
        while feed.dirty and self._feeds.get(feed.thread_id) is feed:
            feed.dirty = False
            try:
                while not await self._fetch_batch(feed):
                    await self._room_for_more(feed)
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
                        sub.end(
                            DatabaseUnavailable("the database is unavailable; retry with backoff")
                        )
                await asyncio.sleep(jittered(delay))
                delay = min(delay * 2, self._settings.listener_retry_max_s)
            except Exception:
                # A bug, not an outage: say so loudly, and end this feed's streams with
                # a status clients resume from rather than leave them waiting.
                log.exception("fetching events of thread %s failed unexpectedly", feed.thread_id)
                for sub in list(feed.subscribers):
                    sub.end(Unavailable("live delivery failed; resume from your cursor"))
                return

    async def _room_for_more(self, feed: _Feed) -> None:
        """Between the batches of a backlog (after an outage, a lost wake-up, a
        burst): wait until every stream of the feed has drained to half its buffer,
        which a batch fits, for at most STREAM_BACKLOG_WAIT. A stream whose client
        keeps reading is then never cut off by a backlog; one that does not drain
        in time gets the next batch anyway and is cut off as a slow consumer, so it
        holds the others up by at most that long per batch."""
        started = [sub for sub in feed.subscribers if sub.start_seq is not None]
        await until_drained(started, self._settings.stream_backlog_wait_s)

    async def _fetch_batch(self, feed: _Feed) -> bool:
        """One batch of new events for every subscriber, then who may still read
        them; True when nothing more was waiting."""
        async with self._fetch_slots:  # released between a backlog's batches
            recheck, feed.recheck = feed.recheck, False
            causes, feed.causes = feed.causes, []
            batch = store.EventBatch([], complete=True)
            span = tracing.fanout_span(
                "chat.stream.fanout", causes, **{"chat.thread_id": str(feed.thread_id)}
            )
            with span:
                async with self._pool.acquire() as conn:
                    if feed.position is not None:
                        batch = await store.events_after(
                            conn,
                            feed.thread_id,
                            feed.position,
                            self._live_batch,
                            self._live_batch_bytes,
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
            return batch.complete

    def _distribute(
        self,
        feed: _Feed,
        batch: store.EventBatch,
        checked: dict[Subscription, store.StreamAccess | None],
    ) -> None:
        """Offer `batch` to every checked subscriber; end those who lost access.

        Synchronous on purpose: every subscriber of the feed was checked. Every
        event of the batch lies after the feed's position, where any subscriber
        started, so each is offered whole; the stream itself skips what its
        replay already sent (hub.py, the one dedup rule)."""
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
                sub.offer(event, event.size)
        if batch.events:
            feed.position = batch.events[-1].position
