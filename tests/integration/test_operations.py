"""What operators see of the running system: metrics and archival."""

from __future__ import annotations

import asyncio
import urllib.request

import asyncpg
import grpc
import pytest
from chat.v1 import messages_pb2, threads_pb2
from prometheus_client.parser import text_string_to_metric_families

from db.archive import archive_older_than
from tests.integration.conftest import Addresses, Clients, open_live_stream
from tests.rpc_errors import as_user


def scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


async def test_metrics_answer_with_rpc_query_pool_and_stream_series(
    system: Addresses, clients: Clients
) -> None:
    if len(system.metrics) < 3:
        pytest.skip("no metrics endpoints given (set METRICS_ADDRS)")
    ada, bob = await clients.new_user("ada"), await clients.new_user("bob")
    thread = (
        await clients.threads.GetOrCreateDirectThread(
            threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[ada.id, bob.id])
        )
    ).thread
    stream = await open_live_stream(clients.messages, thread.id, reader=bob.id)
    first = asyncio.ensure_future(stream.read())
    await clients.messages.SendMessage(
        messages_pb2.SendMessageRequest(thread_id=thread.id, user_id=ada.id, content="metered"),
        metadata=as_user(ada.id),
    )
    await asyncio.wait_for(first, timeout=30)

    users, threads, *replicas = [await asyncio.to_thread(scrape, a) for a in system.metrics]
    # Messages replicas (one or more): the send and the stream may be on either.
    messages: dict[str, float] = {}
    for replica in replicas:
        for key, value in replica.items():
            messages[key] = messages.get(key, 0.0) + value
    create = "chat_rpc_duration_seconds_count{code=OK,method=/chat.v1.UsersService/CreateUser}"
    assert users[create] >= 2
    assert users["chat_db_query_duration_seconds_count{outcome=ok,query=users.insert}"] >= 2
    assert (
        threads["chat_db_query_duration_seconds_count{outcome=ok,query=threads.insert_direct}"] >= 1
    )
    assert messages["chat_db_query_duration_seconds_count{outcome=ok,query=messages.send}"] >= 1
    assert messages["chat_streams_open{}"] >= 1
    assert messages["chat_stream_events_delivered_total{}"] >= 1
    assert replicas[0]["chat_db_pool_connections{state=max}"] == 20
    stream.cancel()


async def test_archived_threads_are_gone_from_the_services(
    system: Addresses, clients: Clients
) -> None:
    """What `python -m db archive` leaves: the thread no longer exists for any service."""
    if system.database_url is None:
        pytest.skip("archiving needs the database (local-process mode only)")
    ada, bob = await clients.new_user("ada"), await clients.new_user("bob")
    thread = (
        await clients.threads.CreateThread(
            threads_pb2.CreateThreadRequest(name="old", creator_id=ada.id, participant_ids=[bob.id])
        )
    ).thread
    sent = await clients.messages.SendMessage(
        messages_pb2.SendMessageRequest(thread_id=thread.id, user_id=ada.id, content="ancient")
    )
    conn = await asyncpg.connect(system.database_url)
    try:
        await conn.execute(
            "UPDATE threads SET last_message_at = now() - interval '400 days' WHERE id = $1",
            thread.id,
        )
        cutoff = await conn.fetchval("SELECT now() - interval '90 days'")
        progress = await archive_older_than(conn, cutoff)
        assert progress.threads >= 1
    finally:
        await conn.close()
    for call in (
        clients.threads.GetThread(threads_pb2.GetThreadRequest(id=thread.id)),
        clients.messages.GetMessage(messages_pb2.GetMessageRequest(id=sent.message.id)),
        clients.messages.ListMessages(messages_pb2.ListMessagesRequest(thread_id=thread.id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    inbox = await clients.threads.ListThreads(
        threads_pb2.ListThreadsRequest(user_id=ada.id, include_archived=True)
    )
    assert thread.id not in {row.thread.id for row in inbox.threads}
