"""The hostile suites' common ground: hostile values, a seeded world, the data's rules.

Generated requests draw ids from a small seeded world (users, a group with
messages, a reply, an attachment) as well as ids that match nothing, so calls
reach real rows and succeed too; after every call, accepted or refused, the
rules of the data must still hold (INVARIANTS), and a refused call wrote nothing
(row_counts unchanged).
"""

from __future__ import annotations

import uuid

import asyncpg
import grpc
from hypothesis import strategies as st

from tests.factories import new_room, send

ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FRAGMENTS = [
    "", " ", "\t\n", "\x00", "a\x00b", "'; DROP TABLE users; --", "\" OR 1=1 --",
    '{"a": [1, {"b": null}]}', "💬" * 3, "x" * 300, "%s%s%n", "../../etc/passwd",
    "00000000-0000-0000-0000-000000000000", "not-a-uuid", str(uuid.uuid4()).upper(),
]  # fmt: skip
# Text that protobuf can carry (no lone surrogates: they cannot be encoded as UTF-8).
texts = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=400),
    st.builds(lambda n: "y" * n, st.sampled_from([10_000, 10_001, 100_000])),
)
ids = st.one_of(st.sampled_from(FRAGMENTS), st.uuids().map(str), texts)


def ids_or_known(known: list[str]) -> st.SearchStrategy[str]:
    """Ids that match nothing or are malformed, and ids of the seeded world (`known`)."""
    return st.one_of(st.sampled_from(known), ids)


sizes = st.integers(min_value=-(2**31), max_value=2**31 - 1)
# Floats include NaN and infinities: refused (JSON has none), never INTERNAL.
json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | texts,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)
structs = st.dictionaries(st.text(max_size=12), json_values, max_size=6)


async def row_counts(db: asyncpg.Pool) -> tuple[int, ...]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM threads), "
        "(SELECT count(*) FROM thread_participants), (SELECT count(*) FROM messages), "
        "(SELECT count(*) FROM message_attachments)"
    )
    assert row is not None
    return tuple(row)


# What must hold after any call, accepted or refused (each query counts violations).
INVARIANTS = {
    "a deleted message keeps no content or attachment": """
        SELECT count(*) FROM messages m
        WHERE m.status = 'deleted'
          AND (m.content <> '' OR EXISTS (SELECT 1 FROM message_attachments a
                                          WHERE a.message_id = m.id))
    """,
    "at most 20 attachments per message": """
        SELECT count(*) FROM (SELECT 1 FROM message_attachments
                              GROUP BY message_id HAVING count(*) > 20) over_limit
    """,
    "a direct thread has at most its two participants": """
        SELECT count(*) FROM threads t
        WHERE t.is_direct
          AND (SELECT count(*) FROM thread_participants p WHERE p.thread_id = t.id) > 2
    """,
    "every position is within its thread's counter": """
        SELECT count(*) FROM messages m JOIN threads t ON t.id = m.thread_id
        WHERE m.seq > t.last_seq OR m.change_seq > t.last_seq
    """,
    "identities are in their ASCII form": """
        SELECT count(*) FROM users WHERE email !~ '^[!-~]+$' OR username !~ '^[!-~]+$'
    """,
}


async def broken_invariants(db: asyncpg.Pool) -> list[str]:
    return [name for name, sql in INVARIANTS.items() if await db.fetchval(sql)]


async def seed_world(db_pool: asyncpg.Pool) -> list[str]:
    """Ids of a small seeded world: users, a group with messages, a reply, an attachment."""
    room = await new_room(db_pool)
    first = await send(db_pool, room.thread_id, room.owner, "first")
    reply = await db_pool.fetchval(
        "SELECT id FROM chat_send_message($1, $2, 'reply', $3, NULL, NULL, "
        """'[{"url": "https://x.io/a", "type": "t", "name": "a", "size": 1}]'::jsonb)""",
        uuid.UUID(room.thread_id),
        uuid.UUID(room.member),
        uuid.UUID(first),
    )
    attachment = await db_pool.fetchval(
        "SELECT id FROM message_attachments WHERE message_id = $1", reply
    )
    return [
        room.thread_id,
        room.owner,
        room.member,
        room.outsider,
        first,
        str(reply),
        str(attachment),
    ]
