"""chat.v1.UsersService: translates protobuf requests into store calls."""

from __future__ import annotations

from chat.v1 import users_pb2_grpc

from services.common.server import Runtime


class UsersServicer(users_pb2_grpc.UsersServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._pool = runtime.pool
