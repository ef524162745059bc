"""Waking thread streams after a write commits: this process's at once, the
other processes' by one batched NOTIFY.

The messages service's writes do not NOTIFY in their own transaction: its pool
sets chat.wake_after_commit (db/functions/positions.sql), because a NOTIFY in a
transaction makes PostgreSQL commit all such transactions one at a time (a
global lock held through the commit's WAL flush), which capped sends per
second. Instead, once a write has committed, the servicer calls
`Waker.committed(thread_id, position)`:

- this process's feed of the thread is kicked at once, without a round trip;
- the wake-up is queued for the other processes: one task sends everything
  queued in one transaction (chat_notify_thread_events), then what was queued
  meanwhile, and so on: batches grow with load, with no timer to wait for. Per
  thread only the newest position is kept. A graceful stop sends what is
  queued (at most WAKE_FLUSH_S) before the task ends: calls drained at
  shutdown commit too.

A wake-up that never goes out (the process died right after the commit, the
notification failed, the queue was full) costs latency, never an event: every
process also reads its feeds' positions every STREAM_CATCH_UP_INTERVAL
(fanout.py, `catch_up`) and fetches what it has not seen. Delivery reads from
the database by position either way, so order and completeness never depend on
a notification.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from uuid import UUID

import asyncpg
from prometheus_client import Counter

from services.common.statement_names import named
from services.messages.streams.backoff import jittered

log = logging.getLogger(__name__)

NOTIFY_MANY = named(
    "streams.wake", "SELECT chat_notify_thread_events($1::uuid[], $2::bigint[], $3::text[])"
)
# Threads whose wake-up waits to be sent; past it a wake-up is dropped (counted)
# and the other processes' catch-up read delivers that thread's events.
WAKE_PENDING_MAX = 10_000
# Wake-ups per NOTIFY transaction.
WAKE_BATCH_MAX = 1_000
WAKE_RETRY_S = 0.5
# At a graceful stop, how long the wake-ups of the last writes get to go out
# (the other processes' catch-up read delivers what misses it).
WAKE_FLUSH_S = 1.0

WAKES_DROPPED = Counter(
    "chat_stream_wakes_dropped_total",
    "Wake-ups for other processes not sent (queue full or NOTIFY failed); "
    "their streams catch up by the periodic read",
)


class Waker:
    def __init__(
        self, pool: asyncpg.Pool, wake_here: Callable[[UUID, int, str | None], None]
    ) -> None:
        self._pool = pool
        self._wake_here = wake_here
        self._pending: dict[UUID, tuple[int, str | None]] = {}
        self._queued = asyncio.Event()
        # Set while nothing is queued or being sent.
        self._drained = asyncio.Event()
        self._drained.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._send_forever(), name="stream-waker")

    async def stop(self) -> None:
        """Send what the last writes queued (at most WAKE_FLUSH_S), then stop: calls
        drained at shutdown commit, and their wake-ups must not die with the queue."""
        if self._task is None:
            return
        if not self._task.done():
            try:
                async with asyncio.timeout(WAKE_FLUSH_S):
                    await self._drained.wait()
            except TimeoutError:
                WAKES_DROPPED.inc(len(self._pending))
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def committed(self, thread_id: UUID, position: int, traceparent: str | None = None) -> None:
        """A write to `thread_id` committed at `position`: wake its streams."""
        self._wake_here(thread_id, position, traceparent)
        queued = self._pending.get(thread_id)
        if queued is None and len(self._pending) >= WAKE_PENDING_MAX:
            WAKES_DROPPED.inc()
            return
        if queued is None or position > queued[0]:
            self._pending[thread_id] = (position, traceparent)
        self._drained.clear()
        self._queued.set()

    async def _send_forever(self) -> None:
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._pending:
                batch = list(self._pending.items())[:WAKE_BATCH_MAX]
                for thread_id, _ in batch:
                    del self._pending[thread_id]
                try:
                    async with self._pool.acquire() as conn:
                        await conn.execute(
                            NOTIFY_MANY,
                            [thread_id for thread_id, _ in batch],
                            [position for _, (position, _) in batch],
                            [traceparent for _, (_, traceparent) in batch],
                        )
                except Exception as exc:  # any failure: the catch-up read covers it
                    # The catch-up read delivers these; waiting avoids a hot loop
                    # while the database is away.
                    WAKES_DROPPED.inc(len(batch))
                    log.warning(
                        "waking other processes for %d thread(s) failed (%s: %s); "
                        "their streams catch up by the periodic read",
                        len(batch),
                        type(exc).__name__,
                        exc,
                    )
                    await asyncio.sleep(jittered(WAKE_RETRY_S))
            self._drained.set()  # no await since the queue was found empty
