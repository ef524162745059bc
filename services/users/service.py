"""How the users service plugs into the shared server bootstrap."""

from __future__ import annotations

from chat.v1 import users_pb2, users_pb2_grpc

from services.common.server import ServiceDefinition
from services.users.servicer import UsersServicer

DEFINITION = ServiceDefinition.of_servicer(
    "users",
    users_pb2.DESCRIPTOR.services_by_name["UsersService"],
    users_pb2_grpc.add_UsersServiceServicer_to_server,
    UsersServicer,
)
