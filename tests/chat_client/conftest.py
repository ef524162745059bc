"""A messages service that tests stop and start again on the same port, and a
background reader that records what a chat_client follower yields."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import grpc
import pytest

import chat_client
from chat_client import ChatError, Follower
from chat_client.streams import StreamEvent
from services.common.server import RunningService, start_service
from services.common.settings import ServiceSettings
from services.messages.service import DEFINITION as MESSAGES
from tests.conftest import serve

WAIT_S = 30.0  # generous bound on waits for what must arrive: a failure, not a timing


@dataclass
class RestartableMessages:
    """A real messages server; `restart()` stops it and serves again on its port,
    so a channel to `address` reconnects to the new process' server."""

    settings: ServiceSettings
    service: RunningService | None = None
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.service = await start_service(MESSAGES, self.settings, port=self.port)
        self.port = self.service.port

    async def stop(self) -> None:
        if self.service is not None:
            service, self.service = self.service, None
            await service.stop(grace=1.0)


@pytest.fixture
async def messages_service(
    service_settings: ServiceSettings,
) -> AsyncIterator[RestartableMessages]:
    first = await serve(MESSAGES, service_settings)
    server = RestartableMessages(service_settings, first, first.port)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client(messages_service: RestartableMessages) -> AsyncIterator[grpc.aio.Channel]:
    """A trusted chat_client channel to the messages service (calls pass as_user)."""
    async with chat_client.connect(messages_service.address) as channel:
        yield channel


Event = TypeVar("Event", bound=StreamEvent)


@dataclass
class Reader(Generic[Event]):
    """Runs `async for` over a follower in a task; `events` holds what it yielded,
    `retries` what it retried after (its on_retry hook)."""

    follower: Follower[Event]
    events: list[Event] = field(default_factory=list)
    retries: list[ChatError] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> Reader[Event]:
        self.follower.on_retry = lambda error, _delay: self.retries.append(error)
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for event in self.follower:
            self.events.append(event)

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.WhichOneof("event") == kind]

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait until `done()` holds; a task that ended (raised) fails the wait at once."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + WAIT_S
        while not done():
            assert self.task is not None
            if self.task.done():
                self.task.result()  # raises what ended it
                raise AssertionError("the follower stopped")
            assert loop.time() < give_up, "the follower did not get there"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def failure(self) -> ChatError:
        """The ChatError the follower raised (it must end by raising one)."""
        assert self.task is not None
        with pytest.raises(ChatError) as caught:
            await asyncio.wait_for(self.task, WAIT_S)
        return caught.value
