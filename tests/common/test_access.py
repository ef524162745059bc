"""Thread visibility (services/common/access.py), on a real database: the one rule
both services' policies get threads through."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from services.common.access import Role, visible_thread
from services.common.errors import NotFound
from services.common.identity import Caller


async def _world(db_pool: asyncpg.Pool) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    """A group thread with an owner, and a user outside it."""
    owner, outsider = [
        await db_pool.fetchval(
            "INSERT INTO users (email, username) VALUES ($1, $1) RETURNING id", f"{name}@x.io"
        )
        for name in ("owner", "outsider")
    ]
    thread = await db_pool.fetchval("INSERT INTO threads (name) VALUES ('g') RETURNING id")
    await db_pool.execute(
        "INSERT INTO thread_participants (thread_id, user_id, role) VALUES ($1, $2, 'owner')",
        thread,
        owner,
    )
    return thread, owner, outsider


@pytest.mark.parametrize("lock", [False, True])
async def test_participants_and_trusted_calls_see_a_thread_others_do_not(
    db_pool: asyncpg.Pool, lock: bool
) -> None:
    thread, owner, outsider = await _world(db_pool)
    async with db_pool.acquire() as conn, conn.transaction():
        seen = await visible_thread(conn, Caller(owner), thread, lock=lock)
        assert (seen.thread.id, seen.role, seen.trusted) == (thread, Role.OWNER, False)
        trusted = await visible_thread(conn, Caller(None), thread, lock=lock)
        assert (trusted.role, trusted.trusted) == (None, True)
        for caller, missing in ((Caller(outsider), thread), (Caller(None), uuid.uuid4())):
            with pytest.raises(NotFound) as caught:
                await visible_thread(conn, caller, missing, lock=lock)
            # The same answer for a thread one may not see and one that does not exist.
            assert caught.value.resource_name == str(missing)


async def test_a_locked_read_sees_the_membership_the_lock_waited_for(
    db_pool: asyncpg.Pool,
) -> None:
    """A caller removed by the transaction holding the thread's lock is no member
    once the lock is granted (one joined statement would still see the old row)."""
    thread, owner, _ = await _world(db_pool)
    async with db_pool.acquire() as remover, db_pool.acquire() as reader:
        removal = remover.transaction()
        await removal.start()
        await remover.execute("SELECT 1 FROM threads WHERE id = $1 FOR UPDATE", thread)
        await remover.execute("DELETE FROM thread_participants WHERE thread_id = $1", thread)

        async def read() -> None:
            async with reader.transaction():
                await visible_thread(reader, Caller(owner), thread, lock=True)

        waiting = asyncio.create_task(read())
        await asyncio.sleep(0.2)
        assert not waiting.done()  # waits for the lock
        await removal.commit()
        with pytest.raises(NotFound):
            await waiting
