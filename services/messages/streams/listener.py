"""The stream hub's one LISTEN connection per process: opened, probed, re-opened.

A send (or edit, delete, attachment, removal) commits and NOTIFYs
`chat_thread_events`; a membership change (removal, thread deleted or archived,
user deactivated or deleted) NOTIFYs `chat_membership`. This module only hears
them and passes them on; what to fetch and whom to re-check is the fan-out's
business (fanout.py).

The connection is probed with a heartbeat: a probe that fails or stays
unanswered marks it dead (a blackholed TCP connection raises nothing), and it
is re-opened with exponential backoff and jitter. Notifications sent while it
was down are lost, so after re-opening it calls `on_reconnect` (the fan-out then
re-checks and catches up every feed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
from prometheus_client import Counter

from services.common import channels
from services.common.pool import QUERY_FAILURES, connect
from services.common.settings import DatabaseSettings
from services.messages.settings import MessagesSettings
from services.messages.streams.backoff import jittered

log = logging.getLogger(__name__)

LISTENER_RECONNECTS = Counter(
    "chat_stream_listener_reconnects_total", "Times the LISTEN connection was re-opened"
)

# tests/reliability/test_listener_blackhole.py finds the connection by this name.
APPLICATION_NAME = "chat-messages-listener"

# A listening connection that fails like this is replaced.
_LISTENER_FAILURES: tuple[type[BaseException], ...] = (TimeoutError, OSError, *QUERY_FAILURES)


_Handler = Callable[[Any, int, str, object], None]
Parsed = TypeVar("Parsed")


def _handler(parse: Callable[[object], Parsed], deliver: Callable[[Parsed], None]) -> _Handler:
    """An asyncpg listener callback: parse the payload, pass it on; a payload the
    channel's sender does not send is logged and dropped."""

    def handle(_conn: Any, _pid: int, channel: str, payload: object) -> None:
        try:
            parsed = parse(payload)
        except ValueError:
            log.warning("ignoring malformed %s notification %r", channel, payload)
            return
        deliver(parsed)

    return handle


class Listener:
    """LISTENs on the stream channels and calls back: `on_thread(thread_id,
    position, traceparent)` when a thread has news (the write's traceparent when
    traced),
    `on_membership(thread_id, user_id)` when who may read changed (None: any),
    `on_log(position)` when the user streams' log moved on,
    `on_typing(typing)` when a participant types, `on_reconnect()` when
    notifications may have been lost."""

    def __init__(
        self,
        database: DatabaseSettings,
        settings: MessagesSettings,
        *,
        on_thread: Callable[[UUID, int, str | None], None],
        on_membership: Callable[[UUID | None, UUID | None], None],
        on_reconnect: Callable[[], None],
        on_log: Callable[[int], None],
        on_typing: Callable[[channels.Typing], None],
    ) -> None:
        self._database = database
        self._settings = settings
        self._on_reconnect = on_reconnect
        # Each channel: its parser and what to call with a parsed payload.
        self._handlers: dict[str, _Handler] = {
            channels.THREAD_EVENTS: _handler(
                channels.parse_thread_event,
                lambda event: on_thread(event.thread_id, event.position, event.traceparent),
            ),
            channels.MEMBERSHIP: _handler(
                channels.parse_membership_change,
                lambda change: on_membership(change.thread_id, change.user_id),
            ),
            channels.LOG: _handler(channels.parse_log_position, on_log),
            channels.TYPING: _handler(channels.parse_typing, on_typing),
        }
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._listen()
        self._tasks = [
            asyncio.create_task(self._supervise(), name="stream-hub-listener"),
            asyncio.create_task(self._heartbeat(), name="stream-hub-heartbeat"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None and not self._conn.is_closed():
            self._conn.terminate()

    async def _listen(self) -> None:
        conn = await connect(self._database, application_name=APPLICATION_NAME)
        try:
            for channel, handler in self._handlers.items():
                await conn.add_listener(channel, handler)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._on_terminated)
        self._conn = conn
        self._lost.clear()

    def _on_terminated(self, conn: Any) -> None:
        if conn is self._conn:
            self._lost.set()

    async def _heartbeat(self) -> None:
        """Probe the listening connection; one that does not answer is dead."""
        while True:
            await asyncio.sleep(self._settings.listener_heartbeat_s)
            conn = self._conn
            if conn is None or conn.is_closed() or self._lost.is_set():
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
                self._lost.set()

    async def _supervise(self) -> None:
        """Re-open a dropped listening connection, then say notifications may be lost."""
        while True:
            await self._lost.wait()
            log.warning("listening connection lost; reconnecting")
            delay = self._settings.listener_retry_s
            while True:
                await asyncio.sleep(jittered(delay))
                try:
                    await self._listen()
                    break
                except _LISTENER_FAILURES as exc:
                    log.warning("re-opening the listening connection failed: %s", exc)
                    delay = min(delay * 2, self._settings.listener_retry_max_s)
            LISTENER_RECONNECTS.inc()
            self._on_reconnect()
