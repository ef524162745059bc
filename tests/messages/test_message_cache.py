"""Listings served from cached message bytes (services/messages/message_cache.py).

The cache's premise is that a message's listing form is fixed by (id,
change_seq): every writer moves change_seq. These tests try to break it by
driving every writer at random and comparing each listing of a server with the
cache (warm, as `make run` starts it) with a server without one, byte for byte;
and check the wire framing against protobuf's own encoder and the byte bound.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from chat.v1 import messages_pb2, messages_pb2_grpc
from google.protobuf import field_mask_pb2, struct_pb2

from services.common.settings import ServiceSettings
from services.messages import paging
from services.messages.message_cache import ENTRY_OVERHEAD, SerializedMessages, Version
from services.messages.service import DEFINITION
from services.users import store as users_store
from tests.conftest import running
from tests.factories import new_group, new_users

if TYPE_CHECKING:
    Stub = messages_pb2_grpc.MessagesServiceAsyncStub

LIST_RESPONSES = (
    messages_pb2.ListMessagesResponse,
    messages_pb2.ListRepliesResponse,
    messages_pb2.ListUserMessagesResponse,
    messages_pb2.SearchMessagesResponse,
)


def _message(rng: random.Random, size: int) -> messages_pb2.Message:
    metadata = struct_pb2.Struct()
    metadata.update({"k": "x" * rng.randrange(0, 300), "n": rng.random()})
    return messages_pb2.Message(
        id=str(uuid.uuid4()),
        thread_id=str(uuid.uuid4()),
        content="é" * size,
        metadata=metadata,
        attachments=[messages_pb2.Attachment(url="https://a/" + "u" * rng.randrange(200))],
    )


@pytest.mark.parametrize("response_type", LIST_RESPONSES)
def test_list_response_framing_equals_protobufs_own(response_type: type[Any]) -> None:
    fields = response_type.DESCRIPTOR.fields_by_name
    assert fields["messages"].number == paging.MESSAGES_FIELD
    assert fields["next_page_token"].number == paging.NEXT_PAGE_TOKEN_FIELD
    rng = random.Random(7)
    # Sizes across every varint length of a frame: 1, 2 and 3 bytes (≥ 16,384).
    for sizes, token in [
        ([], ""),
        ([], "tok"),
        ([0], ""),
        ([1, 60, 70, 8_000, 40_000], "x" * 200),
        ([rng.randrange(0, 3_000) for _ in range(50)], "ü" * 150),
    ]:
        messages = [_message(rng, size) for size in sizes]
        expected = response_type(messages=messages, next_page_token=token).SerializeToString()
        built = paging.list_response([paging.element(m) for m in messages], token)
        assert built == expected
        assert response_type.FromString(built).messages == messages


def test_the_cache_keeps_within_its_bytes_and_builds_each_version_once() -> None:
    limit = 100 * 1024  # about 73 entries of 1,000 bytes: a page of 50 fits
    cache = SerializedMessages(limit)
    built: list[Version] = []
    at = datetime(2026, 11, 28, tzinfo=UTC)

    def page(versions: list[Version], size: int) -> list[bytes]:
        def build(i: int) -> bytes:
            built.append(versions[i])
            return bytes(size)

        return cache.serialized(versions, build)

    ids = [uuid.uuid4() for _ in range(400)]
    for start in range(0, 400, 50):
        versions = [(i, 1, at) for i in ids[start : start + 50]]
        assert page(versions, 1_000) == [bytes(1_000)] * 50
        assert cache.size <= limit
    assert cache.size > limit - (1_000 + ENTRY_OVERHEAD)  # full, not emptied
    # The most recent page is served from the cache; a new version is built.
    built.clear()
    page([(i, 1, at) for i in ids[-50:]], 1_000)
    assert built == []
    page([(ids[-1], 2, at)], 1_000)
    assert built == [(ids[-1], 2, at)]
    # The same position with another updated_at (a position reused after a
    # restore from backup) is a miss, then the new content is kept.
    built.clear()
    later = at + timedelta(microseconds=1)
    assert page([(ids[-2], 1, later)], 7) == [bytes(7)]
    assert page([(ids[-2], 1, later)], 7) == [bytes(7)]
    assert built == [(ids[-2], 1, later)]
    # A value larger than the whole cache is served but never kept.
    built.clear()
    huge = (uuid.uuid4(), 1, at)
    page([huge], limit)
    page([huge], limit)
    assert built == [huge, huge]
    assert cache.size <= limit
    # Off: every lookup builds.
    off = SerializedMessages(0)
    assert off.serialized([huge, huge], lambda i: b"v") == [b"v", b"v"]
    assert off.size == 0


@pytest.fixture
async def two_servers(
    service_settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Stub, Stub]]:
    """The service as `make run` starts it (cache on), and one with the cache off."""
    async with running(DEFINITION, service_settings) as (_, cached):
        monkeypatch.setenv("MESSAGE_CACHE_BYTES", "0")
        async with running(DEFINITION, service_settings) as (_, uncached):
            yield (
                messages_pb2_grpc.MessagesServiceStub(cached),
                messages_pb2_grpc.MessagesServiceStub(uncached),
            )


async def _listings(
    stub: Stub,
    thread: str,
    parents: list[str],
    authors: list[str],
) -> list[bytes]:
    """Every listing kind, first pages of two sizes and a second page."""
    out: list[bytes] = []
    for size in (3, 50):
        first = await stub.ListMessages(
            messages_pb2.ListMessagesRequest(thread_id=thread, page_size=size)
        )
        out.append(first.SerializeToString())
        if first.next_page_token:
            second = await stub.ListMessages(
                messages_pb2.ListMessagesRequest(
                    thread_id=thread, page_size=size, page_token=first.next_page_token
                )
            )
            out.append(second.SerializeToString())
    for parent in parents:
        try:
            replies = await stub.ListReplies(messages_pb2.ListRepliesRequest(parent_id=parent))
        except grpc.aio.AioRpcError as err:  # the parent's author was deleted
            assert err.code() == grpc.StatusCode.NOT_FOUND
            out.append(b"gone")
            continue
        out.append(replies.SerializeToString())
    for author in authors:
        mine = await stub.ListUserMessages(messages_pb2.ListUserMessagesRequest(user_id=author))
        out.append(mine.SerializeToString())
    contains = struct_pb2.Struct()
    contains.update({"tag": "t"})
    found = await stub.SearchMessages(
        messages_pb2.SearchMessagesRequest(thread_id=thread, metadata_contains=contains)
    )
    out.append(found.SerializeToString())
    return out


async def test_cached_listings_equal_uncached_ones_whatever_writes_come_between(
    two_servers: tuple[Stub, Stub], db_pool: asyncpg.Pool
) -> None:
    cached, uncached = two_servers
    rng = random.Random(20261128)
    steps = 0
    for _ in range(3):  # three threads, each its own random history
        owner, *others = await new_users(db_pool, 5)
        thread = await new_group(db_pool, owner, others[0])
        for user in others[1:]:
            await db_pool.execute(
                "INSERT INTO thread_participants (thread_id, user_id, role) "
                "VALUES ($1, $2, 'member')",
                uuid.UUID(thread),
                uuid.UUID(user),
            )
        authors = [owner, *others]
        sent: list[str] = []
        for _ in range(70):
            op = rng.choice(
                ["send", "send", "reply", "edit", "metadata", "delete", "attach", "forget"]
            )
            if op in ("send", "reply") or not sent:
                request = messages_pb2.SendMessageRequest(
                    thread_id=thread,
                    user_id=rng.choice(authors),
                    content=f"m{steps}",
                    parent_id=rng.choice(sent) if op == "reply" and sent else "",
                )
                if rng.random() < 0.3:
                    request.metadata.update({"tag": "t"})
                if rng.random() < 0.2:
                    request.attachments.add(url="https://f/1", type="image/png", name="a", size=1)
                try:
                    response = await cached.SendMessage(request)
                except grpc.aio.AioRpcError as err:  # replying to a deleted or removed message
                    assert err.code() in (
                        grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.INVALID_ARGUMENT,
                    ), err
                else:
                    sent.append(response.message.id)
            elif op in ("edit", "metadata"):
                message = messages_pb2.Message(id=rng.choice(sent), content=f"edited {steps}")
                message.metadata.update({"tag": "t" if rng.random() < 0.5 else "u"})
                mask = ["content"] if op == "edit" else ["metadata"]
                await _tolerating_gone(
                    cached.UpdateMessage(
                        messages_pb2.UpdateMessageRequest(
                            message=message, update_mask=field_mask_pb2.FieldMask(paths=mask)
                        )
                    )
                )
            elif op == "delete":
                await _tolerating_gone(
                    cached.DeleteMessage(messages_pb2.DeleteMessageRequest(id=rng.choice(sent)))
                )
            elif op == "attach":
                await _tolerating_gone(
                    cached.AddAttachment(
                        messages_pb2.AddAttachmentRequest(
                            message_id=rng.choice(sent),
                            attachment=messages_pb2.Attachment(
                                url=f"https://f/{steps}", type="text/plain", name="n", size=2
                            ),
                        )
                    )
                )
            elif op == "forget" and len(authors) > 2:
                # Deleting a user removes their messages; replies to them lose
                # their parent (a change of the replies' rows).
                gone = authors.pop(rng.randrange(1, len(authors)))
                async with db_pool.acquire() as conn, conn.transaction():
                    await users_store.delete_user(conn, uuid.UUID(gone))
            steps += 1
            parents = rng.sample(sent, min(3, len(sent)))
            # The cached server lists twice: cold versions, then warm ones.
            await _listings(cached, thread, parents, authors)
            warm = await _listings(cached, thread, parents, authors)
            fresh = await _listings(uncached, thread, parents, authors)
            assert warm == fresh, f"step {steps}: {op}"
    assert steps == 210


async def _tolerating_gone(call: object) -> None:
    """A write to a message that was deleted (or whose author was) may be refused."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        assert err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), err
