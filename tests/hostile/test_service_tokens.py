"""With AUTH_TOKENS set, every RPC of every service refuses a missing or wrong token."""

from __future__ import annotations

import grpc
import pytest
from chat.v1 import admin_pb2, messages_pb2, threads_pb2, users_pb2
from google.protobuf.descriptor import FileDescriptor

from services.common.server import ServiceDefinition
from services.common.settings import ServiceSettings
from services.messages.service import DEFINITION as MESSAGES
from services.threads.service import DEFINITION as THREADS
from services.users.service import DEFINITION as USERS
from tests.conftest import health_status, running

CASES: list[tuple[ServiceDefinition, FileDescriptor]] = [
    (USERS, users_pb2.DESCRIPTOR),
    (THREADS, threads_pb2.DESCRIPTOR),
    (MESSAGES, messages_pb2.DESCRIPTOR),
]


@pytest.fixture
def guarded(database_url: str) -> ServiceSettings:
    # AUTH_TOKENS is the setting under test; the rest are defaults but where to listen.
    return ServiceSettings(
        DATABASE_URL=database_url, GRPC_HOST="127.0.0.1", METRICS_PORT=0, AUTH_TOKENS="s3cret"
    )


async def _call(
    channel: grpc.aio.Channel, path: str, streaming: bool, token: str | None
) -> grpc.StatusCode:
    metadata = (("authorization", token),) if token is not None else ()
    try:
        if streaming:
            stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
            await stream(b"", metadata=metadata, timeout=5).read()
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
            await unary(b"", metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("definition", "descriptor"), CASES, ids=lambda c: getattr(c, "name", ""))
async def test_every_rpc_needs_the_token(
    guarded: ServiceSettings, definition: ServiceDefinition, descriptor: FileDescriptor
) -> None:
    async with running(definition, guarded) as (_, channel):
        services = [
            *descriptor.services_by_name.values(),
            *admin_pb2.DESCRIPTOR.services_by_name.values(),
        ]
        methods = [(s.full_name, m) for s in services for m in s.methods]
        assert len(methods) > 2
        for service, method in methods:
            path = f"/{service}/{method.name}"
            streaming = method.server_streaming
            for token in (None, "Bearer wrong", "s3cret", "Bearer  s3cretx"):
                code = await _call(channel, path, streaming, token)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (path, token, code)
            # With the right token the call gets past authentication (an empty
            # request is then refused for what it is, never UNAUTHENTICATED).
            code = await _call(channel, path, streaming, "Bearer s3cret")
            assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL), path
        assert await health_status(channel) == "SERVING"  # probes stay open
