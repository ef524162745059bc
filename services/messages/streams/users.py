"""StreamUserEvents: one live stream per user for all their threads.

The log (thread_events, migration 0013) holds every change members can see;
its positions are global and dense. Each process runs one follower that reads
the log once for all its user streams, in position order, and one sequencer
tick (chat_sequence_events) that numbers committed events.

A stream is gap-free and duplicate-free by this order:
1. Register (pending); the follower starts it between two batches, at its own
   position P, with the user's threads at P read from the database
   (log_store.memberships) and the user checked active. From then on every
   event after P passes through `UserView` rules (user_view.variant_for).
2. Replay (after, P] from the database with the same rule, starting from the
   user's threads at `after`; a cursor older than the retention is expired.
3. `caught_up` at max(after, P); then live events after it (the one dedup rule:
   positions already sent are skipped). `typing` has no position and is never
   replayed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import NamedTuple
from uuid import UUID

import asyncpg
from prometheus_client import Gauge

from services.common.channels import Typing
from services.common.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
)
from services.common.identity import user_inactive
from services.common.pool import QUERY_FAILURES
from services.common.types import DbConnection
from services.common.wire import as_response
from services.messages import log_store
from services.messages.log_store import LogEvent
from services.messages.settings import MessagesSettings
from services.messages.streams.backoff import jittered
from services.messages.streams.buffer import StreamBuffer, refuse_past_limit, until_drained
from services.messages.user_view import Converted, Response, caught_up, typing, variant_for

log = logging.getLogger(__name__)

OPEN_USER_STREAMS = Gauge("chat_user_streams_open", "Open StreamUserEvents streams")
LOG_POSITION = Gauge("chat_user_log_position", "The last log position this process delivered")


def cursor_expired() -> FailedPrecondition:
    return FailedPrecondition(
        "the cursor is older than the event log's retention: reload the inbox "
        "(ListThreads), then open the stream without `after`",
        reason="CURSOR_EXPIRED",
        subject="after",
    )


class Item(NamedTuple):
    position: int  # 0: `typing`, which has none
    payload: bytes  # the serialised response, shared by every stream it reaches
    # The follower's position when it offered this: a typing was decided on the
    # memberships as of then.
    seen_at: int


class UserSubscription(StreamBuffer[Item]):
    """One open user stream."""

    def __init__(self, user_id: UUID, max_events: int, max_bytes: int) -> None:
        super().__init__(max_events, max_bytes)
        self.user_id = user_id


class UserStreams:
    """The process's user streams, their follower and the sequencer tick."""

    def __init__(self, pool: asyncpg.Pool, settings: MessagesSettings) -> None:
        self._pool = pool
        self._settings = settings
        self._position = 0  # the last log position the follower delivered
        self._pending: list[UserSubscription] = []
        self._subs: dict[UUID, set[UserSubscription]] = {}  # started, by user
        self._threads_of: dict[UUID, set[UUID]] = {}  # each local user's threads at _position
        self._local: dict[UUID, set[UUID]] = {}  # thread -> local users in it
        self._wake = asyncio.Event()
        self._sequence_now = asyncio.Event()
        self._recheck: set[UUID] = set()
        self._open = 0  # registered streams, pending or started
        self._tasks: list[asyncio.Task[None]] = []
        self._closed: DomainError | None = None

    # -- lifecycle and notifications -----------------------------------------

    async def start(self) -> None:
        async with self._pool.acquire() as conn:
            self._position = (await log_store.state(conn)).last_position
        self._tasks = [
            asyncio.create_task(self._follow(), name="user-log-follower"),
            asyncio.create_task(self._tick(), name="user-log-sequencer"),
        ]

    def end_streams(self, error: DomainError) -> None:
        self._closed = error
        for sub in [*self._pending, *(s for subs in self._subs.values() for s in subs)]:
            sub.end(error)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def log_advanced(self, _position: int) -> None:
        self._wake.set()

    def writes_committed(self) -> None:
        """Something was written (a thread's notification): number it now if this
        process has user streams waiting for it. Without any, the next tick
        (USER_LOG_TICK) numbers it: a process with streams is woken by the same
        write's notification and numbers it at once, so a send costs no numbering
        round trip in a process nobody streams from."""
        if self._open:
            self._sequence_now.set()

    def notifications_lost(self) -> None:
        self._sequence_now.set()
        self._wake.set()

    def user_changed(self, user_id: UUID | None) -> None:
        """A user may have been deactivated or deleted: re-check their streams."""
        if user_id is not None and user_id in self._subs:
            self._recheck.add(user_id)
            self._wake.set()

    def typing(self, event: Typing) -> None:
        payload = typing(event.thread_id, event.user_id, event.expire_time).SerializeToString()
        for user in self._local.get(event.thread_id, ()):
            if user != event.user_id:
                for sub in self._subs.get(user, ()):
                    sub.offer(Item(0, payload, self._position), len(payload))

    @property
    def open_count(self) -> int:
        return self._open

    # -- the stream ------------------------------------------------------------

    async def stream(self, user_id: UUID, after: int | None) -> AsyncIterator[Response]:
        if self._closed is not None:
            raise self._closed
        refuse_past_limit(self.open_count, self._settings.stream_max_open)
        sub = UserSubscription(
            user_id, self._settings.stream_buffer, self._settings.stream_buffer_bytes
        )
        self._pending.append(sub)
        self._open += 1
        self._wake.set()
        OPEN_USER_STREAMS.inc()
        try:
            start = await sub.started()
            delivered = start
            if after is not None:
                if after > start:
                    async with self._pool.acquire() as conn:
                        if after > (await log_store.state(conn)).last_position:
                            raise InvalidArgument.field("after", "is ahead of the event log")
                else:
                    async for response in self._replay(user_id, after, start):
                        yield response
                delivered = max(after, start)
            yield caught_up(delivered)
            while True:
                item = await sub.next()
                if item.position == 0:
                    # A typing decided on memberships older than what this stream
                    # has shown (a resume ahead of this process) may be stale.
                    if item.seen_at >= delivered:
                        yield as_response(item.payload, Response)
                    continue
                if item.position <= delivered:
                    continue  # already replayed
                yield as_response(item.payload, Response)
                delivered = item.position
        finally:
            OPEN_USER_STREAMS.dec()
            self._unsubscribe(sub)

    async def _replay(self, user_id: UUID, after: int, upto: int) -> AsyncIterator[Response]:
        async with self._pool.acquire() as conn:
            memberships = await log_store.memberships(conn, [user_id], after)
        if after < memberships.retained_after:
            raise cursor_expired()
        threads = memberships.at[user_id]
        relevant = sorted(threads | memberships.joined_later[user_id])
        position = after
        batch_size = self._settings.stream_fetch_batch
        while position < upto and relevant:
            async with self._pool.acquire() as conn:
                batch = await log_store.threads_after(conn, relevant, position, upto, batch_size)
                # Read after the batch: if nothing was pruned past `position` by
                # now, the batch missed nothing (retention only moves forward).
                if (await log_store.state(conn)).retained_after > position:
                    raise cursor_expired()
            for event in batch:
                variant = variant_for(event, user_id, threads)
                if variant is not None:
                    yield as_response(Converted(event).payload(variant), Response)
            if len(batch) < batch_size:
                return
            position = batch[-1].position

    def _unsubscribe(self, sub: UserSubscription) -> None:
        self._open -= 1
        if sub in self._pending:
            self._pending.remove(sub)
            return
        subs = self._subs.get(sub.user_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.user_id]
            for thread in self._threads_of.pop(sub.user_id, ()):
                self._unindex(thread, sub.user_id)

    def _unindex(self, thread: UUID, user: UUID) -> None:
        users = self._local.get(thread)
        if users is not None:
            users.discard(user)
            if not users:
                del self._local[thread]

    # -- the follower ----------------------------------------------------------

    async def _follow(self) -> None:
        delay = self._settings.listener_retry_s
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                async with self._pool.acquire() as conn:
                    await self._start_pending(conn)
                    await self._recheck_users(conn)
                    backlog = await self._catch_up(conn)
                delay = self._settings.listener_retry_s
                if backlog:
                    # More is waiting: the streams drain first (buffer.until_drained),
                    # off the connection; then the next batch.
                    subs = [sub for subs in self._subs.values() for sub in subs]
                    await until_drained(subs, self._settings.stream_backlog_wait_s)
                    self._wake.set()
            except QUERY_FAILURES as exc:
                log.warning("reading the event log failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(jittered(delay))
                delay = min(delay * 2, self._settings.listener_retry_max_s)
                self._wake.set()
            except Exception:
                log.exception("the user stream follower failed unexpectedly; retrying")
                await asyncio.sleep(jittered(delay))
                self._wake.set()

    async def _start_pending(self, conn: DbConnection) -> None:
        """Start the streams waiting to: each user's threads at the follower's
        position (every pending user is read, even one with streams open now:
        those may close while this reads). Streams stay pending until this
        succeeds (a failed read is retried), and one cancelled meanwhile has left
        `_pending` and is not started."""
        if not self._pending:
            return
        if not self._subs and not self._local:
            # Nobody was listening: skip what nobody needs to read.
            self._position = max(self._position, (await log_store.state(conn)).last_position)
        users = sorted({sub.user_id for sub in self._pending})
        active = await log_store.active_users(conn, users)
        memberships = await log_store.memberships(conn, sorted(active), self._position)
        # No await from here on: nothing can change under the registration.
        for sub in list(self._pending):
            if sub.user_id not in users:
                continue  # arrived during the reads: the next pass starts it
            self._pending.remove(sub)
            if sub.user_id not in active:
                sub.end(user_inactive(sub.user_id, "the user is deactivated or does not exist"))
                continue
            if sub.user_id not in self._subs:  # its first stream here: index its threads
                threads = self._threads_of[sub.user_id] = memberships.at[sub.user_id]
                for thread in threads:
                    self._local.setdefault(thread, set()).add(sub.user_id)
            self._subs.setdefault(sub.user_id, set()).add(sub)
            sub.start(self._position)
        if self._pending:
            self._wake.set()

    async def _recheck_users(self, conn: DbConnection) -> None:
        if not self._recheck:
            return
        users = sorted(self._recheck)
        active = await log_store.active_users(conn, users)
        self._recheck -= set(users)  # only once read: a failed read is retried
        for user in users:
            if user not in active:
                for sub in list(self._subs.get(user, ())):
                    sub.end(user_inactive(user))

    async def _catch_up(self, conn: DbConnection) -> bool:
        """Deliver the log after this process's position, a batch at a time while the
        batches are small; True when a full batch was delivered and more may wait
        (a backlog: the caller lets the streams drain before the next)."""
        settings = self._settings
        # A live batch fits half a stream's buffer (buffer.until_drained).
        limit = min(settings.stream_fetch_batch, max(1, settings.stream_buffer // 2))
        limit_bytes = min(settings.stream_fetch_bytes, settings.stream_buffer_bytes // 2)
        while True:
            if not self._subs:
                self._position = max(self._position, (await log_store.state(conn)).last_position)
                return False
            batch = await log_store.after(conn, self._position, limit, limit_bytes)
            if batch and batch[0].position != self._position + 1:
                # Positions are dense: a jump means retention pruned events this
                # process had not read yet. Its streams cannot be continued.
                self._expire_all()
                return False
            for event in batch:
                self._deliver(event)
                self._position = event.position
            LOG_POSITION.set(self._position)
            if not batch:
                return False
            if len(batch) >= limit:
                return True

    def _expire_all(self) -> None:
        """End every started stream with CURSOR_EXPIRED and forget their state; the
        next start reads memberships afresh (at the log's end, nobody listening)."""
        log.warning(
            "the event log was pruned past this process's position %d; "
            "ending its user streams with CURSOR_EXPIRED",
            self._position,
        )
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.end(cursor_expired())
        self._subs.clear()
        self._threads_of.clear()
        self._local.clear()

    def _deliver(self, event: LogEvent) -> None:
        users = set(self._local.get(event.thread_id, ()))
        if event.kind == "participant_joined" and event.user_id in self._threads_of:
            users.add(event.user_id)
        if not users:
            return
        converted = Converted(event)
        for user in users:
            threads = self._threads_of[user]
            was_member = event.thread_id in threads
            variant = variant_for(event, user, threads)
            is_member = event.thread_id in threads
            if is_member and not was_member:
                self._local.setdefault(event.thread_id, set()).add(user)
            elif was_member and not is_member:
                self._unindex(event.thread_id, user)
            if variant is None:
                continue
            payload = converted.payload(variant)
            for sub in list(self._subs.get(user, ())):
                sub.offer(Item(event.position, payload, event.position), len(payload))

    # -- the sequencer tick ------------------------------------------------------

    async def _tick(self) -> None:
        settings = self._settings
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + settings.log_prune_every_s
        while True:
            try:
                async with asyncio.timeout(settings.log_tick_s):
                    await self._sequence_now.wait()
            except TimeoutError:
                pass
            self._sequence_now.clear()
            try:
                async with self._pool.acquire() as conn:
                    await log_store.sequence(conn, settings.log_sequence_batch)
                    if loop.time() >= next_prune:
                        next_prune = loop.time() + settings.log_prune_every_s
                        await log_store.prune(
                            conn, settings.log_retention_s, settings.log_prune_batch
                        )
            except QUERY_FAILURES as exc:
                log.warning("numbering the event log failed (%s)", type(exc).__name__)
                await asyncio.sleep(jittered(settings.listener_retry_s))
            except Exception:
                log.exception("the event log sequencer failed unexpectedly")
                await asyncio.sleep(jittered(settings.listener_retry_s))
