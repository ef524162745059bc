"""StreamThreadMessages in one place: replay from a cursor, the caught_up
handshake, live events and their dedup (`StreamHub.stream`).

The order is what makes a stream gap-free and leak-free:
1. Subscribe first (no await in between): every event after the feed's position
   at that moment will be offered to this stream, and every membership change
   from now on re-checks it (fanout.py).
2. Wait until the fan-out has checked the caller's access (it ends the
   subscription with the reason if there is none) and knows the start position.
3. Replay from `after` straight from the database, each batch read before the
   caller's access (a batch can only hold what committed while the caller could
   still read, see fanout.py).
4. Send `caught_up` with the position live delivery continues from.
5. Deliver live events, skipping positions already sent: the one dedup rule.

The hub also owns the lifecycle of the listener (listener.py) and the fan-out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
from chat.v1 import messages_pb2

from services.common.errors import DomainError, InvalidArgument, ShuttingDown
from services.common.identity import Caller
from services.common.settings import DatabaseSettings
from services.common.wire import as_response
from services.messages import store
from services.messages.convert import caught_up, event_response
from services.messages.policy import stream_refusal
from services.messages.settings import MessagesSettings
from services.messages.streams.fanout import Fanout
from services.messages.streams.listener import Listener
from services.messages.streams.users import UserStreams
from services.messages.streams.waker import Waker

log = logging.getLogger(__name__)

Response = messages_pb2.StreamThreadMessagesResponse


class StreamHub:
    def __init__(
        self, pool: asyncpg.Pool, database: DatabaseSettings, settings: MessagesSettings
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._fanout = Fanout(pool, settings)
        self.users = UserStreams(pool, settings)
        # After this process's own writes commit (the servicer calls it).
        self.waker = Waker(pool, self._thread_changed)
        self._catching_up: asyncio.Task[None] | None = None
        self._listener = Listener(
            database,
            settings,
            on_thread=self._thread_changed,
            on_membership=self._membership_changed,
            on_reconnect=self._notifications_lost,
            on_log=self.users.log_advanced,
            on_typing=self.users.typing,
        )

    def _thread_changed(self, thread_id: UUID, position: int, traceparent: str | None) -> None:
        self._fanout.thread_changed(thread_id, position, traceparent)
        self.users.writes_committed()

    def _membership_changed(self, thread_id: UUID | None, user_id: UUID | None) -> None:
        self._fanout.membership_changed(thread_id, user_id)
        if thread_id is None:
            self.users.user_changed(user_id)

    def _notifications_lost(self) -> None:
        self._fanout.notifications_lost()
        self.users.notifications_lost()

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        await self.users.start()
        await self._listener.start()
        self.waker.start()
        self._catching_up = asyncio.create_task(self._catch_up_forever(), name="catch-up")

    async def _catch_up_forever(self) -> None:
        """The safety net under wake-ups (waker.py): every feed reads its thread's
        position every STREAM_CATCH_UP_INTERVAL."""
        while True:
            await asyncio.sleep(self._settings.stream_catch_up_s)
            try:
                await self._fanout.catch_up()
            except Exception as exc:  # an outage: the next round tries again
                log.warning("stream catch-up read failed (%s: %s)", type(exc).__name__, exc)

    def end_streams(self, error: DomainError) -> None:
        """End every open stream with `error` and refuse new ones (shutdown begins)."""
        self._fanout.close(error)
        self.users.end_streams(error)

    async def stop(self) -> None:
        """Stop listening and fetching. Streams end here only if end_streams did not
        run first (each stream is ended once)."""
        if not self._fanout.closed:
            self.end_streams(ShuttingDown("the server is shutting down; resume from your cursor"))
        if self._catching_up is not None:
            self._catching_up.cancel()
            await asyncio.gather(self._catching_up, return_exceptions=True)
        await self.waker.stop()
        await self._listener.stop()
        await self._fanout.stop()
        await self.users.stop()

    @property
    def subscriber_count(self) -> int:
        """Streams that have started (events after their start reach them)."""
        return self._fanout.subscriber_count

    @property
    def open_count(self) -> int:
        """Registered streams, started or not (what STREAM_MAX_OPEN bounds)."""
        return self._fanout.open_count

    @property
    def feed_count(self) -> int:
        return self._fanout.feed_count

    # -- streams -------------------------------------------------------------

    async def stream(
        self, thread_id: UUID, after: int | None, caller: Caller
    ) -> AsyncIterator[Response]:
        """The thread's stream for `caller`: the events after position `after` (None:
        none), one caught_up, then live events until the stream ends with an error."""
        sub = self._fanout.subscribe(thread_id, caller.user_id)
        try:
            start = await sub.started()
            delivered = start if after is None else after
            if after is not None:
                async for event in self._replay(thread_id, caller.user_id, after):
                    yield event_response(event)  # no buffer: not sized
                    delivered = event.position
                delivered = max(delivered, start)
            yield caught_up(thread_id, delivered)
            while True:
                live = await sub.next()
                if live.position <= delivered:
                    continue  # already replayed
                yield as_response(live.payload, Response)
                delivered = live.position
        finally:
            self._fanout.unsubscribe(sub)

    async def _replay(
        self, thread_id: UUID, user_id: UUID | None, after: int
    ) -> AsyncIterator[store.ThreadEvent]:
        position = after
        readers = [user_id] if user_id is not None else []
        while True:
            async with self._pool.acquire() as conn:
                batch = await store.events_after(
                    conn,
                    thread_id,
                    position,
                    self._settings.stream_fetch_batch,
                    self._settings.stream_fetch_bytes,
                )
                access = await store.stream_access(conn, thread_id, readers)  # after the events
            error = stream_refusal(thread_id, user_id, access)
            if error is not None:
                raise error
            assert access is not None
            if after > access.last_seq:
                raise InvalidArgument.field("after", "is ahead of this thread's stream")
            for event in batch.events:
                yield event
                position = event.position
            if batch.complete:
                return
