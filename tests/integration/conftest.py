"""The running system, reached only over gRPC at the addresses it is given.

With USERS_ADDR, THREADS_ADDR and MESSAGES_ADDR set (e.g. `make test-compose`),
the suite talks to those; MESSAGES_REPLICA_ADDR names a second messages replica
when there is one. Otherwise it starts the services as separate local processes
over a fresh test database (what `make test` and CI run), with two messages
processes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from chat.v1 import messages_pb2_grpc, threads_pb2_grpc, users_pb2, users_pb2_grpc

from tests.postgres import DatabaseFactory
from tests.processes import ServiceProcess, start_service_process

ADDRESS_VARIABLES = {"users": "USERS_ADDR", "threads": "THREADS_ADDR", "messages": "MESSAGES_ADDR"}


@dataclass(frozen=True)
class Addresses:
    users: str
    threads: str
    messages: str
    messages_replica: str | None


@pytest.fixture(scope="module")
async def system(database_factory: DatabaseFactory) -> AsyncIterator[Addresses]:
    given = {name: os.environ.get(var) for name, var in ADDRESS_VARIABLES.items()}
    if all(given.values()):
        yield Addresses(
            **{name: str(addr) for name, addr in given.items()},
            messages_replica=os.environ.get("MESSAGES_REPLICA_ADDR"),
        )
        return
    url = await database_factory.create()
    procs: list[ServiceProcess] = []
    try:
        for name in [*ADDRESS_VARIABLES, "messages"]:
            procs.append(await start_service_process(name, url))
        yield Addresses(*(p.address for p in procs))
    finally:
        for proc in procs:
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


def as_user(user_id: str) -> tuple[tuple[str, str], ...]:
    return (("x-user-id", user_id),)
