"""chat.v1.ThreadsService: translates protobuf requests into store calls."""

from __future__ import annotations

from chat.v1 import threads_pb2_grpc

from services.common.server import Runtime


class ThreadsServicer(threads_pb2_grpc.ThreadsServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._pool = runtime.pool
