"""chat_client.connect: what its service config retries, its keepalive against the
server's ping policy, and TLS, the bearer token and x-user-id reaching a real server."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest
from chat.v1 import errors_pb2, users_pb2, users_pb2_grpc

import chat_client
from chat_client import ChatError, as_user
from chat_client.channel import KEEPALIVE_OPTIONS, channel_options, method_names
from services.common.server import server_options
from services.common.settings import ServiceSettings
from services.users.service import DEFINITION as USERS
from tests.certificates import CertificateAuthority
from tests.conftest import serve
from tests.factories import new_user


def retried_methods() -> dict[str, list[str]]:
    config = chat_client.service_config()
    return {
        f"{name['service']}/{name['method']}": entry["retryPolicy"]["retryableStatusCodes"]
        for entry in config["methodConfig"]
        for name in entry["name"]
    }


def test_the_service_config_retries_reads_and_idempotent_writes_only() -> None:
    retried = retried_methods()
    reads = {
        m
        for m in method_names()
        if m.split("/")[1].startswith(("Get", "List", "Search", "BatchGet", "Lookup"))
        and "GetOrCreate" not in m
    }
    assert reads <= retried.keys()
    assert (
        "chat.v1.UsersService/LookupUser" in reads and "chat.v1.UsersService/BatchGetUsers" in reads
    )
    # A repeat of these could write twice (or change what another call wrote since).
    for write in (
        "chat.v1.MessagesService/SendMessage",
        "chat.v1.MessagesService/AddAttachment",
        "chat.v1.MessagesService/UpdateMessage",
        "chat.v1.ThreadsService/CreateThread",
        "chat.v1.ThreadsService/DeleteThread",
        "chat.v1.ThreadsService/SendTyping",
        "chat.v1.UsersService/CreateUser",
    ):
        assert write in method_names() and write not in retried
    assert not set(method_names(streaming=True)) & retried.keys()
    assert all(codes == ["UNAVAILABLE", "ABORTED"] for codes in retried.values())
    options = dict(channel_options())
    assert json.loads(options["grpc.service_config"]) == chat_client.service_config()


def test_client_keepalive_stays_within_the_servers_ping_policy() -> None:
    """The client pings no more often than the server accepts (else GOAWAY
    too_many_pings ends every stream); gRPC core's server defaults where the
    services set nothing."""
    server = dict(server_options(ServiceSettings(DATABASE_URL="postgresql://x/y")))
    client = dict(KEEPALIVE_OPTIONS)
    assert client["grpc.keepalive_time_ms"] >= server.get(
        "grpc.http2.min_ping_interval_without_data_ms", 300_000
    )
    if not server.get("grpc.keepalive_permit_without_calls", 0):
        assert client["grpc.keepalive_permit_without_calls"] == 0


async def get_user(
    channel: grpc.aio.Channel,
    user_id: str,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> str:
    stub = users_pb2_grpc.UsersServiceStub(channel)
    try:
        reply = await stub.GetUser(users_pb2.GetUserRequest(id=user_id), metadata=metadata)
    except grpc.aio.AioRpcError as err:
        raise ChatError.from_rpc_error(err) from None
    return reply.user.id


async def test_tls_token_and_user_reach_the_server(
    database_url: str, db_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    ca = CertificateAuthority(tmp_path, "ca")
    cert = ca.issue("server", server=True)
    alice = await new_user(db_pool)
    plain = ServiceSettings(
        DATABASE_URL=database_url,
        GRPC_HOST="127.0.0.1",
        METRICS_PORT=0,
        AUTH_TOKENS="s3cret",  # the setting under test
    )
    tls = plain.model_copy(update={"tls_cert_file": str(cert.cert), "tls_key_file": str(cert.key)})
    secure_server, plain_server = await serve(USERS, tls), await serve(USERS, plain)
    roots = ca.issued.cert.read_bytes()
    target = f"localhost:{secure_server.port}"
    try:
        # Over TLS the token travels as call credentials; without TLS as metadata.
        async with (
            chat_client.connect(
                target, root_certificates=roots, token="s3cret", user_id=alice
            ) as secure,
            chat_client.connect(plain_server.address, token="s3cret", user_id=alice) as open_,
        ):
            for channel in (secure, open_):
                assert await get_user(channel, alice) == alice
                # A call's own x-user-id replaces the channel's (two would be refused
                # as INVALID_ARGUMENT): here it names nobody.
                with pytest.raises(ChatError) as caught:
                    await get_user(channel, alice, metadata=as_user(str(uuid.uuid4())))
                assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
                assert caught.value.reason == errors_pb2.ERROR_REASON_USER_UNKNOWN

        async with chat_client.connect(target, root_certificates=roots, user_id=alice) as no_token:
            with pytest.raises(ChatError) as caught:
                await get_user(no_token, alice)
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert caught.value.reason == errors_pb2.ERROR_REASON_UNAUTHENTICATED
    finally:
        await secure_server.stop(grace=1.0)
        await plain_server.stop(grace=1.0)
