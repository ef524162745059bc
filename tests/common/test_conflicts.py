"""A transaction PostgreSQL rolls back for a deadlock is ABORTED, never INTERNAL.

The services keep one lock order (users, then threads in id order), so no two of
their own calls deadlock; a deadlock with anything else (an operator's session, a
migration, a future bug) must still come back as a documented, retryable code.
Here the test's own session closes the cycle: AddParticipants holds the named
user FOR KEY SHARE and waits for the thread row the test holds; the test then
asks for the user row FOR UPDATE. The service waited first, so its deadlock
check (deadlock_timeout, 1 s) fires first and its transaction is the victim.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
from chat.v1 import threads_pb2, threads_pb2_grpc

from services.common.settings import ServiceSettings
from services.threads.service import DEFINITION as THREADS
from tests.conftest import running
from tests.rpc_errors import error_info, error_of
from tests.threads.conftest import new_users


async def test_a_deadlock_is_aborted_with_retry_info(
    service_settings: ServiceSettings, db_pool: asyncpg.Pool
) -> None:
    owner, newcomer = await new_users(db_pool, 2)
    async with running(THREADS, service_settings) as (_, channel):
        threads = threads_pb2_grpc.ThreadsServiceStub(channel)
        created = await threads.CreateThread(
            threads_pb2.CreateThreadRequest(name="t", creator_id=owner)
        )
        thread_id = created.thread.id
        async with db_pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            await conn.execute(
                "SELECT 1 FROM threads WHERE id = $1 FOR UPDATE", uuid.UUID(thread_id)
            )
            add = asyncio.ensure_future(
                error_of(
                    threads.AddParticipants(
                        threads_pb2.AddParticipantsRequest(thread_id=thread_id, user_ids=[newcomer])
                    )
                )
            )
            for _ in range(2000):  # until the service waits for the thread row
                waiting = await db_pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%FROM threads WHERE id = $1 FOR UPDATE%'"
                )
                if waiting:
                    break
                await asyncio.sleep(0.005)
            else:
                raise AssertionError("AddParticipants never waited for the thread row")
            await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", uuid.UUID(newcomer))
            await tx.rollback()
        err = await add
    assert err.code() == grpc.StatusCode.ABORTED, err.details()
    assert error_info(err).reason == "CONCURRENT_CONFLICT"
    assert (
        await db_pool.fetchval(
            "SELECT count(*) FROM thread_participants WHERE user_id = $1", uuid.UUID(newcomer)
        )
        == 0
    )
