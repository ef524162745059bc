"""A stream never outlives the caller's right to read, and stays equal to history.

Removal, deletion, archiving (flag and `db archive`), deactivation and DeleteUser
end or correct the affected streams, also when the notification is lost (the
listener's backend is killed first) and when the change races the stream's open.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from chat.v1 import (
    messages_pb2,
    threads_pb2,
    threads_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)

from db.archive import archive_older_than, restore_thread
from services.common.settings import ServiceSettings
from services.threads.service import DEFINITION as THREADS
from services.users.service import DEFINITION as USERS
from tests.conftest import running
from tests.messages.conftest import MessagesServer, Room, new_user
from tests.messages.test_stream import Event, open_stream, read, send, until_caught_up
from tests.rpc_errors import as_user, error_info

ENDED_IN_S = 30  # bounded wait for a stream to end (fails the test, never asserted as speed)


async def ended_with(stream: grpc.aio.UnaryStreamCall) -> tuple[grpc.StatusCode, list[Event]]:  # type: ignore[type-arg]
    """Read until the stream ends; its code and every event it delivered first."""
    seen: list[Event] = []
    try:
        async with asyncio.timeout(ENDED_IN_S):
            while True:
                event = await stream.read()
                if event is grpc.aio.EOF:
                    return grpc.StatusCode.OK, seen
                assert isinstance(event, Event)
                seen.append(event)
    except grpc.aio.AioRpcError as err:
        return err.code(), seen


def delivered_ids(events: list[Event]) -> set[str]:
    return {getattr(e, e.WhichOneof("event") or "").id for e in events if e.HasField("created")}


async def remove(db: asyncpg.Pool, room: Room, user: str) -> None:
    """What ThreadsService.RemoveParticipant commits (row and notification together)."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(
            "DELETE FROM thread_participants WHERE thread_id = $1 AND user_id = $2",
            uuid.UUID(room.thread_id),
            uuid.UUID(user),
        )
        await conn.execute(
            "SELECT pg_notify('chat_membership', $1)",
            json.dumps({"thread_id": room.thread_id, "user_id": user}),
        )


async def deactivate(db: asyncpg.Pool, user: str) -> None:
    """What UsersService.UpdateUser(is_active=false) commits."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE users SET is_active = false WHERE id = $1", uuid.UUID(user))
        await conn.execute(
            "SELECT pg_notify('chat_membership', $1)",
            json.dumps({"thread_id": None, "user_id": user}),
        )


async def kill_listener(db: asyncpg.Pool) -> None:
    """Terminate the service's LISTEN connection, once it is there: one killed by
    a previous trial is re-opened after STREAM_LISTENER_RETRY (bounded wait)."""
    for _ in range(200):
        killed = await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'chat-messages-listener' AND datname = current_database()"
        )
        if killed:
            return
        await asyncio.sleep(0.05)
    pytest.fail("the listener never came back")


if TYPE_CHECKING:
    ThreadsStub = threads_pb2_grpc.ThreadsServiceAsyncStub
    UsersStub = users_pb2_grpc.UsersServiceAsyncStub


@pytest.fixture
async def threads_stub(service_settings: ServiceSettings) -> AsyncIterator[ThreadsStub]:
    async with running(THREADS, service_settings) as (_, channel):
        yield threads_pb2_grpc.ThreadsServiceStub(channel)


@pytest.fixture
async def users_stub(service_settings: ServiceSettings) -> AsyncIterator[UsersStub]:
    async with running(USERS, service_settings) as (_, channel):
        yield users_pb2_grpc.UsersServiceStub(channel)


# -- the handshake and cursors ------------------------------------------------------


async def test_caught_up_on_an_empty_thread_is_a_usable_cursor(
    server: MessagesServer, room: Room
) -> None:
    stream = open_stream(server.stub, room, user=room.member)
    replayed, cursor = await until_caught_up(stream)
    stream.cancel()
    assert replayed == [] and cursor
    first = await send(server.stub, room, "first ever")
    resumed = open_stream(server.stub, room, after=cursor, user=room.member)
    replayed, _ = await until_caught_up(resumed)
    resumed.cancel()
    assert [e.created.id for e in replayed] == [first.id]


async def test_a_message_sent_after_caught_up_is_always_delivered(
    server: MessagesServer, room: Room
) -> None:
    """No pause between caught_up and the send: 100 opens, 100 immediate sends."""
    for i in range(100):
        stream = open_stream(server.stub, room, user=room.member)
        await until_caught_up(stream)
        sent = await send(server.stub, room, f"right after caught_up {i}", user=room.owner)
        [event] = await read(stream, 1)
        assert event.created.id == sent.id
        stream.cancel()


def apply(state: dict[str, messages_pb2.Message], events: list[Event]) -> None:
    """A stream consumer's view: events applied by message id."""
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "removed":
            state.pop(event.removed.id, None)
        elif kind in ("created", "updated", "deleted"):
            message = getattr(event, kind)
            state[message.id] = message


def comparable(state: dict[str, messages_pb2.Message]) -> dict[str, tuple[object, ...]]:
    return {
        mid: (m.content, m.status, m.parent_id, len(m.attachments), m.updated_at.ToNanoseconds())
        for mid, m in state.items()
    }


async def history(server: MessagesServer, room: Room) -> dict[str, messages_pb2.Message]:
    found: dict[str, messages_pb2.Message] = {}
    token = ""
    while True:
        page = await server.stub.ListMessages(
            messages_pb2.ListMessagesRequest(
                thread_id=room.thread_id, page_size=200, page_token=token
            ),
            metadata=as_user(room.owner),
        )
        found.update((m.id, m) for m in page.messages)
        token = page.next_page_token
        if not token:
            return found


async def test_every_cursor_handed_out_is_a_safe_resume_point(
    server: MessagesServer, room: Room
) -> None:
    """Each cursor (send, get, list, event, caught_up) + its replay = the final history."""
    rng = random.Random(13)
    stub = server.stub
    live = open_stream(stub, room, user=room.member)
    await until_caught_up(live)
    # (the history the client had when it got the cursor, the cursor)
    handed: list[tuple[dict[str, messages_pb2.Message], str]] = []
    ids: list[str] = []
    for step in range(40):
        action = rng.choice(["send", "send", "edit", "delete", "attach", "reply"])
        if action in ("send", "reply") or not ids:
            parent = rng.choice(ids) if action == "reply" and ids else ""
            reply = await stub.SendMessage(
                messages_pb2.SendMessageRequest(
                    thread_id=room.thread_id,
                    user_id=room.member,
                    content=f"m{step}",
                    parent_id=parent,
                ),
                metadata=as_user(room.member),
            )
            ids.append(reply.message.id)
            handed.append((await history(server, room), reply.message.cursor))
        else:
            target = rng.choice(ids)
            try:
                if action == "edit":
                    await stub.UpdateMessage(
                        messages_pb2.UpdateMessageRequest(
                            message=messages_pb2.Message(id=target, content=f"edit{step}"),
                            update_mask={"paths": ["content"]},  # type: ignore[arg-type]
                        ),
                        metadata=as_user(room.member),
                    )
                elif action == "delete":
                    await stub.DeleteMessage(
                        messages_pb2.DeleteMessageRequest(id=target), metadata=as_user(room.member)
                    )
                else:
                    await stub.AddAttachment(
                        messages_pb2.AddAttachmentRequest(
                            message_id=target,
                            attachment=messages_pb2.Attachment(
                                url="https://x.io/a", type="image/png", name="a.png", size=1
                            ),
                        ),
                        metadata=as_user(room.member),
                    )
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION  # a tombstone
        got = await stub.GetMessage(
            messages_pb2.GetMessageRequest(id=rng.choice(ids)), metadata=as_user(room.member)
        )
        snapshot = await history(server, room)
        handed.append((snapshot, got.message.cursor))
        handed.append((snapshot, rng.choice(list(snapshot.values())).cursor))  # from a list
    final = await history(server, room)
    # The live stream's own event cursors, and a caught_up cursor.
    stream_state: dict[str, messages_pb2.Message] = {}
    while comparable(stream_state) != comparable(final):
        [event] = await read(live, 1)
        apply(stream_state, [event])
        handed.append(({**stream_state}, event.cursor))
    live.cancel()
    late = open_stream(stub, room, user=room.member)
    _, caught = await until_caught_up(late)
    late.cancel()
    handed.append((final, caught))
    for known, cursor in handed:
        resumed = open_stream(stub, room, after=cursor, user=room.member)
        replayed, _ = await until_caught_up(resumed)
        resumed.cancel()
        view = dict(known)
        apply(view, replayed)
        assert comparable(view) == comparable(final), cursor


# -- the right to read ---------------------------------------------------------------


async def test_removal_with_a_lost_notification_still_ends_the_stream(
    server: MessagesServer, db_pool: asyncpg.Pool
) -> None:
    """The listener's backend dies, then the removal commits within the reconnect delay."""
    from tests.messages.conftest import new_room

    for _ in range(10):
        room = await new_room(db_pool)
        watcher = open_stream(server.stub, room, user=room.member)
        await until_caught_up(watcher)
        await kill_listener(db_pool)
        await remove(db_pool, room, room.member)
        after_removal = await send(server.stub, room, "after the removal", user=room.owner)
        code, seen = await ended_with(watcher)
        assert code == grpc.StatusCode.NOT_FOUND
        assert after_removal.id not in delivered_ids(seen)


async def test_deletion_and_deactivation_with_a_lost_notification_end_streams(
    server: MessagesServer, db_pool: asyncpg.Pool
) -> None:
    from tests.messages.conftest import new_room

    room = await new_room(db_pool)
    deleted_view = open_stream(server.stub, room, user=room.owner)
    await until_caught_up(deleted_view)
    other = await new_room(db_pool)
    deactivated_view = open_stream(server.stub, other, user=other.member)
    await until_caught_up(deactivated_view)
    await kill_listener(db_pool)
    await db_pool.execute("DELETE FROM threads WHERE id = $1", uuid.UUID(room.thread_id))
    await db_pool.execute(
        "UPDATE users SET is_active = false WHERE id = $1", uuid.UUID(other.member)
    )
    assert (await ended_with(deleted_view))[0] == grpc.StatusCode.NOT_FOUND
    code, _ = await ended_with(deactivated_view)
    assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("change", ["remove", "deactivate"])
async def test_a_change_racing_the_open_is_never_missed(
    server: MessagesServer, db_pool: asyncpg.Pool, change: str
) -> None:
    """The change commits at a random point of the open (150 trials); then a message is
    sent. The stream must end, and never carry anything committed after the change."""
    from tests.messages.conftest import new_room

    rng = random.Random(change)
    leaks = 0
    for _ in range(150):
        room = await new_room(db_pool)
        stream = open_stream(server.stub, room, user=room.member)
        await asyncio.sleep(rng.random() * 0.004)
        if change == "remove":
            await remove(db_pool, room, room.member)
        else:
            await deactivate(db_pool, room.member)
        after_change = await send(server.stub, room, "after the change", user=room.owner)
        code, seen = await ended_with(stream)
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED), code
        leaks += after_change.id in delivered_ids(seen)
    assert leaks == 0


async def test_archiving_ends_streams_and_history_stays_readable(
    server: MessagesServer, room: Room, threads_stub: ThreadsStub
) -> None:
    kept = await send(server.stub, room, "before the archive", user=room.member)
    stream = open_stream(server.stub, room, user=room.member)
    await until_caught_up(stream)
    await threads_stub.UpdateThread(
        threads_pb2.UpdateThreadRequest(
            thread=threads_pb2.Thread(id=room.thread_id, is_archived=True),
            update_mask={"paths": ["is_archived"]},  # type: ignore[arg-type]
        ),
        metadata=as_user(room.owner),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(stream.read(), timeout=ENDED_IN_S)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "THREAD_ARCHIVED"
    reopened = open_stream(server.stub, room, user=room.member)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(reopened.read(), timeout=ENDED_IN_S)
    assert error_info(caught.value).reason == "THREAD_ARCHIVED"
    assert kept.id in await history(server, room)  # still readable
    # Read-only as for sends: no edits, no attachments; deleting stays possible.
    changes: list[Awaitable[object]] = [
        server.stub.UpdateMessage(
            messages_pb2.UpdateMessageRequest(
                message=messages_pb2.Message(id=kept.id, content="edited while archived"),
                update_mask={"paths": ["content"]},  # type: ignore[arg-type]
            ),
            metadata=as_user(room.member),
        ),
        server.stub.AddAttachment(
            messages_pb2.AddAttachmentRequest(
                message_id=kept.id,
                attachment=messages_pb2.Attachment(
                    url="https://x.io/a", type="image/png", name="a.png", size=1
                ),
            ),
            metadata=as_user(room.member),
        ),
    ]
    for change in changes:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await change
        assert error_info(caught.value).reason == "THREAD_ARCHIVED"
    await server.stub.DeleteMessage(
        messages_pb2.DeleteMessageRequest(id=kept.id), metadata=as_user(room.member)
    )


async def test_db_archive_ends_streams_and_restore_keeps_cursors(
    server: MessagesServer, room: Room, db_pool: asyncpg.Pool
) -> None:
    before = await send(server.stub, room, "before the archive")
    stream = open_stream(server.stub, room, user=room.member)
    await until_caught_up(stream)
    async with db_pool.acquire() as conn:
        progress = await archive_older_than(conn, datetime.now(UTC) + timedelta(days=1))
    assert progress.threads >= 1
    assert (await ended_with(stream))[0] == grpc.StatusCode.NOT_FOUND
    async with db_pool.acquire() as conn:
        await restore_thread(conn, uuid.UUID(room.thread_id))
    after = await send(server.stub, room, "after the restore")
    resumed = open_stream(server.stub, room, after=before.cursor, user=room.member)
    replayed, _ = await until_caught_up(resumed)
    resumed.cancel()
    assert [e.created.id for e in replayed] == [after.id]


async def test_delete_user_keeps_stream_consumers_equal_to_history(
    server: MessagesServer,
    room: Room,
    db_pool: asyncpg.Pool,
    users_stub: UsersStub,
) -> None:
    leaver = await new_user(db_pool)
    await db_pool.execute(
        "INSERT INTO thread_participants (thread_id, user_id) VALUES ($1, $2)",
        uuid.UUID(room.thread_id),
        uuid.UUID(leaver),
    )
    start = await send(server.stub, room, "start", user=room.owner)
    theirs = [await send(server.stub, room, f"by the leaver {i}", user=leaver) for i in range(3)]
    reply = await server.stub.SendMessage(
        messages_pb2.SendMessageRequest(
            thread_id=room.thread_id, user_id=room.member, content="re", parent_id=theirs[0].id
        ),
        metadata=as_user(room.member),
    )
    view: dict[str, messages_pb2.Message] = {}
    stream = open_stream(server.stub, room, after=start.cursor, user=room.member)
    replayed, _ = await until_caught_up(stream)
    apply(view, replayed)
    view[start.id] = start
    assert reply.message.id in view
    await users_stub.DeleteUser(users_pb2.DeleteUserRequest(id=leaver))
    final = await history(server, room)
    events: list[Event] = []
    while comparable(view) != comparable(final):
        [event] = await read(stream, 1)
        events.append(event)
        apply(view, [event])
    stream.cancel()
    kinds = sorted(e.WhichOneof("event") or "" for e in events)
    assert kinds == ["removed"] * 3 + ["updated"]
    assert view[reply.message.id].parent_id == ""
    # A consumer resuming from before the deletion converges too.
    resumed = open_stream(server.stub, room, after=start.cursor, user=room.member)
    again, _ = await until_caught_up(resumed)
    resumed.cancel()
    fresh = {start.id: start}
    apply(fresh, again)
    assert comparable(fresh) == comparable(final)


async def test_open_stream_limit_answers_resource_exhausted_with_a_retry_hint(
    room: Room, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from google.rpc import error_details_pb2

    from services.messages.service import DEFINITION
    from tests.rpc_errors import rich_status

    monkeypatch.setenv("STREAM_MAX_OPEN", "3")  # the limit is the thing under test
    settings = ServiceSettings(DATABASE_URL=database_url, GRPC_HOST="127.0.0.1", METRICS_PORT=0)
    async with running(DEFINITION, settings) as (_, channel):
        from chat.v1 import messages_pb2_grpc

        stub = messages_pb2_grpc.MessagesServiceStub(channel)
        streams = [open_stream(stub, room) for _ in range(3)]
        for stream in streams:
            await until_caught_up(stream)
        extra = open_stream(stub, room)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await extra.read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "STREAM_LIMIT"
        hints = [
            d
            for d in rich_status(caught.value).details
            if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
        ]
        assert hints
        streams[0].cancel()
        for _ in range(500):  # the slot frees once the server sees the cancel
            retry = open_stream(stub, room)
            try:
                await until_caught_up(retry)
                break
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                await asyncio.sleep(0.01)
        else:
            pytest.fail("the freed slot never became available")
        for stream in [*streams[1:], retry]:
            stream.cancel()


async def test_an_outsider_learns_nothing_before_not_found(
    server: MessagesServer, room: Room
) -> None:
    """Also when the thread already has a live feed in this process (others stream it)."""
    member_view = open_stream(server.stub, room, user=room.member)
    await until_caught_up(member_view)
    for after in ("", (await send(server.stub, room, "hidden")).cursor):
        outsider = open_stream(server.stub, room, after=after, user=room.outsider)
        code, seen = await ended_with(outsider)
        assert (code, seen) == (grpc.StatusCode.NOT_FOUND, [])
    member_view.cancel()


async def test_a_failing_fetch_of_one_thread_does_not_stall_the_others(
    server: MessagesServer, db_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: thread A's live fetches fail (as a dropped connection does)
    until the test lets them through; thread B keeps flowing meanwhile."""
    from services.messages import store
    from tests.messages.conftest import new_room

    a, b = await new_room(db_pool), await new_room(db_pool)
    real = store.events_after
    failing = asyncio.Event()
    failing.set()
    failures = 0

    async def events_after(conn: asyncpg.Connection, thread_id: uuid.UUID, *args: int):  # type: ignore[no-untyped-def]
        nonlocal failures
        if str(thread_id) == a.thread_id and failing.is_set():
            failures += 1
            raise asyncpg.ConnectionDoesNotExistError("injected: connection lost")
        return await real(conn, thread_id, *args)

    stream_a = open_stream(server.stub, a, user=a.member)
    stream_b = open_stream(server.stub, b, user=b.member)
    await until_caught_up(stream_a)
    await until_caught_up(stream_b)
    monkeypatch.setattr(store, "events_after", events_after)
    sent_a = await send(server.stub, a, "to the failing thread")
    for i in range(5):
        sent_b = await send(server.stub, b, f"to the healthy thread {i}")
        [event] = await read(stream_b, 1)
        assert event.created.id == sent_b.id
    assert failures >= 1
    failing.clear()  # the fault heals: A's retry (with backoff) delivers
    [event] = await read(stream_a, 1)
    assert event.created.id == sent_a.id
    stream_a.cancel()
    stream_b.cancel()


async def test_sends_racing_the_senders_deletion_are_refused_as_such(
    server: MessagesServer, db_pool: asyncpg.Pool, users_stub: UsersStub
) -> None:
    """20 rounds of 10 sends by V while V is deleted: each send either lands (and is
    then removed with V) or is refused for V's account, never NOT_FOUND or INTERNAL."""
    from collections import Counter

    from tests.messages.conftest import new_room

    outcomes: Counter[str] = Counter()
    for _ in range(20):
        room = await new_room(db_pool)
        leaver = room.member

        async def send_as_leaver(i: int, room: Room = room, leaver: str = leaver) -> None:
            try:
                await send(server.stub, room, f"racing {i}", user=leaver)
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as err:
                outcomes[f"{err.code().name}:{error_info(err).reason}"] += 1

        await asyncio.gather(
            *(send_as_leaver(i) for i in range(10)),
            users_stub.DeleteUser(users_pb2.DeleteUserRequest(id=leaver)),
        )
        left = await db_pool.fetchval(
            "SELECT count(*) FROM messages WHERE user_id = $1", uuid.UUID(leaver)
        )
        assert left == 0
    assert set(outcomes) <= {
        "OK",
        "PERMISSION_DENIED:USER_UNKNOWN",
        "PERMISSION_DENIED:USER_INACTIVE",
    }, outcomes
