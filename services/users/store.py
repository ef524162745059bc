"""SQL for the users table. Every function takes a connection; SQL stays here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from services.common.errors import AlreadyExists, NotFound
from services.common.rows import UPDATED_AT_ADVANCES, column_list, masked_update, row_of
from services.common.statement_names import named
from services.common.types import DbConnection

# Unique constraints and indexes on users, and the request field each protects.
_UNIQUE_FIELDS = {
    "uq_users_email": "email",
    "idx_users_email": "email",
    "uq_users_username": "username",
    "idx_users_username": "username",
}


@dataclass(frozen=True)
class UserRow:
    id: UUID
    email: str
    username: str
    first_name: str | None
    last_name: str | None
    profile_image: str | None
    is_active: bool
    last_login_at: datetime | None
    created_at: datetime
    updated_at: datetime


# Every statement returning users selects exactly UserRow's fields (see rows.py).
USER_COLUMNS = column_list(UserRow)


@dataclass(frozen=True)
class NewUser:
    email: str
    username: str
    first_name: str | None
    last_name: str | None
    profile_image: str | None


@dataclass(frozen=True)
class UserChanges:
    """New values for the fields named in an update mask (others untouched)."""

    fields: frozenset[str]
    email: str = ""
    username: str = ""
    first_name: str | None = None
    last_name: str | None = None
    profile_image: str | None = None
    is_active: bool = True


INSERT = named(
    "users.insert",
    f"""
    INSERT INTO users (email, username, first_name, last_name, profile_image)
    VALUES ($1, $2, $3, $4, $5)
    RETURNING {USER_COLUMNS}
    """,  # noqa: S608 (columns from USER_COLUMNS, a constant)
)
GET = named(
    "users.get",
    f"""
    SELECT {USER_COLUMNS}
    FROM users WHERE id = $1
    """,  # noqa: S608 (columns from USER_COLUMNS, a constant)
)
BY_EMAIL = named(
    "users.by_email",
    f"""
    SELECT {USER_COLUMNS}
    FROM users WHERE lower(email) = lower($1)
    """,  # noqa: S608 (columns from USER_COLUMNS, a constant)
)
BY_USERNAME = named(
    "users.by_username",
    f"""
    SELECT {USER_COLUMNS}
    FROM users WHERE lower(username) = lower($1)
    """,  # noqa: S608 (columns from USER_COLUMNS, a constant)
)
BATCH_GET = named(
    "users.batch_get",
    f"""
    SELECT {USER_COLUMNS}
    FROM users WHERE id = ANY ($1::uuid[])
    """,  # noqa: S608 (columns from USER_COLUMNS, a constant)
)
# Both listings page through users in lower(username) order. `~>~`/`~<~` are the
# byte-wise operators of the text_pattern_ops index idx_users_username, so the
# scan walks that index. sort_key is the page token's position, lowered by the
# same lower() as the index; $1 is the position to continue after, $2 whether
# deactivated users are included.
_PAGE_SELECT = f"SELECT {USER_COLUMNS}, lower(username) AS sort_key FROM users"  # noqa: S608
_PAGE_RULE = """($1::text IS NULL OR lower(username) ~>~ $1) AND (is_active OR $2)
    ORDER BY lower(username) USING ~<~"""
LIST = named("users.list", f"{_PAGE_SELECT} WHERE {_PAGE_RULE} LIMIT $3")
# Prefix search: one index range scan per column, OR-ed into a bitmap, then the
# page is sorted by username. The query is lowered here by PostgreSQL's lower(),
# the function the indexes hold, never in Python (str.lower() and lower() differ
# outside ASCII: "İ"). The range is [q, q || chr(1114111)), U+10FFFF being the
# largest code point: byte-wise, every value that starts with q lies in it,
# unless U+10FFFF follows q, a noncharacter no name or identity accepted by the
# API contains (services/common/validation.py). Username and
# email are matched against $3, the query in identity form (NFKC, as LookupUser
# takes it), first and last name against $4, the query as given.
SEARCH = named(
    "users.search",
    f"""
    {_PAGE_SELECT}
    WHERE ((lower(username) ~>=~ lower($3) AND lower(username) ~<~ (lower($3) || chr(1114111)))
        OR (lower(email) ~>=~ lower($3) AND lower(email) ~<~ (lower($3) || chr(1114111)))
        OR (lower(first_name) ~>=~ lower($4)
            AND lower(first_name) ~<~ (lower($4) || chr(1114111)))
        OR (lower(last_name) ~>=~ lower($4)
            AND lower(last_name) ~<~ (lower($4) || chr(1114111))))
      AND {_PAGE_RULE}
    LIMIT $5
    """,
)
# One static statement for every mask: each column keeps its value unless its flag is set.
# The columns UpdateUser's field mask may name (UserChanges has one field each).
UPDATABLE_COLUMNS = ("email", "username", "first_name", "last_name", "profile_image", "is_active")
UPDATE = named("users.update", masked_update("users", UPDATABLE_COLUMNS, USER_COLUMNS))
DELETE = named("users.delete", "DELETE FROM users WHERE id = $1")
# Before the cascade: the user's messages leave their threads' streams as
# `removed` events and replies to them lose their parent as `updated` events
# (migration 0008), so stream consumers stay equal to history.
FORGET_MESSAGES = named("users.forget_messages", "SELECT chat_forget_user_messages($1)")
# Before the user leaves their groups (deleted or deactivated), each group they
# own gets another owner if it needs one (rule in migration 0011).
HAND_ON_OWNERSHIP = named("users.hand_on_ownership", "SELECT chat_hand_on_ownership($1)")
# A user who can no longer act (deactivated or deleted): the messages service ends
# their open streams when this commits (`thread_id` null means every thread).
NOTIFY_USER_GONE = named("users.notify_gone", "SELECT chat_notify_membership(NULL, $1)")
RECORD_LOGIN = named(
    "users.record_login",
    f"""
    UPDATE users SET last_login_at = now(), {UPDATED_AT_ADVANCES}
    WHERE id = $1 AND is_active
    RETURNING {USER_COLUMNS}
    """,  # noqa: S608 (columns from USER_COLUMNS, a constant)
)


def _row(record: asyncpg.Record | None) -> UserRow | None:
    return None if record is None else row_of(UserRow, record)


def _unique_violation(exc: asyncpg.UniqueViolationError) -> AlreadyExists:
    field = _UNIQUE_FIELDS.get(exc.constraint_name or "", "user")
    return AlreadyExists(field, f"a user with this {field} already exists")


async def create_user(conn: DbConnection, user: NewUser) -> UserRow:
    try:
        record = await conn.fetchrow(
            INSERT, user.email, user.username, user.first_name, user.last_name, user.profile_image
        )
    except asyncpg.UniqueViolationError as exc:
        raise _unique_violation(exc) from None
    created = _row(record)
    assert created is not None
    return created


async def get_user(conn: DbConnection, user_id: UUID) -> UserRow:
    found = _row(await conn.fetchrow(GET, user_id))
    if found is None:
        raise NotFound("user", str(user_id))
    return found


async def lookup_user(conn: DbConnection, *, email: str = "", username: str = "") -> UserRow:
    key, value = ("email", email) if email else ("username", username)
    found = _row(await conn.fetchrow(BY_EMAIL if email else BY_USERNAME, value))
    if found is None:
        raise NotFound("user", f"{key}={value}")
    return found


async def batch_get_users(conn: DbConnection, ids: Sequence[UUID]) -> dict[UUID, UserRow]:
    rows = await conn.fetch(BATCH_GET, list(set(ids)))
    return {row["id"]: UserRow(**dict(row)) for row in rows}


@dataclass(frozen=True)
class ListedUser:
    user: UserRow
    sort_key: str  # lower(username) as PostgreSQL computes it: the keyset position


def _listed(record: asyncpg.Record) -> ListedUser:
    fields = dict(record)
    sort_key = fields.pop("sort_key")
    return ListedUser(UserRow(**fields), sort_key)


async def list_users(
    conn: DbConnection,
    *,
    after_username: str | None,
    include_inactive: bool,
    query: str,
    identity_query: str,
    limit: int,
) -> list[ListedUser]:
    """A page in lower(username) order, filtered by a prefix when `query` is set.

    `identity_query` is `query` in identity form, matched against username and email.
    """
    if query:
        rows = await conn.fetch(
            SEARCH, after_username, include_inactive, identity_query, query, limit
        )
    else:
        rows = await conn.fetch(LIST, after_username, include_inactive, limit)
    return [_listed(row) for row in rows]


async def update_user(conn: DbConnection, user_id: UUID, changes: UserChanges) -> UserRow:
    f = changes.fields
    # (flag, value) per column of UPDATE, in UPDATABLE_COLUMNS order.
    masked = [(c in f, getattr(changes, c)) for c in UPDATABLE_COLUMNS]
    try:
        record = await conn.fetchrow(UPDATE, user_id, *(x for pair in masked for x in pair))
    except asyncpg.UniqueViolationError as exc:
        raise _unique_violation(exc) from None
    updated = _row(record)
    if updated is None:
        raise NotFound("user", str(user_id))
    if "is_active" in f and not changes.is_active:
        await conn.execute(HAND_ON_OWNERSHIP, user_id)
        await conn.execute(NOTIFY_USER_GONE, user_id)
    return updated


async def delete_user(conn: DbConnection, user_id: UUID) -> None:
    """Delete in the caller's transaction (the statements must commit together)."""
    # Hand-on first: it takes every lock the deletion needs, in one order.
    await conn.execute(HAND_ON_OWNERSHIP, user_id)
    await conn.execute(FORGET_MESSAGES, user_id)
    status = await conn.execute(DELETE, user_id)
    if status == "DELETE 0":
        raise NotFound("user", str(user_id))
    await conn.execute(NOTIFY_USER_GONE, user_id)


async def record_login(conn: DbConnection, user_id: UUID) -> UserRow | None:
    """The updated user, or None when the user exists but is inactive."""
    updated = _row(await conn.fetchrow(RECORD_LOGIN, user_id))
    if updated is None:
        await get_user(conn, user_id)  # NOT_FOUND when there is no such user
    return updated
