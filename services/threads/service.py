"""How the threads service plugs into the shared server bootstrap."""

from __future__ import annotations

import grpc
from chat.v1 import threads_pb2, threads_pb2_grpc

from services.common.server import Runtime, ServiceDefinition
from services.threads.servicer import ThreadsServicer


async def register(server: grpc.aio.Server, runtime: Runtime) -> None:
    threads_pb2_grpc.add_ThreadsServiceServicer_to_server(ThreadsServicer(runtime), server)


DEFINITION = ServiceDefinition(
    name="threads",
    full_name=threads_pb2.DESCRIPTOR.services_by_name["ThreadsService"].full_name,
    register=register,
)
