"""Every list response fits a default client: pages are bounded in bytes as well as rows.

Within the documented limits one message can be about 1 MB serialised: 10,000
characters of 4-byte UTF-8 content, and metadata on the message and each of its
20 attachments at 16 KiB of compact JSON shaped as a list of 0.0 (4 bytes of
JSON, 11 of protobuf each: the largest protobuf a JSON size allows). Before the
byte budget, 5 of them made ListMessages fail with RESOURCE_EXHAUSTED for every
default client (4 MiB receive limit), whatever page size it asked for.

Every call here goes through a default client (the fixtures' channel has no
options), and every response is checked against LIST_RESPONSE_MAX_BYTES; the
pages, concatenated, must be the listing's full order as the database has it:
no gap, no duplicate.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg
import pytest
from chat.v1 import messages_pb2, messages_pb2_grpc
from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2

from services.common.pagination import MAX_PAGE_SIZE
from services.common.settings import ServiceSettings
from services.messages.paging import (
    PAGE_TOKEN_RESERVE,
    largest_message_bytes,
    repeated_field_size,
)
from services.messages.service import DEFINITION
from services.messages.settings import MessagesSettings
from services.messages.validation import NAME_MAX, TYPE_MAX, URL_MAX
from tests.conftest import running
from tests.messages.conftest import Room
from tests.rpc_errors import as_user

if TYPE_CHECKING:
    from tests.messages.conftest import Stub

MIB = 1024 * 1024
DEFAULT_CLIENT_LIMIT = 4 * MIB  # grpc's default max_receive_message_length
LIMITS = MessagesSettings.model_construct()  # the defaults, not the shell's environment
BUDGET = LIMITS.list_response_max_bytes
WIDE = "\U0001f600"  # 4 bytes of UTF-8; the limits count characters
# Page sizes tried on every listing: each one up to past the number of the
# largest stored messages a page holds (7), the default (0 -> 50), the largest
# and one coerced to it. Every larger size pages as these do: the budget ends
# each page before page_size would.
PAGE_SIZES = [*range(1, 9), 0, MAX_PAGE_SIZE, 1000]
SMALL_BUDGET = 64 * 1024  # LIST_RESPONSE_MAX_BYTES at its minimum
# The largest timestamp (9999-12-31T23:59:59.999999999Z): the most bytes one takes.
LATEST = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)


class Reply(Protocol):
    @property
    def messages(self) -> Any: ...

    @property
    def next_page_token(self) -> str: ...

    def ByteSize(self) -> int: ...


# page_size, page_token -> one response
Lister = Callable[[int, str], Awaitable[Reply]]


def wide(prefix: str, length: int) -> str:
    return prefix + WIDE * (length - len(prefix))


def as_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def compact(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":")).encode())


def float_metadata(**fields: Any) -> struct_pb2.Struct:
    """At most MESSAGE_MAX_METADATA_BYTES of JSON, as large as a Struct gets: a list of 0.0."""
    empty = dict(fields, f=[])
    count = (LIMITS.max_metadata_bytes - compact(empty) + 1) // 4  # "0.0," each, one comma less
    value = dict(fields, f=[0.0] * count)
    assert LIMITS.max_metadata_bytes - 4 < compact(value) <= LIMITS.max_metadata_bytes
    return as_struct(value)


def string_metadata(**fields: Any) -> struct_pb2.Struct:
    """Exactly MESSAGE_MAX_METADATA_BYTES of JSON in one string: as large as stored text gets."""
    value = dict(fields, s="")
    value["s"] = "x" * (LIMITS.max_metadata_bytes - compact(value))
    assert compact(value) == LIMITS.max_metadata_bytes
    return as_struct(value)


def escaped_metadata(**fields: Any) -> struct_pb2.Struct:
    """Control characters: 6 bytes each as JSON (and as stored JSON text), 1 in protobuf."""
    value = dict(fields, e="")
    value["e"] = "\x01" * ((LIMITS.max_metadata_bytes - compact(value)) // 6)
    assert LIMITS.max_metadata_bytes - 6 < compact(value) <= LIMITS.max_metadata_bytes
    return as_struct(value)


SHAPES: dict[str, Callable[..., struct_pb2.Struct]] = {
    "floats": float_metadata,
    "string": string_metadata,
    "escaped": escaped_metadata,
}


def largest_request(
    room: Room, label: str, *, shape: str = "floats", parent_id: str = ""
) -> messages_pb2.SendMessageRequest:
    """A send at every limit at once, its metadata in `shape`."""
    metadata = SHAPES[shape]
    attachment = messages_pb2.Attachment(
        url=wide("https://example.com/", URL_MAX),
        type="image/" + "x" * (TYPE_MAX - len("image/")),  # printable ASCII only
        name=wide("", NAME_MAX),
        size=2**31 - 1,
        metadata=metadata(),
    )
    return messages_pb2.SendMessageRequest(
        thread_id=room.thread_id,
        user_id=room.member,
        content=wide(f"{label} ", LIMITS.max_content_chars),
        parent_id=parent_id,
        metadata=metadata(tag="big"),
        attachments=[attachment] * LIMITS.max_attachments,
    )


def small_request(
    room: Room, label: str, *, parent_id: str = ""
) -> messages_pb2.SendMessageRequest:
    return messages_pb2.SendMessageRequest(
        thread_id=room.thread_id,
        user_id=room.member,
        content=label,
        parent_id=parent_id,
        metadata=as_struct({"tag": "big", "size": "small"}),
    )


async def send(stub: Stub, request: messages_pb2.SendMessageRequest) -> messages_pb2.Message:
    reply = await stub.SendMessage(request, metadata=as_user(request.user_id))
    return reply.message


@dataclass
class Listing:
    name: str
    call: Lister
    order_sql: str  # the listing's full order, straight from the database
    key: uuid.UUID


LISTINGS = ["ListMessages", "ListReplies", "ListUserMessages", "SearchMessages"]


def listings(stub: Stub, room: Room, parent_id: str) -> list[Listing]:
    """The four list RPCs over the same messages, each as a member calls it."""
    member = as_user(room.member)
    tag = as_struct({"tag": "big"})

    async def history(size: int, token: str) -> Reply:
        request = messages_pb2.ListMessagesRequest(
            thread_id=room.thread_id, page_size=size, page_token=token
        )
        return await stub.ListMessages(request, metadata=member)

    async def replies(size: int, token: str) -> Reply:
        request = messages_pb2.ListRepliesRequest(
            parent_id=parent_id, page_size=size, page_token=token
        )
        return await stub.ListReplies(request, metadata=member)

    async def own(size: int, token: str) -> Reply:
        request = messages_pb2.ListUserMessagesRequest(
            user_id=room.member, page_size=size, page_token=token
        )
        return await stub.ListUserMessages(request, metadata=member)

    async def search(size: int, token: str) -> Reply:
        request = messages_pb2.SearchMessagesRequest(
            thread_id=room.thread_id, metadata_contains=tag, page_size=size, page_token=token
        )
        return await stub.SearchMessages(request, metadata=member)

    newest_first = "ORDER BY created_at DESC, id DESC"
    return [
        Listing(
            "ListMessages",
            history,
            f"SELECT id FROM messages WHERE thread_id = $1 {newest_first}",
            uuid.UUID(room.thread_id),
        ),
        Listing(
            "ListReplies",
            replies,
            "SELECT id FROM messages WHERE parent_id = $1 ORDER BY created_at, id",
            uuid.UUID(parent_id),
        ),
        Listing(
            "ListUserMessages",
            own,
            f"SELECT id FROM messages WHERE user_id = $1 {newest_first}",
            uuid.UUID(room.member),
        ),
        Listing(
            "SearchMessages",
            search,
            'SELECT id FROM messages WHERE thread_id = $1 AND metadata @> \'{"tag": "big"}\' '
            + newest_first,
            uuid.UUID(room.thread_id),
        ),
    ]


async def page_through(
    listing: Listing, size: int, *, budget: int = BUDGET, sizes: dict[str, int] | None = None
) -> list[list[str]]:
    """Every page of `listing` at `size`, as message ids; each response checked against
    `budget`. `sizes` receives what each message adds to a list response."""
    pages: list[list[str]] = []
    token = ""
    while True:
        reply = await listing.call(size, token)  # a default client: a larger reply fails here
        assert reply.ByteSize() <= budget, (listing.name, size, len(pages), reply.ByteSize())
        assert len(reply.messages) >= 1, (listing.name, size, len(pages))  # always progresses
        assert len(reply.messages) <= (size or 50)
        assert len(reply.next_page_token) < PAGE_TOKEN_RESERVE
        pages.append([m.id for m in reply.messages])
        if sizes is not None:
            sizes.update({m.id: repeated_field_size(m.ByteSize()) for m in reply.messages})
        if not reply.next_page_token:
            return pages
        assert len(pages) < 10_000, "paging does not end"
        token = reply.next_page_token


async def full_order(db: asyncpg.Pool, listing: Listing) -> list[str]:
    return [str(r["id"]) for r in await db.fetch(listing.order_sql, listing.key)]


def greedy_pages(order: list[str], sizes: dict[str, int], page_size: int) -> list[list[str]]:
    """The documented rule: messages in order while the page (token reserve included)
    stays within the budget and page_size, at least one a page."""
    limit = page_size or 50
    pages: list[list[str]] = []
    i = 0
    while i < len(order):
        page = [order[i]]
        total = PAGE_TOKEN_RESERVE + sizes[order[i]]
        i += 1
        while i < len(order) and len(page) < limit and total + sizes[order[i]] <= BUDGET:
            total += sizes[order[i]]
            page.append(order[i])
            i += 1
        pages.append(page)
    return pages


def test_one_message_at_every_limit_fits_a_page_and_a_default_client(room: Room) -> None:
    """The arithmetic of the README, checked on the largest message the limits allow."""
    largest = 0
    for shape in SHAPES:
        request = largest_request(room, "0", shape=shape)
        # The served Message adds ids, timestamps and a cursor to what was sent.
        served = messages_pb2.Message(
            id=str(uuid.uuid4()),
            thread_id=room.thread_id,
            user_id=room.member,
            content=request.content,
            parent_id=str(uuid.uuid4()),
            status=messages_pb2.MESSAGE_STATUS_EDITED,
            metadata=request.metadata,
            attachments=[
                messages_pb2.Attachment(
                    id=str(uuid.uuid4()),
                    message_id=str(uuid.uuid4()),
                    url=a.url,
                    type=a.type,
                    name=a.name,
                    size=a.size,
                    metadata=a.metadata,
                    created_at=LATEST,
                )
                for a in request.attachments
            ],
            created_at=LATEST,
            updated_at=LATEST,
            cursor="Yzo" + "A" * 80,
        )
        largest = max(largest, served.ByteSize())
        assert request.ByteSize() < ServiceSettings.model_construct().max_receive_message_bytes
    assert largest > 1_000_000  # the float-list shape: about 1 MB
    assert largest <= largest_message_bytes(LIMITS)
    assert PAGE_TOKEN_RESERVE + repeated_field_size(largest_message_bytes(LIMITS)) <= BUDGET
    assert BUDGET < DEFAULT_CLIENT_LIMIT


async def check_listings(
    stub: Stub, room: Room, db: asyncpg.Pool, parent_id: str, sizes_by_listing: dict[str, list[int]]
) -> None:
    """Page through each listing at each of its sizes: the pages are the full order
    and exactly the documented rule's (which the first size, 1, measures)."""
    for listing in listings(stub, room, parent_id):
        order = await full_order(db, listing)
        sizes: dict[str, int] = {}
        for size in sizes_by_listing[listing.name]:
            pages = await page_through(listing, size, sizes=sizes)
            assert [i for page in pages for i in page] == order, (listing.name, size)
            assert sum(sizes.values()) > DEFAULT_CLIENT_LIMIT  # all at once: unreadable
            assert pages == greedy_pages(order, sizes, size), (listing.name, size)


async def test_largest_stored_messages_page_through_every_list_rpc_at_every_page_size(
    messages: Stub, room: Room, db_pool: asyncpg.Pool
) -> None:
    """16 messages at every limit with string metadata (about 430 KB each, 7 MB in
    all: the most text the limits let a message store) among small ones.

    The store's estimate and the exact size agree within a few hundred bytes a
    message here, so the exact size decides every page (the walk stops after
    the row that crosses the budget): the pages are exactly the documented rule's.
    """
    parent = await send(messages, small_request(room, "parent"))
    for i in range(16):
        await send(messages, largest_request(room, f"big {i}", shape="string", parent_id=parent.id))
        if i % 5 == 0:
            await send(messages, small_request(room, f"small {i}", parent_id=parent.id))
    every = {name: PAGE_SIZES for name in LISTINGS}
    await check_listings(messages, room, db_pool, parent.id, every)


async def test_largest_serialised_messages_page_through_every_list_rpc(
    messages: Stub, room: Room, db_pool: asyncpg.Pool
) -> None:
    """5 messages at every limit with float-list metadata (about 1 MB each, the most
    protobuf the limits allow) and small ones.

    Here the store's estimate (metadata as JSON text, about 400 KB a message) is
    below the exact size, so the exact check ends the pages: 3 such messages
    a page. Serving one costs about 70 ms of conversion, hence fewer sizes.
    """
    parent = await send(messages, small_request(room, "parent"))
    for i in range(5):
        await send(messages, largest_request(room, f"big {i}", parent_id=parent.id))
        if i % 2 == 0:
            await send(messages, small_request(room, f"small {i}", parent_id=parent.id))
    some = {name: [MAX_PAGE_SIZE] for name in LISTINGS}
    some["ListMessages"] = [1, 2, 3, 4, MAX_PAGE_SIZE]
    await check_listings(messages, room, db_pool, parent.id, some)


async def test_mixed_shapes_page_without_gap_or_duplicate(
    messages: Stub, room: Room, db_pool: asyncpg.Pool
) -> None:
    """Large messages of every metadata shape, small ones, edited and deleted ones.

    The escaped shape is the opposite case: its stored JSON text is about six
    times its protobuf, so the store's walk ends pages (on its estimate) before
    the exact size would; the string shape is where the two agree.
    """
    parent = await send(messages, small_request(room, "parent"))
    sent: list[messages_pb2.Message] = []
    shapes = ["escaped", "string", "escaped", "small", "floats", "escaped"] * 3
    for i, shape in enumerate(shapes):
        if shape == "small":
            request = small_request(room, f"small {i}", parent_id=parent.id)
        else:
            shape = "escaped" if shape == "floats" and i > 4 else shape  # one float: slow
            request = largest_request(room, f"{i}", shape=shape, parent_id=parent.id)
        sent.append(await send(messages, request))
    member = as_user(room.member)
    await messages.DeleteMessage(messages_pb2.DeleteMessageRequest(id=sent[5].id), metadata=member)
    edited = messages_pb2.Message(id=sent[6].id, content=wide("edited ", 10_000))
    await messages.UpdateMessage(
        messages_pb2.UpdateMessageRequest(
            message=edited, update_mask=field_mask_pb2.FieldMask(paths=["content"])
        ),
        metadata=member,
    )
    for listing in listings(messages, room, parent.id):
        order = await full_order(db_pool, listing)
        for size in [1, 9, MAX_PAGE_SIZE]:
            pages = await page_through(listing, size)
            assert [i for page in pages for i in page] == order, (listing.name, size)


@pytest.fixture
async def small_budget_stub(
    service_settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Stub]:
    """A messages server with LIST_RESPONSE_MAX_BYTES at its minimum (64 KiB)."""
    monkeypatch.setenv("LIST_RESPONSE_MAX_BYTES", str(SMALL_BUDGET))
    async with running(DEFINITION, service_settings) as (_, channel):
        yield messages_pb2_grpc.MessagesServiceStub(channel)


async def test_a_small_budget_pages_every_page_size(
    small_budget_stub: Stub, room: Room, db_pool: asyncpg.Pool
) -> None:
    """Many page boundaries: 60 messages of 20 bytes to 40 KB under a 64 KiB budget,
    paged at every page size up to past the most messages a page holds, and more."""
    stub = small_budget_stub
    parent = await send(stub, small_request(room, "parent"))
    for i in range(60):
        chars = [20, 400, 9_000, 10_000, 3_000][i % 5] - (i % 7)
        content = wide(f"{i} ", chars) if i % 2 else f"{i} " + "x" * (chars - len(f"{i} "))
        request = small_request(room, content, parent_id=parent.id)
        await send(stub, request)
    history, *_ = listings(stub, room, parent.id)
    order = await full_order(db_pool, history)
    fullest = 0
    for size in [*range(1, 21), 50, MAX_PAGE_SIZE]:
        pages = await page_through(history, size, budget=SMALL_BUDGET)
        assert [i for page in pages for i in page] == order, size
        fullest = max(fullest, *(len(p) for p in pages))
    assert 5 < fullest < 20  # many boundaries, and 20 is past every page's end
    # The budget, not page_size, ends pages: 200 rows would be about 1 MB.
    assert len(await page_through(history, MAX_PAGE_SIZE, budget=SMALL_BUDGET)) > 10


async def test_replay_of_maximum_size_messages_reaches_a_default_client(
    messages: Stub, room: Room
) -> None:
    """Each stream response is one event: one message, which fits (see above)."""
    first = await send(messages, small_request(room, "first"))
    sent = [await send(messages, largest_request(room, f"big {i}")) for i in range(5)]
    stream = messages.StreamThreadMessages(
        messages_pb2.StreamThreadMessagesRequest(thread_id=room.thread_id, after=first.cursor),
        metadata=as_user(room.owner),
    )
    replayed: list[str] = []
    try:
        async for event in stream:
            assert event.ByteSize() < DEFAULT_CLIENT_LIMIT
            if event.WhichOneof("event") == "caught_up":
                break
            assert event.WhichOneof("event") == "created"
            replayed.append(event.created.id)
    finally:
        stream.cancel()
    assert replayed == [m.id for m in sent]


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += plan_nodes(child)
    return found


@pytest.mark.db
async def test_the_store_sizes_only_the_rows_a_page_can_hold(
    db_pool: asyncpg.Pool, room: Room
) -> None:
    """60 rows of 16 KiB metadata and 20 such attachments each, a page of 200 asked:
    the walk sizes and fetches rows until the byte budget, not 201 rows, and
    uses the indexes a plain page uses."""
    from services.messages import store

    thread = uuid.UUID(room.thread_id)
    await db_pool.execute(
        """
        INSERT INTO messages (thread_id, user_id, content, metadata, seq, change_seq)
        SELECT $1, $2, repeat('x', 10000),
               jsonb_build_object('s', repeat('y', 16370)), g, g
        FROM generate_series(1, 60) g
        """,
        thread,
        uuid.UUID(room.member),
    )
    await db_pool.execute(
        """
        INSERT INTO message_attachments (message_id, url, type, name, size, metadata)
        SELECT m.id, 'https://example.com/a', 'image/png', 'a.png', 1,
               jsonb_build_object('s', repeat('z', 16370))
        FROM messages m, generate_series(1, 20) WHERE m.thread_id = $1
        """,
        thread,
    )
    # And a long thread of replies beside it, so that the planner walks indexes as at scale.
    other = await db_pool.fetchval("INSERT INTO threads (name) VALUES ('long') RETURNING id")
    root = await db_pool.fetchval(
        "INSERT INTO messages (thread_id, user_id, content) VALUES ($1, $2, 'root') RETURNING id",
        other,
        uuid.UUID(room.member),
    )
    await db_pool.execute(
        "INSERT INTO messages (thread_id, user_id, content, parent_id, seq, change_seq) "
        "SELECT $1, $2, 'm', $3, g + 1, g + 1 FROM generate_series(1, 20000) g",
        other,
        uuid.UUID(room.member),
        root,
    )
    await db_pool.execute("VACUUM (ANALYZE) messages")
    async with db_pool.acquire() as conn:
        page = await store.list_history(
            conn, thread, store.Window(after=None, limit=MAX_PAGE_SIZE + 1, max_bytes=BUDGET)
        )
        rows, fetched = page.rows, page.fetched
        raw = await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {store.THREAD_PAGE_BOUNDED}",
            thread,
            None,
            None,
            MAX_PAGE_SIZE + 1,
            BUDGET,
        )
    # About 360 KB a row as stored: 9 rows reach 3 MiB.
    assert fetched == 60 and len(rows) == 9
    nodes = plan_nodes(json.loads(raw)[0]["Plan"])
    walk = next(n for n in nodes if n["Node Type"] == "Recursive Union")
    assert walk["Actual Rows"] == len(rows) + 1  # the start row and one per row sized
    # The page's keyset scan, then primary-key lookups: no scan of the table.
    assert {"idx_messages_thread", "messages_pkey"} <= {n.get("Index Name") for n in nodes}
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], raw
    async with db_pool.acquire() as conn:
        raw = await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {store.REPLIES_PAGE_BOUNDED}",
            root,
            None,
            None,
            MAX_PAGE_SIZE + 1,
            BUDGET,
        )
    nodes = plan_nodes(json.loads(raw)[0]["Plan"])
    # Replies keep their ordered range scan (idx_messages_replies) under the walk.
    replies = [n for n in nodes if n.get("Index Name") == "idx_messages_replies"]
    assert replies and replies[0]["Actual Rows"] == MAX_PAGE_SIZE + 1, raw
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], raw


async def test_limits_that_outgrow_the_budget_are_logged_at_start(
    service_settings: ServiceSettings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The defaults fit (no warning); metadata limits raised past the budget are named."""
    warning = "more than a list page may hold"
    async with running(DEFINITION, service_settings):
        assert warning not in caplog.text
    monkeypatch.setenv("MESSAGE_MAX_METADATA_BYTES", str(256 * 1024))
    async with running(DEFINITION, service_settings):
        assert warning in caplog.text
