"""How the threads service plugs into the shared server bootstrap."""

from __future__ import annotations

from chat.v1 import threads_pb2, threads_pb2_grpc

from services.common.server import ServiceDefinition
from services.threads.servicer import ThreadsServicer

DEFINITION = ServiceDefinition.of_servicer(
    "threads",
    threads_pb2.DESCRIPTOR.services_by_name["ThreadsService"],
    threads_pb2_grpc.add_ThreadsServiceServicer_to_server,
    ThreadsServicer,
)
