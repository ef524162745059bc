"""The bounds of the services' pool: documented defaults, what each pooled
connection carries, and the per-row gate. The bounds at work against running
services are in tests/reliability/test_bounded_waits.py."""

from __future__ import annotations

import asyncio

import pytest

from devtools.processes import SETTINGS_VARIABLES
from services.common.health_watch import not_serving_bound
from services.common.pool import KeyedGate, RowLockWaitTimeout, create_pool
from services.common.settings import ServiceSettings

BOUNDS = (
    "DB_STATEMENT_TIMEOUT",
    "DB_LOCK_TIMEOUT",
    "DB_POOL_ACQUIRE_TIMEOUT",
    "DB_COMMAND_TIMEOUT",
    "DB_ROW_LOCK_WAITERS",
)


def test_defaults_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*BOUNDS, "HEALTH_CHECK_INTERVAL", "HEALTH_CHECK_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HEALTH_FAILURE_THRESHOLD", raising=False)
    settings = ServiceSettings()
    assert settings.statement_timeout_s == 5.0
    assert settings.lock_timeout_s == 2.0
    assert settings.pool_acquire_timeout_s == 2.0
    assert settings.row_lock_waiters == 4
    # A live server always answers (or cancels) before the client gives up on it.
    assert settings.client_command_timeout() == 6.0
    # Health: NOT_SERVING at most 17 s after the database's last answer.
    bound = not_serving_bound(
        settings.health_check_interval_s,
        settings.health_check_timeout_s,
        settings.health_failure_threshold,
    )
    assert bound == 17.0
    # Service processes started by the tests get these defaults, never the shell's.
    assert set(BOUNDS) <= SETTINGS_VARIABLES


def test_bounds_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT", "10")
    monkeypatch.setenv("DB_LOCK_TIMEOUT", "0")
    monkeypatch.setenv("DB_POOL_ACQUIRE_TIMEOUT", "0.5")
    monkeypatch.setenv("DB_ROW_LOCK_WAITERS", "2")
    monkeypatch.delenv("DB_COMMAND_TIMEOUT", raising=False)
    settings = ServiceSettings()
    assert (settings.statement_timeout_s, settings.lock_timeout_s) == (10.0, 0.0)
    assert settings.pool_acquire_timeout_s == 0.5
    assert settings.row_lock_waiters == 2
    assert settings.client_command_timeout() == 11.0  # follows the statement timeout
    monkeypatch.setenv("DB_COMMAND_TIMEOUT", "3")
    assert ServiceSettings().client_command_timeout() == 3.0
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT", "0")
    monkeypatch.delenv("DB_COMMAND_TIMEOUT")
    assert ServiceSettings().client_command_timeout() is None  # both off


async def test_every_pooled_connection_keeps_its_timeouts(database_url: str) -> None:
    settings = ServiceSettings(DATABASE_URL=database_url, DB_POOL_MAX_SIZE=1)
    pool = await create_pool(settings, application_name="chat-tests")
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == "5s"
            assert await conn.fetchval("SHOW lock_timeout") == "2s"
            # A call changes them only for its transaction, so cannot leave them
            # changed: the pool does not reset sessions, and no statement of the
            # services sets anything for the session (tests/common/test_session_state.py).
            async with conn.transaction():
                await conn.execute("SET LOCAL statement_timeout = 0")
                await conn.execute("SELECT set_config('lock_timeout', '0', true)")
                assert await conn.fetchval("SHOW lock_timeout") == "0"
        async with pool.acquire() as conn:  # the same connection (one in the pool)
            assert await conn.fetchval("SHOW statement_timeout") == "5s"
            assert await conn.fetchval("SHOW lock_timeout") == "2s"
    finally:
        await pool.close()


async def test_the_gate_lets_a_few_per_key_and_bounds_the_rest() -> None:
    gate = KeyedGate(2, timeout_s=0.2, settle_s=0.2)
    await gate.enter("a")
    await gate.enter("a")
    await gate.enter("b")  # another key is not held up
    with pytest.raises(RowLockWaitTimeout) as caught:
        await gate.enter("a")
    assert caught.value.ahead is None  # no call ahead ended meanwhile
    third = asyncio.ensure_future(gate.enter("a"))
    await asyncio.sleep(0)
    assert not third.done()
    gate.leave("a")  # a place frees: the waiter goes in
    await asyncio.wait_for(third, timeout=10)
    for key in ("a", "a", "b"):
        gate.leave(key)
    assert len(gate) == 0  # nothing kept per key once it is free


async def test_a_waiter_whose_time_is_up_ends_as_the_call_ahead_of_it() -> None:
    gate = KeyedGate(1, timeout_s=0.05, settle_s=60)
    await gate.enter("a")
    waiter = asyncio.ensure_future(gate.enter("a"))
    await asyncio.sleep(0.1)  # past its time: it now waits for the holder to end
    assert not waiter.done()
    outage = ConnectionResetError("the database went away")
    gate.leave("a", outage)
    with pytest.raises(RowLockWaitTimeout) as caught:
        await asyncio.wait_for(waiter, timeout=10)
    assert caught.value.ahead is outage
    assert len(gate) == 0


async def test_a_cancelled_gate_wait_leaves_nothing_behind() -> None:
    gate = KeyedGate(1, timeout_s=None, settle_s=None)
    await gate.enter("a")
    waiter = asyncio.ensure_future(gate.enter("a"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.leave("a")
    assert len(gate) == 0
