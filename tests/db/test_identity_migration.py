"""Migration 0009 on rows written before it: rewrite to NFKC, report, never merge."""

from __future__ import annotations

import string
import sys
import unicodedata
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from db.migrations import load_migrations
from db.runner import MigrationError, Migrator
from services.common.validation import Violations
from services.users.validation import check_email, check_username

pytestmark = pytest.mark.db

BEFORE = 8  # the last migration before 0009
KELVIN = "\u212a"


@pytest.fixture
async def at_0008(empty_database_url: str) -> AsyncIterator[tuple[asyncpg.Connection, Migrator]]:
    conn = await asyncpg.connect(empty_database_url)
    migrator = Migrator(conn, load_migrations())
    await migrator.up(BEFORE)
    try:
        yield conn, migrator
    finally:
        await conn.close()


async def insert(conn: asyncpg.Connection, email: str, username: str) -> uuid.UUID:
    user_id = await conn.fetchval(
        "INSERT INTO users (email, username) VALUES ($1, $2) RETURNING id", email, username
    )
    assert isinstance(user_id, uuid.UUID)
    return user_id


async def identity(conn: asyncpg.Connection, user_id: uuid.UUID) -> tuple[str, str]:
    row = await conn.fetchrow("SELECT email, username FROM users WHERE id = $1", user_id)
    assert row is not None
    return row["email"], row["username"]


async def report(conn: asyncpg.Connection) -> dict[tuple[uuid.UUID, str], tuple[object, ...]]:
    rows = await conn.fetch(
        "SELECT user_id, field, value, normal_form, reason, conflicting_user_id "
        "FROM user_identity_conflicts"
    )
    return {(r["user_id"], r["field"]): tuple(r)[2:] for r in rows}


async def test_rewrites_reports_and_never_merges(
    at_0008: tuple[asyncpg.Connection, Migrator],
) -> None:
    conn, migrator = at_0008
    notices: list[str] = []
    conn.add_log_listener(lambda _conn, message: notices.append(message.message))

    plain = await insert(conn, "plain@example.com", "plain")
    kelvin = await insert(conn, f"{KELVIN}elvin@example.com", f"{KELVIN}elvin")
    ligature = await insert(conn, "\ufb01ona@example.com", "\ufb01ona")  # fi ligature
    kate = await insert(conn, "kate@example.com", "kate")
    # Fullwidth K: lower() leaves it alone in every locale, so it sat beside kate.
    squatter = await insert(conn, "\uff2bate@example.com", "\uff2bate")
    # Two rows that would both become bob (fullwidth b, mathematical bold b).
    bob1 = await insert(conn, "\uff42ob@example.com", "\uff42ob")
    bob2 = await insert(conn, "\U0001d41bob@example.com", "\U0001d41bob")
    cyrillic = await insert(conn, "\u0456van@example.com", "\u0456van")
    sharp = await insert(conn, "straße@example.com", "strasse_ok")
    dotted = await insert(conn, "\u0130nfo@example.com", "info_ok")
    invalid = await insert(conn, "a..b@example.com", "has space")
    short = await insert(conn, "short@example.com", "\uff58\uff59")  # NFKC "xy": too short
    before = await conn.fetchval("SELECT max(updated_at) FROM users")

    await migrator.up()

    assert await identity(conn, plain) == ("plain@example.com", "plain")
    assert await identity(conn, kelvin) == ("Kelvin@example.com", "Kelvin")
    assert await identity(conn, ligature) == ("fiona@example.com", "fiona")
    # Nothing reported was changed, merged or deleted.
    assert await identity(conn, kate) == ("kate@example.com", "kate")
    assert await identity(conn, squatter) == ("\uff2bate@example.com", "\uff2bate")
    assert await identity(conn, bob1) == ("\uff42ob@example.com", "\uff42ob")
    assert await identity(conn, bob2) == ("\U0001d41bob@example.com", "\U0001d41bob")
    assert await conn.fetchval("SELECT count(*) FROM users") == 12

    found = await report(conn)
    assert found == {
        (squatter, "email"): ("\uff2bate@example.com", "Kate@example.com", "collision", kate),
        (squatter, "username"): ("\uff2bate", "Kate", "collision", kate),
        (bob1, "email"): ("\uff42ob@example.com", "bob@example.com", "collision", bob2),
        (bob1, "username"): ("\uff42ob", "bob", "collision", bob2),
        (bob2, "email"): ("\U0001d41bob@example.com", "bob@example.com", "collision", bob1),
        (bob2, "username"): ("\U0001d41bob", "bob", "collision", bob1),
        (cyrillic, "email"): ("\u0456van@example.com", "\u0456van@example.com", "not_ascii", None),
        (cyrillic, "username"): ("\u0456van", "\u0456van", "not_ascii", None),
        (sharp, "email"): ("straße@example.com", "straße@example.com", "not_ascii", None),
        (dotted, "email"): ("\u0130nfo@example.com", "\u0130nfo@example.com", "not_ascii", None),
        (invalid, "email"): ("a..b@example.com", "a..b@example.com", "invalid", None),
        (invalid, "username"): ("has space", "has space", "invalid", None),
        (short, "username"): ("\uff58\uff59", "xy", "invalid", None),
    }
    assert any("4 emails/usernames rewritten" in n and "13 left" in n for n in notices), notices
    # Rows in form were not written at all.
    assert await conn.fetchval("SELECT updated_at FROM users WHERE id = $1", plain) <= before

    # Down keeps the data: it refuses while the report has rows ...
    with pytest.raises(MigrationError, match=r"user_identity_conflicts \(13 rows"):
        await migrator.down(BEFORE)
    assert await conn.fetchval("SELECT count(*) FROM user_identity_conflicts") == 13
    # ... and with --allow-data-loss drops only the report; the rewritten values stay.
    await migrator.down(BEFORE, allow_data_loss=True)
    assert await conn.fetchval("SELECT to_regclass('user_identity_conflicts')") is None
    assert await identity(conn, kelvin) == ("Kelvin@example.com", "Kelvin")
    # Up again finds the same accounts.
    await migrator.up()
    assert await report(conn) == found


async def test_down_without_conflicts_needs_no_flag(
    at_0008: tuple[asyncpg.Connection, Migrator],
) -> None:
    conn, migrator = at_0008
    user = await insert(conn, f"{KELVIN}@example.com", "\uff4b\uff4b\uff4b")
    await migrator.up()
    assert await identity(conn, user) == ("K@example.com", "kkk")
    assert await conn.fetchval("SELECT count(*) FROM user_identity_conflicts") == 0
    await migrator.down(BEFORE)
    assert await identity(conn, user) == ("K@example.com", "kkk")


def _samples() -> list[str]:
    """Characters to embed: all printable ASCII, every one NFKC makes ASCII, homoglyphs."""
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    chars += [
        chr(cp)
        for cp in range(0x80, sys.maxunicode + 1)
        if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co")
        and unicodedata.normalize("NFKC", chr(cp)).isascii()
    ]
    chars += ["\u0430", "\u03bf", "\u0130", "\u00df", "\u212b", "\u200b", "\u202e", "é"]
    return chars


async def test_agrees_with_the_service_validation_on_every_sample(
    at_0008: tuple[asyncpg.Connection, Migrator],
) -> None:
    """PostgreSQL's normalize() and patterns decide as services/users/validation.py does.

    Each value gets a fixed-width unique prefix, so no two can collide; every
    row must then end up either rewritten to the form the service computes or
    reported with the reason the service's checks imply.
    """
    conn, migrator = at_0008
    chars = _samples()
    emails = [f"e{i:05d}z{c}x@example.com" for i, c in enumerate(chars)]
    usernames = [f"u{i:05d}z{c}x" for i, c in enumerate(chars)]
    await conn.execute(
        "INSERT INTO users (email, username) SELECT * FROM unnest($1::text[], $2::text[])",
        emails,
        usernames,
    )
    await migrator.up()
    rows = await conn.fetch(
        """
        SELECT u.id, u.email, u.username, e.reason AS email_reason, n.reason AS name_reason,
               orig.email AS email_given, orig.username AS username_given
        FROM users u
        JOIN unnest($1::text[], $2::text[]) AS orig (email, username)
          ON substr(orig.email, 1, 7) = substr(u.email, 1, 7)
        LEFT JOIN user_identity_conflicts e ON e.user_id = u.id AND e.field = 'email'
        LEFT JOIN user_identity_conflicts n ON n.user_id = u.id AND n.field = 'username'
        """,
        emails,
        usernames,
    )
    assert len(rows) == len(chars)
    outcomes = {"email": [0, 0], "username": [0, 0]}
    for row in rows:
        for field, check in (("email", check_email), ("username", check_username)):
            given = row[f"{field}_given"]
            expected = check(Violations(), given)
            reason = row[f"{field}_reason" if field == "email" else "name_reason"]
            if expected is not None:
                assert (row[field], reason) == (expected, None), given
                outcomes[field][0] += 1
            else:
                normal = unicodedata.normalize("NFKC", given)
                want = "not_ascii" if not normal.isascii() else "invalid"
                assert (row[field], reason) == (given, want), given
                outcomes[field][1] += 1
    # Both outcomes occur many times for both fields (the sample is not one-sided).
    assert all(ok > 500 and bad > 50 for ok, bad in outcomes.values()), outcomes
