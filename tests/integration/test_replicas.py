"""Live delivery crosses messages-service processes (LISTEN/NOTIFY)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from chat.v1 import messages_pb2, messages_pb2_grpc, threads_pb2

from tests.integration.conftest import Addresses, Clients, open_live_stream
from tests.rpc_errors import as_user


async def test_stream_on_one_replica_receives_send_through_the_other(
    system: Addresses, clients: Clients
) -> None:
    if system.messages_replica is None:
        pytest.skip("only one messages replica given (set MESSAGES_REPLICA_ADDR)")
    ada, bob = await clients.new_user("ada"), await clients.new_user("bob")
    thread = (
        await clients.threads.GetOrCreateDirectThread(
            threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[ada.id, bob.id])
        )
    ).thread
    async with grpc.aio.insecure_channel(system.messages_replica) as replica_channel:
        replica = messages_pb2_grpc.MessagesServiceStub(replica_channel)
        stream = await open_live_stream(replica, thread.id, reader=bob.id)
        first = asyncio.ensure_future(stream.read())
        sent = await clients.messages.SendMessage(
            messages_pb2.SendMessageRequest(thread_id=thread.id, user_id=ada.id, content="across"),
            metadata=as_user(ada.id),
        )
        event = await asyncio.wait_for(first, timeout=30)
        assert isinstance(event, messages_pb2.StreamThreadMessagesResponse)
        assert event.created.id == sent.message.id
        assert event.created.content == "across"
        stream.cancel()
