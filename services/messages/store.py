"""SQL for messages and message_attachments. Every function takes a connection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg

from services.common.rows import UPDATED_AT_ADVANCES, column_list, row_of
from services.common.statement_names import named
from services.common.types import DbConnection


@dataclass(frozen=True)
class AttachmentRow:
    id: UUID
    message_id: UUID
    url: str
    type: str
    name: str
    size: int
    metadata: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class MessageRow:
    id: UUID
    thread_id: UUID
    user_id: UUID
    content: str
    parent_id: UUID | None
    status: str
    metadata: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    seq: int
    change_seq: int
    attachments: list[AttachmentRow] = field(default_factory=list)


# Every statement returning these rows selects these columns (see rows.py);
# a message's attachments are read apart.
_LOADED_APART = frozenset({"attachments"})
MESSAGE_COLUMNS = column_list(MessageRow, exclude=_LOADED_APART)
ATTACHMENT_COLUMNS = column_list(AttachmentRow)


def _qualified(alias: str) -> str:
    """MESSAGE_COLUMNS of table alias `alias` (for joins)."""
    return column_list(MessageRow, alias=alias, exclude=_LOADED_APART)


class SendOutcome(StrEnum):
    """What chat_send_message did, spelled as its `outcome` column says it."""

    CREATED = "created"
    DUPLICATE = "duplicate"  # a retry of the same request: the original message
    # Refusals (no message):
    THREAD_NOT_FOUND = "thread_not_found"
    NOT_PARTICIPANT = "not_participant"
    ARCHIVED = "archived"
    INACTIVE = "inactive"
    BAD_PARENT = "bad_parent"
    REQUEST_ID_REUSED = "request_id_reused"


class SendResult(NamedTuple):
    outcome: SendOutcome
    message: MessageRow | None  # None exactly when the send was refused


@dataclass(frozen=True)
class NewAttachment:
    url: str
    type: str
    name: str
    size: int
    metadata: dict[str, Any] | None


SEND = named(
    "messages.send",
    f"""
    SELECT outcome, {MESSAGE_COLUMNS}, attachments
    FROM chat_send_message($1, $2, $3, $4, $5, $6, $7)
    """,  # noqa: S608
)
GET = named(
    "messages.get",
    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1",  # noqa: S608
)
ATTACHMENTS_OF = named(
    "messages.attachments_of",
    f"""
    SELECT {ATTACHMENT_COLUMNS}
    FROM message_attachments WHERE message_id = ANY ($1::uuid[])
    ORDER BY created_at, id
    """,  # noqa: S608
)


def _keyset_page(match: str, order: str, position_param: int) -> str:
    """The ids and keys of one page of messages matching `match`, in (created_at, id)
    `order` ("DESC": newest first, "ASC": oldest first), after the position given by
    parameters `position_param` (a timestamp, NULL for the first page) and the next
    (an id), at most the parameter after those many rows.

    The one home of the keyset rule: the comparison follows the order, so a page
    is one index range scan wherever it starts and deep pages cost what the first
    does. Only this module's constant SQL and ints are put in; values are parameters.
    """
    after = "<" if order == "DESC" else ">"
    at, at_id, limit = position_param, position_param + 1, position_param + 2
    return f"""
    SELECT id, created_at FROM messages
    WHERE {match} AND (${at}::timestamptz IS NULL OR (created_at, id) {after} (${at}, ${at_id}))
    ORDER BY created_at {order}, id {order}
    LIMIT ${limit}
    """  # noqa: S608 (constants of this module and ints; values are parameters)


# History: idx_messages_thread (thread_id, created_at DESC, id DESC).
THREAD_PAGE = _keyset_page("thread_id = $1", "DESC", 2)
# Replies, oldest first: idx_messages_replies (parent_id, created_at, id).
REPLIES_PAGE = _keyset_page("parent_id = $1", "ASC", 2)
# One user's messages across threads: idx_messages_user.
USER_PAGE = _keyset_page("user_id = $1", "DESC", 2)
# JSONB containment through the GIN index idx_messages_metadata.
SEARCH_PAGE = _keyset_page(
    "metadata @> $1::jsonb AND ($2::uuid IS NULL OR thread_id = $2)", "DESC", 3
)

# About how large message m is once served: content, metadata as JSON text,
# attachments' strings and metadata, and a fixed allowance per message and per
# attachment for ids, timestamps, cursor and framing. `octet_length(content)`
# reads a TOASTed value's size without fetching it; the JSON ones print it.
_STORED_BYTES = """
    octet_length(m.content) + coalesce(octet_length(m.metadata::text), 0)
    + coalesce((SELECT sum(octet_length(a.url) + octet_length(a.type) + octet_length(a.name)
                           + coalesce(octet_length(a.metadata::text), 0) + 128)
                FROM message_attachments a WHERE a.message_id = m.id), 0)
    + 256
"""


# Message m's attachments as a JSON array in their order, NULL when it has none
# (most have none): the page carries them, so a page is one round trip.
_ATTACHMENTS_JSON = """(
    SELECT jsonb_agg(to_jsonb(a) ORDER BY a.created_at, a.id)
    FROM message_attachments a WHERE a.message_id = m.id)"""


def _bounded(page_sql: str, order: str, max_bytes_param: int) -> str:
    """`page_sql` (a keyset page above), stopped by bytes as well as by its LIMIT.

    The page query picks its rows' ids as before (its own plan and index; only
    ids and keys are read). The walk then sizes them one by one in page order
    and stops after the row that brings the running total to the byte budget
    (parameter `max_bytes_param`), so only that prefix is ever sized, fetched
    or sent, however large the rows and page_size are. Each row also carries
    `fetched`: how many rows the page query found, so the caller knows whether
    rows follow the last one returned. Only this module's constant SQL and an
    int are put in; every value is a parameter.
    """
    return f"""
    WITH RECURSIVE candidates AS MATERIALIZED (
        SELECT array_agg(p.id ORDER BY p.created_at {order}, p.id {order}) AS ids
        FROM ({page_sql}) p
    ), walk (n, total) AS (
        SELECT 0, 0::bigint
        UNION ALL
        SELECT w.n + 1,
               w.total + (SELECT {_STORED_BYTES} FROM messages m WHERE m.id = c.ids[w.n + 1])
        FROM walk w, candidates c
        WHERE w.n < cardinality(c.ids) AND w.total < ${max_bytes_param}
    )
    SELECT {_qualified("m")}, cardinality(c.ids) AS fetched, {_ATTACHMENTS_JSON} AS attachments
    FROM walk w, candidates c, messages m
    WHERE w.n > 0 AND m.id = c.ids[w.n]
    ORDER BY w.n
    """  # noqa: S608


THREAD_PAGE_BOUNDED = named("messages.thread_page", _bounded(THREAD_PAGE, "DESC", 5))
REPLIES_PAGE_BOUNDED = named("messages.replies_page", _bounded(REPLIES_PAGE, "ASC", 5))
USER_PAGE_BOUNDED = named("messages.user_page", _bounded(USER_PAGE, "DESC", 5))
SEARCH_PAGE_BOUNDED = named("messages.search_page", _bounded(SEARCH_PAGE, "DESC", 6))
# Replay and live fetch, in commit order: a thread's stream after position $2,
# that is every message created after it (at its seq), every later change (at
# change_seq; edits in between collapse into the latest) and every removal from
# history (message_removals, status 'removed'). A creation is never hidden
# behind a later edit, so a client learns of every message through a `created`
# event. Each branch walks its own index. At most $3 events, and past the first
# about $4 bytes of them (content, metadata and attachments as stored), so a
# batch of maximum-size messages stays bounded in memory.
EVENTS_AFTER = named(
    "messages.events_after",
    f"""
    SELECT {MESSAGE_COLUMNS}, position, is_creation, fetched
    FROM (
        SELECT e.*, sum(e.bytes) OVER (ORDER BY e.position) - e.bytes AS bytes_before,
               count(*) OVER () AS fetched
        FROM (
            SELECT e.*,
                   octet_length(e.content) + coalesce(octet_length(e.metadata::text), 0)
                   + coalesce((SELECT sum(octet_length(a.url) + octet_length(a.name)
                                          + coalesce(octet_length(a.metadata::text), 0) + 64)
                               FROM message_attachments a WHERE a.message_id = e.id), 0)
                   + 128 AS bytes
            FROM (
                (SELECT {MESSAGE_COLUMNS}, seq AS position, true AS is_creation
                 FROM messages
                 WHERE thread_id = $1 AND seq > $2
                 ORDER BY seq
                 LIMIT $3)
                UNION ALL
                (SELECT {MESSAGE_COLUMNS}, change_seq AS position, false AS is_creation
                 FROM messages
                 WHERE thread_id = $1 AND change_seq > $2 AND change_seq <> seq
                 ORDER BY change_seq
                 LIMIT $3)
                UNION ALL
                (SELECT message_id, thread_id, user_id, '', NULL::uuid, 'removed', NULL::jsonb,
                        removed_at, removed_at, position, position, position, false
                 FROM message_removals
                 WHERE thread_id = $1 AND position > $2
                 ORDER BY position
                 LIMIT $3)
                ORDER BY position
                LIMIT $3
            ) e
        ) e
    ) e
    WHERE bytes_before < $4
    ORDER BY position
    """,  # noqa: S608
)
# May these readers still stream the thread? One row per thread that exists:
# archived or not, its position, which of the users $2 are participants and
# which are inactive or gone. The hub reads this *after* the events it is about
# to deliver (see streams/fanout.py: "events, then access").
STREAM_ACCESS = named(
    "messages.stream_access",
    """
    SELECT t.is_archived, t.last_seq,
           ARRAY(SELECT p.user_id FROM thread_participants p
                 WHERE p.thread_id = t.id AND p.user_id = ANY ($2::uuid[])) AS members,
           ARRAY(SELECT x.id FROM unnest($2::uuid[]) AS x (id)
                 WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = x.id AND u.is_active))
               AS inactive
    FROM threads t WHERE t.id = $1
    """,
)
# Every change to an existing message starts by locking its thread's row, as a
# send does: changes of one thread serialise, so checks made after it (the
# message not deleted, its attachment count) still hold at commit, and a thread
# deleted meanwhile is seen as gone (no row) rather than failing later.
# Where each thread's stream is: the periodic catch-up read of every feed
# (streams/fanout.py); a thread missing here was deleted or archived away.
THREAD_POSITIONS = named(
    "messages.thread_positions",
    "SELECT id, last_seq, is_archived FROM threads WHERE id = ANY ($1::uuid[])",
)
LOCK_THREAD_OF = named(
    "messages.lock_thread_of",
    """
    SELECT t.id FROM threads t JOIN messages m ON m.thread_id = t.id
    WHERE m.id = $1
    FOR UPDATE OF t
    """,
)
# A change to an existing message takes the next position under the thread lock;
# chat_bump_thread (db/functions/positions.sql) takes the position; the service
# wakes the thread's streams after commit (streams/waker.py).
BUMP = named("messages.bump_thread", "SELECT chat_bump_thread($1)")
EDIT = named(
    "messages.edit",
    f"""
    UPDATE messages SET
        content = CASE WHEN $2 THEN $3 ELSE content END,
        metadata = CASE WHEN $4 THEN $5::jsonb ELSE metadata END,
        status = 'edited', {UPDATED_AT_ADVANCES}, change_seq = $6
    WHERE id = $1 AND status <> 'deleted'
    RETURNING {MESSAGE_COLUMNS}
    """,  # noqa: S608
)
TOMBSTONE = named(
    "messages.tombstone",
    f"""
    UPDATE messages SET content = '', metadata = NULL, status = 'deleted',
        {UPDATED_AT_ADVANCES}, change_seq = $2
    WHERE id = $1 AND status <> 'deleted'
    RETURNING {MESSAGE_COLUMNS}
    """,  # noqa: S608
)
DROP_ATTACHMENTS = named(
    "messages.drop_attachments", "DELETE FROM message_attachments WHERE message_id = $1"
)
TOUCH = named(
    "messages.touch",
    f"UPDATE messages SET change_seq = $2, {UPDATED_AT_ADVANCES} WHERE id = $1",  # noqa: S608
)
INSERT_ATTACHMENT = named(
    "messages.insert_attachment",
    f"""
    INSERT INTO message_attachments (message_id, url, type, name, size, metadata)
    VALUES ($1, $2, $3, $4, $5, $6::jsonb)
    RETURNING {ATTACHMENT_COLUMNS}
    """,  # noqa: S608
)
COUNT_ATTACHMENTS = named(
    "messages.count_attachments",
    "SELECT count(*) FROM message_attachments WHERE message_id = $1",
)


def _message(record: asyncpg.Record) -> MessageRow:
    """A message row by column name (a record may carry more columns, e.g. `fetched`)."""
    return row_of(MessageRow, record, exclude=_LOADED_APART)


def _attachment(record: asyncpg.Record) -> AttachmentRow:
    return row_of(AttachmentRow, record)


async def with_attachments(conn: DbConnection, rows: Sequence[MessageRow]) -> list[MessageRow]:
    """The rows with their attachments (one query for the whole page)."""
    if not rows:
        return []
    found: dict[UUID, list[AttachmentRow]] = {}
    for record in await conn.fetch(ATTACHMENTS_OF, [r.id for r in rows]):
        found.setdefault(record["message_id"], []).append(_attachment(record))
    # Most messages have none: only those with attachments are rebuilt.
    return [replace(r, attachments=found[r.id]) if r.id in found else r for r in rows]


async def send(
    conn: DbConnection,
    *,
    thread_id: UUID,
    user_id: UUID,
    content: str,
    parent_id: UUID | None,
    metadata: dict[str, Any] | None,
    request_id: UUID | None,
    attachments: Sequence[NewAttachment],
) -> SendResult:
    """One round trip: the outcome and the message (None when refused); see chat_send_message."""
    payload = [
        {"url": a.url, "type": a.type, "name": a.name, "size": a.size, "metadata": a.metadata}
        for a in attachments
    ]
    args = (thread_id, user_id, content, parent_id, metadata, request_id, payload)
    try:
        record = await conn.fetchrow(SEND, *args)
    except asyncpg.UniqueViolationError:
        # The same request_id raced in through another thread and committed first
        # (the unique index, not the thread lock, caught it): sending again compares
        # with that message, so the outcome is "duplicate" or "request_id_reused".
        record = await conn.fetchrow(SEND, *args)
    assert record is not None
    outcome = SendOutcome(record["outcome"])
    if record["id"] is None:
        return SendResult(outcome, None)
    columns = dict(record)
    del columns["outcome"]
    stored = [attachment_from_json(a) for a in columns.pop("attachments")]
    return SendResult(outcome, MessageRow(**columns, attachments=stored))


def attachment_from_json(value: dict[str, Any]) -> AttachmentRow:
    """An attachment as JSON (to_jsonb of the row): chat_send_message returns
    them so, and the user streams' log stores them so."""
    return AttachmentRow(
        id=UUID(value["id"]),
        message_id=UUID(value["message_id"]),
        url=value["url"],
        type=value["type"],
        name=value["name"],
        size=int(value["size"]),
        metadata=value["metadata"],
        created_at=datetime.fromisoformat(value["created_at"]),
    )


async def get_message(conn: DbConnection, message_id: UUID) -> MessageRow | None:
    record = await conn.fetchrow(GET, message_id)
    if record is None:
        return None
    return (await with_attachments(conn, [_message(record)]))[0]


# A keyset position in a listing: the (created_at, id) of the last message served.
Position = tuple[datetime, UUID]


@dataclass(frozen=True, slots=True)
class PageRow:
    """One listing row as read: its version and position at once, its MessageRow
    (with attachments) only when `row()` builds it, which a cached serialisation
    of the same version spares (message_cache.py)."""

    version: tuple[UUID, int, datetime]  # (id, change_seq, updated_at)
    position: Position
    record: asyncpg.Record

    def row(self) -> MessageRow:
        return _with_attachments_of(self.record)


@dataclass(frozen=True, slots=True)
class Page:
    """A listing's rows in order, bounded in rows and bytes."""

    rows: list[PageRow]
    fetched: int  # rows the page query found: more than `rows` when the walk stopped on bytes


@dataclass(frozen=True, slots=True)
class Window:
    """Which rows of a listing a page reads: after `after` (None: from the start), at
    most `limit` rows and, past the first, about `max_bytes` stored bytes."""

    after: Position | None
    limit: int
    max_bytes: int


async def _bounded_page(conn: DbConnection, sql: str, *args: object, window: Window) -> Page:
    """A page by a *_BOUNDED query: `args` are its leading parameters, then the
    position, the row limit and the byte budget (see _bounded)."""
    after = window.after or (None, None)
    records = await conn.fetch(sql, *args, *after, window.limit, window.max_bytes)
    rows = [
        PageRow((r["id"], r["change_seq"], r["updated_at"]), (r["created_at"], r["id"]), r)
        for r in records
    ]
    return Page(rows, int(records[0]["fetched"]) if records else 0)


def _with_attachments_of(record: asyncpg.Record) -> MessageRow:
    """A page row with the attachments its `attachments` column carries as JSON."""
    row = _message(record)
    carried = record["attachments"]
    if not carried:
        return row
    return replace(row, attachments=[attachment_from_json(a) for a in carried])


async def list_history(conn: DbConnection, thread_id: UUID, window: Window) -> Page:
    """A thread's messages, newest first."""
    return await _bounded_page(conn, THREAD_PAGE_BOUNDED, thread_id, window=window)


async def list_replies(conn: DbConnection, parent_id: UUID, window: Window) -> Page:
    """Replies to a message, oldest first."""
    return await _bounded_page(conn, REPLIES_PAGE_BOUNDED, parent_id, window=window)


async def list_user_messages(conn: DbConnection, user_id: UUID, window: Window) -> Page:
    """One user's messages across threads, newest first."""
    return await _bounded_page(conn, USER_PAGE_BOUNDED, user_id, window=window)


async def search(
    conn: DbConnection, contains: dict[str, Any], thread_id: UUID | None, window: Window
) -> Page:
    """Messages whose metadata contains `contains`, in one thread (None: every
    thread), newest first."""
    return await _bounded_page(conn, SEARCH_PAGE_BOUNDED, contains, thread_id, window=window)


@dataclass(frozen=True, slots=True)
class ThreadEvent:
    """One position of a thread's stream: a message's creation, or its latest change."""

    position: int
    is_creation: bool
    row: MessageRow


@dataclass(frozen=True, slots=True)
class EventBatch:
    events: list[ThreadEvent]
    complete: bool  # nothing more after these events right now (no limit was hit)


async def events_after(
    conn: DbConnection, thread_id: UUID, after: int, limit: int, max_bytes: int
) -> EventBatch:
    """At most `limit` events after `after`, and past the first about `max_bytes`."""
    records = await conn.fetch(EVENTS_AFTER, thread_id, after, limit, max_bytes)
    rows = await with_attachments(conn, [_message(r) for r in records])
    fetched = records[0]["fetched"] if records else 0
    return EventBatch(
        [
            ThreadEvent(r["position"], r["is_creation"], row)
            for r, row in zip(records, rows, strict=True)
        ],
        complete=fetched < limit and len(records) == fetched,
    )


@dataclass(frozen=True, slots=True)
class StreamAccess:
    """A thread's state for its streams, read in one statement."""

    archived: bool
    last_seq: int
    members: frozenset[UUID]
    inactive: frozenset[UUID]


async def stream_access(
    conn: DbConnection, thread_id: UUID, user_ids: Sequence[UUID]
) -> StreamAccess | None:
    """None when the thread does not exist (deleted, or moved to the archive)."""
    record = await conn.fetchrow(STREAM_ACCESS, thread_id, list(user_ids))
    if record is None:
        return None
    return StreamAccess(
        archived=bool(record["is_archived"]),
        last_seq=int(record["last_seq"]),
        members=frozenset(record["members"]),
        inactive=frozenset(record["inactive"]),
    )


async def thread_positions(
    conn: DbConnection, thread_ids: Sequence[UUID]
) -> dict[UUID, tuple[int, bool]]:
    """Each existing thread's (last position, archived)."""
    rows = await conn.fetch(THREAD_POSITIONS, list(thread_ids))
    return {row["id"]: (int(row["last_seq"]), bool(row["is_archived"])) for row in rows}


async def lock_thread_of(conn: DbConnection, message_id: UUID) -> None:
    """Lock the message's thread for the caller's transaction (see LOCK_THREAD_OF)."""
    await conn.execute(LOCK_THREAD_OF, message_id)


async def _bump(conn: DbConnection, thread_id: UUID) -> int:
    """The thread's next position (its streams are woken after the commit)."""
    return int(await conn.fetchval(BUMP, thread_id))


async def edit(
    conn: DbConnection,
    message: MessageRow,
    *,
    content: str | None,
    metadata: tuple[bool, dict[str, Any] | None],
) -> MessageRow | None:
    """Apply an edit in the caller's transaction; None if the message was deleted meanwhile."""
    seq = await _bump(conn, message.thread_id)
    record = await conn.fetchrow(
        EDIT,
        message.id,
        content is not None,
        content,
        metadata[0],
        metadata[1],
        seq,
    )
    if record is None:
        return None
    return (await with_attachments(conn, [_message(record)]))[0]


async def tombstone(conn: DbConnection, message: MessageRow) -> MessageRow:
    """Soft-delete in the caller's transaction; deleting a tombstone changes nothing."""
    seq = await _bump(conn, message.thread_id)
    record = await conn.fetchrow(TOMBSTONE, message.id, seq)
    if record is None:  # already deleted: idempotent, and no new position is used
        raise AlreadyDeleted
    await conn.execute(DROP_ATTACHMENTS, message.id)
    return _message(record)


class AlreadyDeleted(Exception):
    """Raised inside the transaction so the unused position bump rolls back."""


async def count_attachments(conn: DbConnection, message_id: UUID) -> int:
    return int(await conn.fetchval(COUNT_ATTACHMENTS, message_id))


async def add_attachment(
    conn: DbConnection, message: MessageRow, attachment: NewAttachment
) -> tuple[AttachmentRow, int]:
    """The attachment, and the thread position it took."""
    seq = await _bump(conn, message.thread_id)
    record = await conn.fetchrow(
        INSERT_ATTACHMENT,
        message.id,
        attachment.url,
        attachment.type,
        attachment.name,
        attachment.size,
        attachment.metadata,
    )
    assert record is not None
    await conn.execute(TOUCH, message.id, seq)
    return _attachment(record), seq
