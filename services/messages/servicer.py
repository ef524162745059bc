"""chat.v1.MessagesService: translates protobuf requests into store calls."""

from __future__ import annotations

from chat.v1 import messages_pb2_grpc

from services.common.server import Runtime


class MessagesServicer(messages_pb2_grpc.MessagesServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._pool = runtime.pool
