"""StreamThreadMessages: replay from a cursor, the caught_up handshake, then live events.

The order is what makes it gap-free and leak-free:
1. Subscribe first (no await in between): every event after the feed's position
   at that moment will be offered to this stream, and every membership change
   from now on re-checks it.
2. Wait until the hub has checked the caller's access (it ends the
   subscription with the reason if there is none) and knows the start position.
3. Replay from `after` straight from the database, each batch read before the
   caller's access (a batch can only hold what committed while the caller could
   still read, see hub.py).
4. Send `caught_up` with the position live delivery continues from.
5. Deliver live events, skipping positions already replayed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
from chat.v1 import messages_pb2

from services.common.errors import InvalidArgument
from services.messages import store
from services.messages.convert import caught_up, event_response
from services.messages.hub import StreamHub
from services.messages.policy import stream_refusal
from services.messages.settings import MessagesSettings

Response = messages_pb2.StreamThreadMessagesResponse


async def stream_thread(
    pool: asyncpg.Pool,
    hub: StreamHub,
    settings: MessagesSettings,
    thread_id: UUID,
    user_id: UUID | None,
    after: int | None,
) -> AsyncIterator[Response]:
    sub = hub.subscribe(thread_id, user_id)
    try:
        await sub.started
        assert sub.start_seq is not None
        delivered = sub.start_seq if after is None else after
        if after is not None:
            async for event in _replay(pool, settings, thread_id, user_id, after):
                yield event_response(event)  # no buffer: not sized
                delivered = event.position
            delivered = max(delivered, sub.start_seq)
        yield caught_up(thread_id, delivered)
        while True:
            live = await sub.next()
            if live.position <= delivered:
                continue  # already replayed
            yield live.response
            delivered = live.position
    finally:
        hub.unsubscribe(sub)


async def _replay(
    pool: asyncpg.Pool,
    settings: MessagesSettings,
    thread_id: UUID,
    user_id: UUID | None,
    after: int,
) -> AsyncIterator[store.ThreadEvent]:
    position = after
    readers = [user_id] if user_id is not None else []
    while True:
        async with pool.acquire() as conn:
            batch = await store.events_after(
                conn, thread_id, position, settings.stream_fetch_batch, settings.stream_fetch_bytes
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
