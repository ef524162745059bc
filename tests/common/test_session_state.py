"""The services' pool does not reset sessions on release (pool._keep_session):
this holds only while no statement of the services leaves session state behind.
Every SQL text the services send (their Python modules and the server-side
functions of db/functions) is read here for the ways a session keeps state; and
a real pool shows a released connection comes back with its start-up settings
and no transaction."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.common.pool import create_pool
from services.common.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]
SESSION_STATE = {
    "a session-level set_config": re.compile(r"set_config\([^()]*,\s*false\s*\)", re.I),
    "SET SESSION": re.compile(r"\bSET\s+SESSION\b", re.I),
    # A statement of its own (after a quote, `;` or a block keyword), not the SET
    # clause of an UPDATE.
    "a SET statement (only SET LOCAL is transaction-local)": re.compile(
        r"""(?:["';]|\bBEGIN\b|\bTHEN\b|\bELSE\b)\s*SET\s+(?!LOCAL\b)[a-z_.]+\s*(?:=|TO\b)""",
        re.I,
    ),
    "a session advisory lock": re.compile(r"pg_(?:try_)?advisory_lock(?:_shared)?\s*\(", re.I),
    "a cursor WITH HOLD": re.compile(r"\bWITH\s+HOLD\b", re.I),
    "LISTEN on a pooled connection": re.compile(r"""["']\s*LISTEN\s""", re.I),
}


def sources() -> list[Path]:
    return [
        *sorted((REPO / "services").rglob("*.py")),
        *sorted((REPO / "db" / "functions").glob("*.sql")),
    ]


def test_no_statement_leaves_session_state_behind() -> None:
    found = [
        f"{path.relative_to(REPO)}: {what}"
        for path in sources()
        for what, pattern in SESSION_STATE.items()
        if pattern.search(path.read_text())
    ]
    assert found == []


@pytest.mark.parametrize(
    "text",
    [
        "SELECT set_config('x.y', $1, false)",
        "'SET statement_timeout = 0'",
        "SET SESSION lock_timeout TO 0",
        "SELECT pg_advisory_lock(42)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        '"LISTEN chat_thread_events"',
    ],
)
def test_the_scan_sees_each_kind(text: str) -> None:
    assert any(pattern.search(text) for pattern in SESSION_STATE.values()), text


def test_transaction_local_changes_pass_the_scan() -> None:
    allowed = "SELECT set_config('chat.leave_reason', $1, true); UPDATE t SET a = 1"
    assert not any(pattern.search(allowed) for pattern in SESSION_STATE.values())


async def test_a_released_connection_keeps_its_start_up_settings_and_no_transaction(
    service_settings: ServiceSettings,
) -> None:
    pool = await create_pool(
        service_settings, "chat-tests", session_settings={"chat.wake_after_commit": "on"}
    )
    try:
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("SELECT set_config('chat.leave_reason', 'left', true)")
            # Released with the transaction open (a handler that raised mid-way).
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid  # the same one
            assert not conn.is_in_transaction()
            row = await conn.fetchrow(
                "SELECT current_setting('application_name') AS app,"
                " current_setting('chat.wake_after_commit', true) AS wake,"
                " coalesce(current_setting('chat.leave_reason', true), '') AS reason,"
                " current_setting('statement_timeout') AS timeout"
            )
            assert row is not None
            assert (row["app"], row["wake"], row["reason"]) == ("chat-tests", "on", "")
            assert row["timeout"] != "0"
    finally:
        await pool.close()
