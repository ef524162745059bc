"""Cross-service journeys through the running system, over gRPC only."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from chat.v1 import messages_pb2, threads_pb2
from google.protobuf import field_mask_pb2

from tests.integration.conftest import Clients, open_live_stream
from tests.rpc_errors import as_user

OWNER = threads_pb2.PARTICIPANT_ROLE_OWNER


async def test_direct_conversation_with_reply_read_state_and_inbox(clients: Clients) -> None:
    ada, bob = await clients.new_user("ada"), await clients.new_user("bob")

    direct = await clients.threads.GetOrCreateDirectThread(
        threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[ada.id, bob.id])
    )
    assert direct.created and direct.thread.is_direct
    again = await clients.threads.GetOrCreateDirectThread(
        threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[bob.id, ada.id])
    )
    assert again.thread.id == direct.thread.id and not again.created
    thread_id = direct.thread.id

    hello = await clients.messages.SendMessage(
        messages_pb2.SendMessageRequest(thread_id=thread_id, user_id=ada.id, content="hello bob"),
        metadata=as_user(ada.id),
    )
    reply = await clients.messages.SendMessage(
        messages_pb2.SendMessageRequest(
            thread_id=thread_id, user_id=bob.id, content="hi ada", parent_id=hello.message.id
        ),
        metadata=as_user(bob.id),
    )
    replies = await clients.messages.ListReplies(
        messages_pb2.ListRepliesRequest(parent_id=hello.message.id), metadata=as_user(ada.id)
    )
    assert [m.id for m in replies.messages] == [reply.message.id]

    # Bob has read nothing of Ada's yet (his own reply moved his read position to
    # after hello, since the sender's position follows their send): 0 unread.
    # Ada has Bob's reply unread.
    ada_inbox = await clients.threads.ListThreads(
        threads_pb2.ListThreadsRequest(user_id=ada.id), metadata=as_user(ada.id)
    )
    row = next(r for r in ada_inbox.threads if r.thread.id == thread_id)
    assert row.unread_count == 1
    counts = await clients.threads.GetUnreadCount(
        threads_pb2.GetUnreadCountRequest(user_id=ada.id), metadata=as_user(ada.id)
    )
    assert (counts.total_unread, counts.unread_threads) == (1, 1)

    await clients.threads.MarkRead(
        threads_pb2.MarkReadRequest(thread_id=thread_id, user_id=ada.id), metadata=as_user(ada.id)
    )
    counts = await clients.threads.GetUnreadCount(
        threads_pb2.GetUnreadCountRequest(user_id=ada.id), metadata=as_user(ada.id)
    )
    assert (counts.total_unread, counts.unread_threads) == (0, 0)

    history = await clients.messages.ListMessages(
        messages_pb2.ListMessagesRequest(thread_id=thread_id), metadata=as_user(bob.id)
    )
    assert [m.id for m in history.messages] == [reply.message.id, hello.message.id]


async def test_group_thread_stream_edit_delete(clients: Clients) -> None:
    owner, member, listener = [await clients.new_user(p) for p in ("own", "mem", "lis")]
    created = await clients.threads.CreateThread(
        threads_pb2.CreateThreadRequest(
            name="launch", creator_id=owner.id, participant_ids=[member.id, listener.id]
        ),
        metadata=as_user(owner.id),
    )
    thread_id = created.thread.id
    roles = {p.user_id: p.role for p in created.participants}
    assert roles[owner.id] == OWNER

    # Another client streams while messages are sent.
    stream = await open_live_stream(clients.messages, thread_id, reader=listener.id)
    received: list[messages_pb2.StreamThreadMessagesResponse] = []

    async def collect(n: int) -> None:
        while len(received) < n:
            event = await stream.read()
            assert isinstance(event, messages_pb2.StreamThreadMessagesResponse)
            received.append(event)

    collector = asyncio.ensure_future(collect(4))
    sent = []
    for i in range(3):
        reply = await clients.messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=thread_id, user_id=member.id, content=f"m{i}", request_id=""
            ),
            metadata=as_user(member.id),
        )
        sent.append(reply.message)

    edited = await clients.messages.UpdateMessage(
        messages_pb2.UpdateMessageRequest(
            message=messages_pb2.Message(id=sent[0].id, content="m0 (edited)"),
            update_mask=field_mask_pb2.FieldMask(paths=["content"]),
        ),
        metadata=as_user(member.id),
    )
    assert edited.message.status == messages_pb2.MESSAGE_STATUS_EDITED
    await asyncio.wait_for(collector, timeout=30)
    assert [e.WhichOneof("event") for e in received] == ["created"] * 3 + ["updated"]
    assert [e.created.id for e in received[:3]] == [m.id for m in sent]
    assert received[3].updated.content == "m0 (edited)"
    stream.cancel()

    # Only the author edits; the owner may delete.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await clients.messages.UpdateMessage(
            messages_pb2.UpdateMessageRequest(
                message=messages_pb2.Message(id=sent[1].id, content="hijacked"),
                update_mask=field_mask_pb2.FieldMask(paths=["content"]),
            ),
            metadata=as_user(owner.id),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    deleted = await clients.messages.DeleteMessage(
        messages_pb2.DeleteMessageRequest(id=sent[1].id), metadata=as_user(owner.id)
    )
    assert deleted.message.status == messages_pb2.MESSAGE_STATUS_DELETED
    assert deleted.message.content == ""
    history = await clients.messages.ListMessages(
        messages_pb2.ListMessagesRequest(thread_id=thread_id), metadata=as_user(listener.id)
    )
    tombstone = next(m for m in history.messages if m.id == sent[1].id)
    assert tombstone.status == messages_pb2.MESSAGE_STATUS_DELETED and tombstone.content == ""


async def test_removed_participant_loses_access_and_stream(clients: Clients) -> None:
    owner, leaver = await clients.new_user("own"), await clients.new_user("lvr")
    created = await clients.threads.CreateThread(
        threads_pb2.CreateThreadRequest(
            name="team", creator_id=owner.id, participant_ids=[leaver.id]
        )
    )
    thread_id = created.thread.id
    stream = await open_live_stream(clients.messages, thread_id, reader=leaver.id)

    async def drain() -> grpc.StatusCode:
        try:
            while await stream.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    ended = asyncio.ensure_future(drain())
    await clients.threads.RemoveParticipant(
        threads_pb2.RemoveParticipantRequest(thread_id=thread_id, user_id=leaver.id),
        metadata=as_user(owner.id),
    )
    assert await asyncio.wait_for(ended, timeout=30) == grpc.StatusCode.NOT_FOUND

    for call in (
        clients.threads.GetThread(
            threads_pb2.GetThreadRequest(id=thread_id), metadata=as_user(leaver.id)
        ),
        clients.messages.ListMessages(
            messages_pb2.ListMessagesRequest(thread_id=thread_id), metadata=as_user(leaver.id)
        ),
        clients.messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=thread_id, user_id=leaver.id, content="still here?"
            ),
            metadata=as_user(leaver.id),
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
