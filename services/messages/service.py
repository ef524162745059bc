"""How the messages service plugs into the shared server bootstrap."""

from __future__ import annotations

import grpc
from chat.v1 import messages_pb2, messages_pb2_grpc

from services.common.server import Runtime, ServiceDefinition
from services.messages.servicer import MessagesServicer


async def register(server: grpc.aio.Server, runtime: Runtime) -> None:
    messages_pb2_grpc.add_MessagesServiceServicer_to_server(MessagesServicer(runtime), server)  # type: ignore[abstract]  # RPCs land with the service issue


DEFINITION = ServiceDefinition(
    name="messages",
    full_name=messages_pb2.DESCRIPTOR.services_by_name["MessagesService"].full_name,
    register=register,
)
