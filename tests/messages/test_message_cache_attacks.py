"""Attacks on listings served from cached message bytes (services/messages/message_cache.py).

The cache keys a message's listing form by (id, change_seq). These tests try the
paths test_message_cache.py's random writer does not drive, each comparing a
server with the cache (warm: it has listed everything before) against one with
MESSAGE_CACHE_BYTES=0, byte for byte:

- `db archive` then `db restore` after an author's deletion (the restore rewrites
  replies' parent_id in archived_messages, then moves the rows back);
- a write rolled back after it took a position (the next write reuses it);
- writes and listings racing on both servers (one version, one serialisation);
- cache sizes of nothing, about one entry, and smaller than one message;
- pages of the largest messages at LIST_RESPONSE_MAX_BYTES, paged by tokens;
- access taken away after the pages were cached;
- grpcurl decoding every list RPC's pre-framed response.

And the byte bound itself: what a full cache really holds in memory.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from chat.v1 import messages_pb2, messages_pb2_grpc
from google.protobuf import field_mask_pb2, json_format, struct_pb2

from db.archive import archive_older_than, restore_thread
from services.common.settings import ServiceSettings
from services.messages.message_cache import SerializedMessages
from services.messages.service import DEFINITION
from services.users import store as users_store
from tests.conftest import running
from tests.factories import Room, new_group, new_users
from tests.grpcurl import HAVE_GRPCURL, NO_GRPCURL, grpcurl
from tests.messages.test_page_bytes import BUDGET, largest_request, small_request
from tests.rpc_errors import as_user

if TYPE_CHECKING:
    Stub = messages_pb2_grpc.MessagesServiceAsyncStub

TAG = {"tag": "t"}


@asynccontextmanager
async def serving(
    settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch, **env: str
) -> AsyncIterator[tuple[Stub, str]]:
    """A messages server started with `env` set (and unset again after it started)."""
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        async with running(DEFINITION, settings) as (service, channel):
            patch.undo()
            yield messages_pb2_grpc.MessagesServiceStub(channel), service.address


@pytest.fixture
async def cached(
    service_settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Stub]:
    """The service as `make run` starts it: the cache on, at its default size."""
    async with serving(service_settings, monkeypatch) as (stub, _):
        yield stub


@pytest.fixture
async def uncached(
    service_settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Stub]:
    async with serving(service_settings, monkeypatch, MESSAGE_CACHE_BYTES="0") as (stub, _):
        yield stub


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


class Scene:
    """A group thread with four members, and what its listings cover."""

    def __init__(self, thread: str, users: list[str]) -> None:
        self.thread = thread
        self.users = users
        self.sent: list[str] = []
        self.parents: list[str] = []


async def new_scene(db: asyncpg.Pool, members: int = 4) -> Scene:
    owner, *others = await new_users(db, members)
    thread = await new_group(db, owner, others[0])
    for user in others[1:]:
        await db.execute(
            "INSERT INTO thread_participants (thread_id, user_id, role) VALUES ($1, $2, 'member')",
            uuid.UUID(thread),
            uuid.UUID(user),
        )
    return Scene(thread, [owner, *others])


async def send(
    stub: Stub,
    scene: Scene,
    user: str,
    content: str,
    *,
    parent: str = "",
    tagged: bool = True,
    attachments: int = 0,
) -> str:
    request = messages_pb2.SendMessageRequest(
        thread_id=scene.thread,
        user_id=user,
        content=content,
        parent_id=parent,
        metadata=struct(TAG) if tagged else None,
    )
    for i in range(attachments):
        request.attachments.add(url=f"https://f/{i}", type="image/png", name=f"a{i}", size=i)
    reply = await stub.SendMessage(request)
    scene.sent.append(reply.message.id)
    if parent and parent not in scene.parents:
        scene.parents.append(parent)
    return reply.message.id


async def edit(stub: Stub, message_id: str, content: str, metadata: dict[str, Any]) -> None:
    await stub.UpdateMessage(
        messages_pb2.UpdateMessageRequest(
            message=messages_pb2.Message(id=message_id, content=content, metadata=struct(metadata)),
            update_mask=field_mask_pb2.FieldMask(paths=["content", "metadata"]),
        )
    )


async def attach(stub: Stub, message_id: str, name: str) -> None:
    await stub.AddAttachment(
        messages_pb2.AddAttachmentRequest(
            message_id=message_id,
            attachment=messages_pb2.Attachment(
                url=f"https://f/{name}", type="text/plain", name=name, size=3
            ),
        )
    )


async def delete(stub: Stub, message_id: str) -> None:
    await stub.DeleteMessage(messages_pb2.DeleteMessageRequest(id=message_id))


async def tolerating_gone(call: Awaitable[object]) -> None:
    """A change to a message deleted meanwhile may be refused; nothing else may fail."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        assert err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), err


# (page_size, page_token) -> response
Lister = Callable[[int, str], Awaitable[Any]]


def listers(stub: Stub, scene: Scene, metadata: Any = None) -> list[tuple[str, Lister]]:
    """Every list RPC over the scene: history, each parent's replies, each user's
    messages, and the search of the tag."""

    def history(size: int, token: str) -> Awaitable[Any]:
        return stub.ListMessages(
            messages_pb2.ListMessagesRequest(
                thread_id=scene.thread, page_size=size, page_token=token
            ),
            metadata=metadata,
        )

    def replies(parent: str) -> Lister:
        def call(size: int, token: str) -> Awaitable[Any]:
            return stub.ListReplies(
                messages_pb2.ListRepliesRequest(parent_id=parent, page_size=size, page_token=token),
                metadata=metadata,
            )

        return call

    def own(user: str) -> Lister:
        def call(size: int, token: str) -> Awaitable[Any]:
            return stub.ListUserMessages(
                messages_pb2.ListUserMessagesRequest(
                    user_id=user, page_size=size, page_token=token
                ),
                metadata=metadata,
            )

        return call

    def search(size: int, token: str) -> Awaitable[Any]:
        return stub.SearchMessages(
            messages_pb2.SearchMessagesRequest(
                thread_id=scene.thread,
                metadata_contains=struct(TAG),
                page_size=size,
                page_token=token,
            ),
            metadata=metadata,
        )

    return [
        ("history", history),
        *[(f"replies {p}", replies(p)) for p in scene.parents],
        *[(f"user {u}", own(u)) for u in scene.users],
        ("search", search),
    ]


async def page_all(call: Lister, size: int) -> list[bytes]:
    """Every page of one listing at `size`, serialised; b"gone" for NOT_FOUND."""
    out: list[bytes] = []
    token = ""
    while True:
        try:
            reply = await call(size, token)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND, err
            return [*out, b"gone"]
        out.append(reply.SerializeToString())
        if not reply.next_page_token:
            return out
        assert len(out) < 1000
        token = reply.next_page_token


async def snapshot(stub: Stub, scene: Scene, sizes: tuple[int, ...] = (2, 50)) -> list[bytes]:
    """Every page of every listing of the scene, at each of `sizes`."""
    out: list[bytes] = []
    for _, call in listers(stub, scene):
        for size in sizes:
            out.extend(await page_all(call, size))
    return out


async def warm_equals_fresh(cached: Stub, uncached: Stub, scene: Scene) -> list[bytes]:
    """The cached server's listings, listed once to warm, equal the uncached server's."""
    await snapshot(cached, scene)
    warm = await snapshot(cached, scene)
    assert warm == await snapshot(uncached, scene)
    return warm


def listed(pages: list[bytes]) -> list[messages_pb2.Message]:
    return [
        m
        for page in pages
        if page != b"gone"
        for m in messages_pb2.ListMessagesResponse.FromString(page).messages
    ]


async def test_restore_after_an_authors_deletion_serves_rewritten_replies(
    cached: Stub, uncached: Stub, db_pool: asyncpg.Pool
) -> None:
    """`db restore` rewrites archived rows (a reply to a deleted author's message
    loses its parent, the author's messages leave) and moves them back: the
    rewritten reply must not come from the bytes cached before the archive."""
    scene = await new_scene(db_pool)
    owner, member, leaver, _ = scene.users
    parent = await send(cached, scene, leaver, "parent", attachments=2)
    reply = await send(cached, scene, member, "reply", parent=parent, attachments=1)
    await send(cached, scene, owner, "reply to reply", parent=reply)
    await send(cached, scene, leaver, "own reply", parent=parent)
    await edit(cached, reply, "reply edited", {"tag": "t", "v": 2})
    before = await warm_equals_fresh(cached, uncached, scene)
    assert any(m.id == reply and m.parent_id == parent for m in listed(before))

    async with db_pool.acquire() as conn:
        progress = await archive_older_than(conn, datetime.now(UTC) + timedelta(days=1))
        assert progress.threads == 1
        async with conn.transaction():
            await users_store.delete_user(conn, uuid.UUID(leaver))
        restored = await restore_thread(conn, uuid.UUID(scene.thread))
    assert (restored.orphaned_replies, restored.removed_messages) == (1, 2)
    scene.users.remove(leaver)

    after = await warm_equals_fresh(cached, uncached, scene)
    rewritten = [m for m in listed(after) if m.id == reply]
    assert rewritten and all(m.parent_id == "" and m.content == "reply edited" for m in rewritten)
    assert parent not in {m.id for m in listed(after)}


async def test_a_rolled_back_write_gives_its_position_to_the_next_one(
    cached: Stub, uncached: Stub, db_pool: asyncpg.Pool
) -> None:
    """A write that took a position and rolled back leaves it to the next write, so
    (id, change_seq) names two contents over time; only one was ever committed.
    A listing running while the phantom is uncommitted must neither see nor keep it."""
    scene = await new_scene(db_pool)
    message = await send(cached, scene, scene.users[1], "original", attachments=1)
    await warm_equals_fresh(cached, uncached, scene)
    thread, mid = uuid.UUID(scene.thread), uuid.UUID(message)
    async with db_pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        phantom_seq = await conn.fetchval("SELECT chat_bump_thread($1)", thread)
        await conn.execute(
            "UPDATE messages SET content = 'phantom', status = 'edited', change_seq = $2,"
            " updated_at = now() WHERE id = $1",
            mid,
            phantom_seq,
        )
        await conn.execute(
            "INSERT INTO message_attachments (message_id, url, type, name, size)"
            " VALUES ($1, 'https://phantom', 'x/y', 'p', 1)",
            mid,
        )
        # Readers do not wait for the writer's locks, and see the committed version.
        during = await asyncio.wait_for(snapshot(cached, scene), timeout=10)
        assert b"phantom" not in b"".join(during)
        await tx.rollback()
    await edit(cached, message, "real", TAG)
    seq = await db_pool.fetchval("SELECT change_seq FROM messages WHERE id = $1", mid)
    assert seq == phantom_seq  # the same key, another content
    pages = await warm_equals_fresh(cached, uncached, scene)
    assert b"phantom" not in b"".join(pages)
    assert {m.content for m in listed(pages) if m.id == message} == {"real"}


async def test_racing_writes_and_listings_keep_one_serialisation_per_version(
    cached: Stub, uncached: Stub, db_pool: asyncpg.Pool
) -> None:
    """Edits, attachments and deletions run at once with listings on both servers.
    Every message any listing showed, by (id, updated_at) (updated_at advances
    with every change: one version each), is the same message wherever it was
    shown; and once the writes stop, warm listings equal uncached ones."""
    rng = random.Random(4242)
    scene = await new_scene(db_pool)
    for i in range(8):
        parent = scene.sent[rng.randrange(len(scene.sent))] if scene.sent and i % 3 else ""
        await send(
            cached, scene, rng.choice(scene.users), f"m{i}", parent=parent, tagged=i % 2 == 0
        )
    versions: dict[tuple[str, int], messages_pb2.Message] = {}
    observed = 0

    async def listing(stub: Stub) -> None:
        nonlocal observed
        name, call = rng.choice(listers(stub, scene))
        for message in listed(await page_all(call, rng.choice([1, 3, 50]))):
            key = (message.id, message.updated_at.ToNanoseconds())
            assert versions.setdefault(key, message) == message, (name, key)
            observed += 1

    def writer(step: int) -> Awaitable[None]:
        target = rng.choice(scene.sent)
        op = "delete" if rng.random() < 0.06 else rng.choice(["edit", "edit", "attach"])
        if op == "edit":
            meta = TAG if rng.random() < 0.5 else {"tag": "u"}
            return tolerating_gone(edit(cached, target, f"e{step}", meta))
        if op == "attach":
            return tolerating_gone(attach(cached, target, f"a{step}"))
        return tolerating_gone(delete(cached, target))

    for round_ in range(15):
        work: list[Awaitable[None]] = [writer(round_ * 10 + i) for i in range(6)]
        work += [listing(rng.choice([cached, uncached])) for _ in range(10)]
        rng.shuffle(work)
        await asyncio.gather(*work)
        await warm_equals_fresh(cached, uncached, scene)
    assert observed > 250 and len(versions) > 40


@pytest.mark.parametrize(
    "cache_bytes",
    [
        "1",  # no entry fits: every page built, nothing kept
        "1200",  # about one small entry (payload + 400): every page evicts
        "40000",  # a few entries; the large message (about 40 KB) never fits
    ],
)
async def test_caches_too_small_to_hold_a_page_serve_what_no_cache_serves(
    cache_bytes: str,
    uncached: Stub,
    service_settings: ServiceSettings,
    monkeypatch: pytest.MonkeyPatch,
    db_pool: asyncpg.Pool,
) -> None:
    rng = random.Random(int(cache_bytes))
    scene = await new_scene(db_pool)
    async with serving(service_settings, monkeypatch, MESSAGE_CACHE_BYTES=cache_bytes) as (
        tiny,
        _,
    ):
        await send(tiny, scene, scene.users[0], "\U0001f600" * 10_000, attachments=3)
        for step in range(24):
            op = rng.choice(["send", "reply", "edit", "attach", "delete"])
            if op in ("send", "reply") or len(scene.sent) < 2:
                parent = rng.choice(scene.sent) if op == "reply" else ""
                try:
                    await send(tiny, scene, rng.choice(scene.users), f"s{step}", parent=parent)
                except grpc.aio.AioRpcError as err:  # replying to a deleted message
                    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
            elif op == "edit":
                await tolerating_gone(edit(tiny, rng.choice(scene.sent), f"e{step}", TAG))
            elif op == "attach":
                await tolerating_gone(attach(tiny, rng.choice(scene.sent), f"a{step}"))
            else:
                await tolerating_gone(delete(tiny, rng.choice(scene.sent)))
            if step % 4 == 3:
                await warm_equals_fresh(tiny, uncached, scene)
        await warm_equals_fresh(tiny, uncached, scene)


async def test_largest_messages_page_alike_cold_warm_uncached_and_uncacheable(
    cached: Stub,
    uncached: Stub,
    service_settings: ServiceSettings,
    monkeypatch: pytest.MonkeyPatch,
    db_pool: asyncpg.Pool,
) -> None:
    """About 430 KB messages (every limit, string metadata) among small ones, paged
    through every listing at LIST_RESPONSE_MAX_BYTES: the cold and warm pages of
    the cached server, a server whose cache is smaller than one of them, and the
    uncached server are the same bytes (tokens included), each within the budget."""
    scene = await new_scene(db_pool)
    room = Room(scene.thread, scene.users[0], scene.users[1], "")
    sent = [(await cached.SendMessage(small_request(room, "parent"))).message.id]
    for i in range(9):
        request = largest_request(room, f"big {i}", shape="string", parent_id=sent[0])
        sent.append((await cached.SendMessage(request)).message.id)
        if i % 3 == 0:
            small = small_request(room, f"small {i}", parent_id=sent[0])
            sent.append((await cached.SendMessage(small)).message.id)
    await delete(cached, sent[4])
    await edit(cached, sent[6], "shrunk", {"tag": "big"})
    scene.parents = [sent[0]]
    scene.users = [room.member]

    async def pages(stub: Stub) -> list[bytes]:
        out: list[bytes] = []
        for name, call in listers(stub, scene):
            if name == "search":  # the big ones are tagged "big", not TAG
                call = search_big(stub)
            for size in (1, 4, 200):
                for page in await page_all(call, size):
                    assert len(page) <= BUDGET, (name, size)
                    out.append(page)
        return out

    def search_big(stub: Stub) -> Lister:
        def call(size: int, token: str) -> Awaitable[Any]:
            return stub.SearchMessages(
                messages_pb2.SearchMessagesRequest(
                    thread_id=scene.thread,
                    metadata_contains=struct({"tag": "big"}),
                    page_size=size,
                    page_token=token,
                )
            )

        return call

    fresh = await pages(uncached)
    assert await pages(cached) == fresh  # cold for most: only sends were served
    assert await pages(cached) == fresh  # warm
    async with serving(service_settings, monkeypatch, MESSAGE_CACHE_BYTES="300000") as (
        small_cache,
        _,
    ):
        assert await pages(small_cache) == fresh
        assert await pages(small_cache) == fresh
    assert set(sent) <= {m.id for m in listed(fresh)}
    # Pages did end on bytes: some page of 200 holds fewer than all the messages.
    assert any(
        0 < len(messages_pb2.ListMessagesResponse.FromString(p).messages) < len(sent)
        and messages_pb2.ListMessagesResponse.FromString(p).next_page_token
        for p in fresh
    )


async def test_cached_pages_are_no_pass_past_access_checks(
    cached: Stub, db_pool: asyncpg.Pool
) -> None:
    """Pages a member listed (and the cache kept) are refused once the member is
    removed or deactivated, and were never shown to an outsider."""
    scene = await new_scene(db_pool)
    owner, member, other, _ = scene.users
    parent = await send(cached, scene, owner, "p", attachments=1)
    await send(cached, scene, other, "r", parent=parent)
    scene.users = [member]
    outsider = (await new_users(db_pool, 1))[0]
    for _ in range(2):
        for _name, call in listers(cached, scene, as_user(member)):
            await page_all(call, 50)
    thread = uuid.UUID(scene.thread)

    async def refused(user: str) -> None:
        for name, call in listers(cached, scene, as_user(user)):
            if name.startswith("user"):
                continue  # a user's own messages: asked for by another user below
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(50, "")
            assert caught.value.code() in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.PERMISSION_DENIED,
            ), (name, caught.value)
        with pytest.raises(grpc.aio.AioRpcError) as other_user:
            await cached.ListUserMessages(
                messages_pb2.ListUserMessagesRequest(user_id=owner), metadata=as_user(user)
            )
        assert other_user.value.code() == grpc.StatusCode.PERMISSION_DENIED

    await refused(outsider)
    await db_pool.execute(
        "DELETE FROM thread_participants WHERE thread_id = $1 AND user_id = $2",
        thread,
        uuid.UUID(member),
    )
    await refused(member)
    await db_pool.execute(
        "INSERT INTO thread_participants (thread_id, user_id, role) VALUES ($1, $2, 'member')",
        thread,
        uuid.UUID(member),
    )
    await db_pool.execute("UPDATE users SET is_active = false WHERE id = $1", uuid.UUID(member))
    with pytest.raises(grpc.aio.AioRpcError) as inactive:
        await cached.ListMessages(
            messages_pb2.ListMessagesRequest(thread_id=scene.thread), metadata=as_user(member)
        )
    assert inactive.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.skipif(not HAVE_GRPCURL, reason=NO_GRPCURL)
async def test_grpcurl_decodes_every_list_rpc_served_from_cached_bytes(
    service_settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch, db_pool: asyncpg.Pool
) -> None:
    """A client we did not write (grpcurl, Go protobuf, by reflection) reads each
    warm list response, second pages included, as the Python client does."""
    async with serving(service_settings, monkeypatch) as (stub, address):
        scene = await new_scene(db_pool)
        owner, member = scene.users[:2]
        parent = await send(stub, scene, owner, "ünïcode ✓ \U0001f600", attachments=2)
        for i in range(3):
            await send(stub, scene, member, f"r{i}", parent=parent, attachments=i)
        await edit(stub, scene.sent[2], "edited", {"tag": "t", "n": 1.5, "l": [1, "x", None]})
        await delete(stub, scene.sent[3])
        requests: list[tuple[str, Any, type[Any]]] = [
            (
                "ListMessages",
                messages_pb2.ListMessagesRequest(thread_id=scene.thread, page_size=3),
                messages_pb2.ListMessagesResponse,
            ),
            (
                "ListReplies",
                messages_pb2.ListRepliesRequest(parent_id=parent, page_size=2),
                messages_pb2.ListRepliesResponse,
            ),
            (
                "ListUserMessages",
                messages_pb2.ListUserMessagesRequest(user_id=member, page_size=2),
                messages_pb2.ListUserMessagesResponse,
            ),
            (
                "SearchMessages",
                messages_pb2.SearchMessagesRequest(
                    thread_id=scene.thread, metadata_contains=struct(TAG), page_size=2
                ),
                messages_pb2.SearchMessagesResponse,
            ),
        ]
        for method, request, response_type in requests:
            call = getattr(stub, method)
            await call(request)  # warm
            expected = await call(request)
            assert len(expected.messages) >= 2 and expected.next_page_token, method
            second = type(request)()
            second.CopyFrom(request)
            second.page_token = expected.next_page_token
            for req in (request, second):
                python = await call(req)
                body = json_format.MessageToJson(req, preserving_proto_field_name=True)
                out = await grpcurl("-d", body, address, f"chat.v1.MessagesService/{method}")
                decoded = json_format.Parse(out, response_type())
                assert decoded == python, method
                assert json.loads(out)  # well-formed JSON


async def test_a_full_cache_holds_no_more_memory_than_message_cache_bytes(
    db_pool: asyncpg.Pool,
) -> None:
    """The README's bound: MESSAGE_CACHE_BYTES, entries' overhead included. Filled
    as listings fill it (keys from asyncpg records of page queries, 300-byte
    messages, twice its capacity so old entries leave), traced by tracemalloc."""
    limit = 2 * 1024 * 1024
    payload = 300
    async with db_pool.acquire() as conn:
        gc.collect()
        tracemalloc.start()
        try:
            cache = SerializedMessages(limit)
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(2 * limit // (payload + 400) // 200 + 1):
                records = await conn.fetch(
                    "SELECT gen_random_uuid() AS id, (random() * 1e12)::bigint AS change_seq,"
                    " clock_timestamp() AS updated_at FROM generate_series(1, 200)"
                )
                keys = [(r["id"], r["change_seq"], r["updated_at"]) for r in records]
                cache.serialized(keys, lambda i: bytes(payload))
                del records, keys
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
    assert cache.size <= limit
    assert held <= limit * 1.05, (
        f"{held:,} bytes held for a bound of {limit:,} ({held / limit:.2f}x)"
    )
