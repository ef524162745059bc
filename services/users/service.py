"""How the users service plugs into the shared server bootstrap."""

from __future__ import annotations

import grpc
from chat.v1 import users_pb2, users_pb2_grpc

from services.common.server import Runtime, ServiceDefinition
from services.users.servicer import UsersServicer


async def register(server: grpc.aio.Server, runtime: Runtime) -> None:
    users_pb2_grpc.add_UsersServiceServicer_to_server(UsersServicer(runtime), server)


DEFINITION = ServiceDefinition(
    name="users",
    full_name=users_pb2.DESCRIPTOR.services_by_name["UsersService"].full_name,
    register=register,
)
