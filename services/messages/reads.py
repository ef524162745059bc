"""Listings that need a permission: policy.py first, then the store, on one
connection, so the servicer composes neither (the changes are in changes.py).

Each takes the page's `window` second, the shape MessagesServicer._listing calls.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from services.common.identity import Caller
from services.common.types import DbConnection
from services.messages import policy, store
from services.messages.store import Page, Window


async def history(conn: DbConnection, window: Window, caller: Caller, thread_id: UUID) -> Page:
    await policy.readable_thread(conn, caller, thread_id)
    return await store.list_history(conn, thread_id, window)


async def replies(conn: DbConnection, window: Window, caller: Caller, parent_id: UUID) -> Page:
    await policy.readable_message(conn, caller, parent_id)
    return await store.list_replies(conn, parent_id, window)


async def user_messages(conn: DbConnection, window: Window, caller: Caller, user_id: UUID) -> Page:
    policy.check_own_listing(caller, user_id)
    return await store.list_user_messages(conn, user_id, window)


async def search(
    conn: DbConnection,
    window: Window,
    caller: Caller,
    contains: dict[str, Any],
    thread_id: UUID | None,
) -> Page:
    """In one thread the caller may read, or (None) in every thread."""
    if thread_id is not None:
        await policy.readable_thread(conn, caller, thread_id)
    return await store.search(conn, contains, thread_id, window)
