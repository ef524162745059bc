"""The running system, reached only over gRPC at the addresses it is given.

With USERS_ADDR, THREADS_ADDR and MESSAGES_ADDR set (e.g. `make test-compose`),
the suite talks to those; MESSAGES_REPLICA_ADDR names a second messages replica
when there is one. Otherwise it starts the services as separate local processes
over a fresh test database (what `make test` and CI run), with two messages
processes.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from chat.v1 import messages_pb2, messages_pb2_grpc, threads_pb2_grpc, users_pb2, users_pb2_grpc

from devtools.ports import free_port
from devtools.processes import ServiceProcess, start_service_process
from tests.postgres import DatabaseFactory
from tests.rpc_errors import as_user

ADDRESS_VARIABLES = {"users": "USERS_ADDR", "threads": "THREADS_ADDR", "messages": "MESSAGES_ADDR"}


@dataclass(frozen=True)
class Addresses:
    users: str
    threads: str
    messages: str
    messages_replica: str | None
    # Prometheus endpoints (host:port): users, threads, then every messages replica.
    metrics: tuple[str, ...] = ()
    # The database, when the suite started the services itself (operations tests).
    database_url: str | None = None


@pytest.fixture(scope="module")
async def system(database_factory: DatabaseFactory) -> AsyncIterator[Addresses]:
    given = {name: os.environ.get(var) for name, var in ADDRESS_VARIABLES.items()}
    if all(given.values()):
        metrics = os.environ.get("METRICS_ADDRS", "")
        yield Addresses(
            **{name: str(addr) for name, addr in given.items()},
            messages_replica=os.environ.get("MESSAGES_REPLICA_ADDR"),
            metrics=tuple(m for m in metrics.split(",") if m),
        )
        return
    url = await database_factory.create()
    procs: list[ServiceProcess] = []
    try:
        metrics_ports = [free_port() for _ in ADDRESS_VARIABLES]
        for name, port in zip(ADDRESS_VARIABLES, metrics_ports, strict=True):
            procs.append(await start_service_process(name, url, METRICS_PORT=str(port)))
        procs.append(await start_service_process("messages", url))  # a second replica
        users, threads, messages, replica = (p.address for p in procs)
        yield Addresses(
            users,
            threads,
            messages,
            replica,
            metrics=tuple(f"127.0.0.1:{port}" for port in metrics_ports),
            database_url=url,
        )
    finally:
        for proc in procs:
            if proc.process.returncode is not None:  # died during the module: say how
                print(f"{proc.name} exited {proc.process.returncode}:", *proc.log[-30:], sep="")
            await proc.stop()
        await database_factory.drop(url)


@dataclass
class Clients:
    users: users_pb2_grpc.UsersServiceAsyncStub
    threads: threads_pb2_grpc.ThreadsServiceAsyncStub
    messages: messages_pb2_grpc.MessagesServiceAsyncStub
    channels: list[grpc.aio.Channel]

    async def new_user(self, prefix: str = "u") -> users_pb2.User:
        tag = f"{prefix}{uuid.uuid4().hex[:10]}"
        reply = await self.users.CreateUser(
            users_pb2.CreateUserRequest(
                user=users_pb2.User(email=f"{tag}@example.com", username=tag, first_name=prefix)
            )
        )
        return reply.user


@pytest.fixture
async def clients(system: Addresses) -> AsyncIterator[Clients]:
    """Fresh channels per test (each on its own connection, like separate callers)."""
    channels = [
        grpc.aio.insecure_channel(addr) for addr in (system.users, system.threads, system.messages)
    ]
    yield Clients(
        users=users_pb2_grpc.UsersServiceStub(channels[0]),
        threads=threads_pb2_grpc.ThreadsServiceStub(channels[1]),
        messages=messages_pb2_grpc.MessagesServiceStub(channels[2]),
        channels=channels,
    )
    for channel in channels:
        await channel.close()


async def open_live_stream(
    stream_via: messages_pb2_grpc.MessagesServiceAsyncStub,
    thread_id: str,
    *,
    reader: str | None,
) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
    """A live-only stream after its handshake: `caught_up` is the first event, and
    everything committed after the client received it must be delivered."""
    stream = stream_via.StreamThreadMessages(
        messages_pb2.StreamThreadMessagesRequest(thread_id=thread_id),
        metadata=as_user(reader) if reader else (),
    )
    event = await asyncio.wait_for(stream.read(), timeout=30)
    assert isinstance(event, messages_pb2.StreamThreadMessagesResponse)
    assert event.WhichOneof("event") == "caught_up", event
    return stream
