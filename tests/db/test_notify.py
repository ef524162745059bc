"""NOTIFY has one home: db/functions/notify.sql sends, services/common/channels.py
names the channels and parses the payloads, and nothing else spells either."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

import asyncpg
import pytest

from services.common import channels

pytestmark = pytest.mark.db

REPO = Path(__file__).resolve().parents[2]
NOTIFY_SQL = REPO / "db" / "functions" / "notify.sql"
CHANNELS_PY = REPO / "services" / "common" / "channels.py"


async def received(
    url: str, channel: str, sql: str, *args: object
) -> tuple[list[str], list[object]]:
    """Payloads heard on `channel` (named as channels.py names it) after `sql` commits."""
    listener, sender = await asyncpg.connect(url), await asyncpg.connect(url)
    heard: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener(channel, lambda *a: heard.put_nowait(a[3]))
        results = [r[0] for r in await sender.fetch(sql, *args)]
        payloads = [await asyncio.wait_for(heard.get(), 10)]
        await asyncio.sleep(0.2)  # anything else sent would be here by now
        while not heard.empty():
            payloads.append(heard.get_nowait())
        return payloads, results
    finally:
        await listener.close()
        await sender.close()


async def test_thread_events_reach_channels_names_and_parse(database_url: str) -> None:
    thread = uuid.uuid4()
    payloads, _ = await received(
        database_url, channels.THREAD_EVENTS, "SELECT chat_notify_thread_event($1, 42)", thread
    )
    assert [channels.parse_thread_event(p) for p in payloads] == [channels.ThreadEvent(thread, 42)]


@pytest.mark.parametrize("thread_set, user_set", [(True, True), (True, False), (False, True)])
async def test_membership_changes_reach_channels_names_and_parse(
    database_url: str, thread_set: bool, user_set: bool
) -> None:
    thread = uuid.uuid4() if thread_set else None
    user = uuid.uuid4() if user_set else None
    payloads, _ = await received(
        database_url,
        channels.MEMBERSHIP,
        "SELECT chat_notify_membership($1, $2)",
        thread,
        user,
    )
    assert [channels.parse_membership_change(p) for p in payloads] == [
        channels.MembershipChange(thread, user)
    ]


async def test_chat_bump_thread_moves_on_and_notifies_once(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        thread = await conn.fetchval("INSERT INTO threads (name) VALUES ('t') RETURNING id")
        await conn.execute("UPDATE threads SET last_seq = 7 WHERE id = $1", thread)
    finally:
        await conn.close()
    payloads, results = await received(
        database_url, channels.THREAD_EVENTS, "SELECT chat_bump_thread($1, 3)", thread
    )
    assert results == [10]
    assert [channels.parse_thread_event(p) for p in payloads] == [channels.ThreadEvent(thread, 10)]
    # No thread, no position and nothing sent.
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT chat_bump_thread($1)", uuid.uuid4()) is None
    finally:
        await conn.close()


def test_parsers_refuse_what_the_functions_never_send() -> None:
    for payload in ("", "not-a-uuid:1", f"{uuid.uuid4()}", f"{uuid.uuid4()}:x"):
        with pytest.raises(ValueError):
            channels.parse_thread_event(payload)
    for payload in ("", "[]", '{"thread_id": "nope"}', "{", '{"user_id": 5}'):
        with pytest.raises(ValueError):
            channels.parse_membership_change(payload)


def test_channel_names_are_written_in_notify_sql_and_channels_py_only() -> None:
    sql = NOTIFY_SQL.read_text()
    sent = set(re.findall(r"pg_notify\('([a-z_]+)'", sql))
    every = {channels.THREAD_EVENTS, channels.MEMBERSHIP, channels.LOG, channels.TYPING}
    assert sent == every
    # Every other file of the product: no pg_notify, no NOTIFY statement, no channel
    # name as a string literal (migrations are history: applied text stays as it is).
    names = "|".join(sorted(every))
    literal = re.compile(rf"""['"]({names})['"]""")
    statement = re.compile(r"\bpg_notify\s*\(|\bNOTIFY\s+[a-z_]+\s*[,;'\"]", re.IGNORECASE)
    offenders = []
    for path in [
        *(REPO / "services").rglob("*.py"),
        *(REPO / "db").rglob("*.py"),
        *(REPO / "db" / "functions").glob("*.sql"),
        *(REPO / "bench").rglob("*.py"),
    ]:
        if path in (NOTIFY_SQL, CHANNELS_PY):
            continue
        text = path.read_text()
        if literal.search(text) or statement.search(text):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


async def test_log_positions_and_typing_reach_their_channels_and_parse(database_url: str) -> None:
    payloads, _ = await received(database_url, channels.LOG, "SELECT chat_notify_log(42)")
    assert [channels.parse_log_position(p) for p in payloads] == [42]
    thread, user = uuid.uuid4(), uuid.uuid4()
    payloads, _ = await received(
        database_url,
        channels.TYPING,
        "SELECT chat_notify_typing($1, $2, '2030-01-01T00:00:00Z')",
        thread,
        user,
    )
    typing = [channels.parse_typing(p) for p in payloads]
    assert [(t.thread_id, t.user_id, t.expire_time.year) for t in typing] == [(thread, user, 2030)]
