"""How the messages service plugs into the shared server bootstrap."""

from __future__ import annotations

import grpc
from chat.v1 import messages_pb2, messages_pb2_grpc

from services.common.errors import Unavailable
from services.common.server import Runtime, ServiceDefinition
from services.messages.hub import StreamHub
from services.messages.servicer import MessagesServicer
from services.messages.settings import MessagesSettings


async def register(server: grpc.aio.Server, runtime: Runtime) -> None:
    settings = MessagesSettings()
    hub = StreamHub(runtime.pool, runtime.settings, settings)
    await hub.start()

    async def end_streams() -> None:
        await hub.end_all(Unavailable("the server is shutting down; resume from your cursor"))

    runtime.stopping_hooks.append(end_streams)
    runtime.shutdown_hooks.append(hub.stop)
    runtime.extras["hub"] = hub
    messages_pb2_grpc.add_MessagesServiceServicer_to_server(
        MessagesServicer(runtime.pool, hub, settings), server
    )


DEFINITION = ServiceDefinition(
    name="messages",
    full_name=messages_pb2.DESCRIPTOR.services_by_name["MessagesService"].full_name,
    register=register,
)
