"""The one place tests make users, threads and messages directly in the database.

Users and rooms are plain rows (what CreateUser and CreateThread commit); a
message is made by the product's own send function, chat_send_message, so no
test carries a second copy of the send contract (positions, created_at, the
sender's read mark, notifications) that could drift from it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg


async def new_user(db: asyncpg.Pool, *, active: bool = True) -> str:
    tag = f"u{uuid.uuid4().hex[:12]}"
    return str(
        await db.fetchval(
            "INSERT INTO users (email, username, is_active) VALUES ($1 || '@x.io', $1, $2) "
            "RETURNING id",
            tag,
            active,
        )
    )


async def new_users(db: asyncpg.Pool, n: int) -> list[str]:
    return [await new_user(db) for _ in range(n)]


@dataclass
class Room:
    """A group thread with an owner and a member, and a user outside it."""

    thread_id: str
    owner: str
    member: str
    outsider: str


async def new_group(db: asyncpg.Pool, owner: str, member: str, name: str = "room") -> str:
    """A group thread of `owner` (OWNER) and `member` (MEMBER); its id."""
    thread = await db.fetchval("INSERT INTO threads (name) VALUES ($1) RETURNING id", name)
    await db.execute(
        "INSERT INTO thread_participants (thread_id, user_id, role) "
        "VALUES ($1, $2, 'owner'), ($1, $3, 'member')",
        thread,
        uuid.UUID(owner),
        uuid.UUID(member),
    )
    return str(thread)


async def new_room(db: asyncpg.Pool) -> Room:
    owner, member, outsider = await new_users(db, 3)
    return Room(await new_group(db, owner, member), owner, member, outsider)


async def send(
    db: asyncpg.Pool | asyncpg.Connection, thread_id: str, user_id: str, content: str = "hi"
) -> str:
    """A message sent through chat_send_message, as SendMessage sends it; its id."""
    row = await db.fetchrow(
        "SELECT outcome, id FROM chat_send_message($1, $2, $3, NULL, NULL, NULL, '[]'::jsonb)",
        uuid.UUID(thread_id),
        uuid.UUID(user_id),
        content,
    )
    assert row is not None and row["outcome"] == "created", row
    return str(row["id"])
