"""The real grpcurl binary against the running services (reflection, JSON bodies, a stream)."""

from __future__ import annotations

import asyncio
import json

import pytest
from chat.v1 import messages_pb2, threads_pb2

from tests.grpcurl import GRPCURL, HAVE_GRPCURL, NO_GRPCURL, grpcurl
from tests.integration.conftest import Addresses, Clients
from tests.rpc_errors import as_user


async def test_list_and_describe_every_service(system: Addresses) -> None:
    for address, service in [
        (system.users, "chat.v1.UsersService"),
        (system.threads, "chat.v1.ThreadsService"),
        (system.messages, "chat.v1.MessagesService"),
    ]:
        listed = (await grpcurl(address, "list")).split()
        assert service in listed and "grpc.health.v1.Health" in listed
        described = await grpcurl(address, "describe", service)
        assert f"service {service.rsplit('.', 1)[1]} {{" in described


async def test_unary_calls_with_json_bodies(system: Addresses) -> None:
    tag = f"curl{id(system) % 100000}"
    created = json.loads(
        await grpcurl(
            "-d",
            json.dumps({"user": {"email": f"{tag}a@example.com", "username": f"{tag}a"}}),
            system.users,
            "chat.v1.UsersService/CreateUser",
        )
    )
    ada = created["user"]["id"]
    bob = json.loads(
        await grpcurl(
            "-d",
            json.dumps({"user": {"email": f"{tag}b@example.com", "username": f"{tag}b"}}),
            system.users,
            "chat.v1.UsersService/CreateUser",
        )
    )["user"]["id"]
    thread = json.loads(
        await grpcurl(
            "-d",
            json.dumps({"user_ids": [ada, bob]}),
            system.threads,
            "chat.v1.ThreadsService/GetOrCreateDirectThread",
        )
    )["thread"]
    sent = json.loads(
        await grpcurl(
            "-H",
            f"x-user-id: {ada}",
            "-d",
            json.dumps({"thread_id": thread["id"], "user_id": ada, "content": "via grpcurl"}),
            system.messages,
            "chat.v1.MessagesService/SendMessage",
        )
    )
    assert sent["message"]["content"] == "via grpcurl"
    assert sent["message"]["status"] == "MESSAGE_STATUS_SENT"


async def test_stream_receives_a_message(system: Addresses, clients: Clients) -> None:
    if not HAVE_GRPCURL:
        pytest.skip(NO_GRPCURL)
    ada, bob = await clients.new_user("ada"), await clients.new_user("bob")
    thread = (
        await clients.threads.GetOrCreateDirectThread(
            threads_pb2.GetOrCreateDirectThreadRequest(user_ids=[ada.id, bob.id])
        )
    ).thread
    markers = []
    for text in ("marker before", "marker after"):
        reply = await clients.messages.SendMessage(
            messages_pb2.SendMessageRequest(thread_id=thread.id, user_id=ada.id, content=text)
        )
        markers.append(reply.message)
    proc = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        "-H",
        f"x-user-id: {bob.id}",
        "-d",
        json.dumps({"thread_id": thread.id, "after": markers[0].cursor}),
        system.messages,
        "chat.v1.MessagesService/StreamThreadMessages",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None

    async def printed_until(text: str) -> str:
        assert proc.stdout is not None
        printed = ""
        while text not in printed:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            assert line, "grpcurl ended before printing the message"
            printed += line.decode()
        return printed

    try:
        replay = await printed_until('"caught_up"')  # the handshake: live from here
        assert "marker after" in replay and "marker before" not in replay
        await clients.messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=thread.id, user_id=ada.id, content="to the stream"
            ),
            metadata=as_user(ada.id),
        )
        assert '"created"' in await printed_until("to the stream")
    finally:
        proc.kill()
        await proc.wait()
