"""A channel to one of the services, configured the way the backend expects callers.

What gRPC retries on its own (the service config below):

- Reads (unary Get*, List*, Search*, BatchGet*, Lookup*) and the few writes whose
  repeat changes nothing (`IDEMPOTENT_WRITES`) are retried on UNAVAILABLE and
  ABORTED (LOCK_TIMEOUT, CONCURRENT_CONFLICT: rolled back, nothing written), at
  most 4 attempts, with gRPC's jittered exponential backoff and retry throttling.
- Every other write (CreateThread, AddAttachment, UpdateMessage, SendMessage, ...)
  gets no retry policy. A server-sent UNAVAILABLE does not prove that nothing was
  written: a process killed mid-call, or a database that stalled past
  DB_COMMAND_TIMEOUT, may have committed (README "Configuration"), and a repeat
  would write twice. gRPC's transparent retries still resend calls no server
  application saw (refused streams, GOAWAY). Sends are retried by
  `send_message`, safely, because it always carries a request_id (AIP-155).
- Streams get none: a follower (`follow_thread`, `follow_user`) resumes from its
  cursor, which gRPC's stream retries (only before the first response) cannot do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

import grpc
from chat.v1 import admin_pb2, messages_pb2, threads_pb2, users_pb2

USER_ID_HEADER = "x-user-id"
AUTHORIZATION_HEADER = "authorization"

READ_PREFIXES = ("Get", "List", "Search", "BatchGet", "Lookup")
# Writes whose repeat leaves the same state: the pair's one direct thread,
# adding existing members, a tombstone, a read mark that only moves forward.
IDEMPOTENT_WRITES = frozenset(
    {
        "chat.v1.ThreadsService/GetOrCreateDirectThread",
        "chat.v1.ThreadsService/AddParticipants",
        "chat.v1.ThreadsService/MarkRead",
        "chat.v1.MessagesService/DeleteMessage",
    }
)
RETRYABLE_BY_CHANNEL = ("UNAVAILABLE", "ABORTED")

# The services set no keepalive policy (services/common/server.py), so gRPC core's
# server defaults hold: a client ping more often than every 5 minutes
# (grpc.http2.min_ping_interval_without_data_ms), or with no call open
# (grpc.keepalive_permit_without_calls=0), is a strike, and the third strike closes
# the connection with GOAWAY "too_many_pings". So ping exactly that often, only
# while calls are open, and keep pinging through an idle stream
# (max_pings_without_data=0): a long-lived stream over a dead connection (a NAT
# that forgot it) is then noticed within 5 minutes + the 20 s timeout.
SERVER_MIN_PING_INTERVAL_MS = 300_000
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", SERVER_MIN_PING_INTERVAL_MS),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
)
# gRPC's default grows the reconnect delay to 2 minutes; a restarted service
# should be found again within seconds.
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 10_000),
)


def method_names(streaming: bool = False) -> list[str]:
    """Every chat.v1 method as "package.Service/Method", unary or server-streaming."""
    return [
        f"{service.full_name}/{method.name}"
        for module in (users_pb2, threads_pb2, messages_pb2, admin_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
        if method.server_streaming == streaming
    ]


def safe_to_retry(method: str) -> bool:
    """Whether a repeat of `method` ("chat.v1.Service/Method") can write nothing new."""
    name = method.rsplit("/", 1)[1]
    if method in IDEMPOTENT_WRITES:
        return True
    return name.startswith(READ_PREFIXES) and not name.startswith("GetOrCreate")


def service_config() -> dict[str, Any]:
    """The gRPC service config (JSON) every channel of `connect` carries."""
    retried = [m for m in method_names() if safe_to_retry(m)]
    return {
        "methodConfig": [
            {
                "name": [{"service": m.split("/")[0], "method": m.split("/")[1]} for m in retried],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": list(RETRYABLE_BY_CHANNEL),
                },
            }
        ],
        # Retries stop while more than half of recent calls fail: an outage is not
        # multiplied by 4 on the way back up.
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }


def channel_options(extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    return [
        *KEEPALIVE_OPTIONS,
        *RECONNECT_OPTIONS,
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config())),
        # This config, not one from DNS TXT records, is the one that applies.
        ("grpc.service_config_disable_resolution", 1),
        *extra,
    ]


def as_user(user_id: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that makes one call act for `user_id` (a gateway serving many users)."""
    return ((USER_ID_HEADER, user_id),)


def connect(
    target: str,
    *,
    tls: bool = False,
    root_certificates: bytes | None = None,
    client_certificate: tuple[bytes, bytes] | None = None,
    token: str | None = None,
    user_id: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A channel to `target` ("host:port").

    TLS: `tls=True` (the system's roots), or `root_certificates` (PEM of the CA that
    signed the server), plus `client_certificate=(chain_pem, key_pem)` for mTLS.
    `token`: the calling service's bearer token (AUTH_TOKENS on the services); over
    TLS it is call credentials (gRPC never sends those in clear), without TLS it is
    plain `authorization` metadata, for a trusted network only.
    `user_id`: every call acts for this end user (`x-user-id`); leave it out for a
    trusted service channel and pass `metadata=as_user(...)` per call instead.
    """
    headers: list[tuple[str, str]] = []
    if user_id is not None:
        headers.append((USER_ID_HEADER, user_id))
    secure = tls or root_certificates is not None or client_certificate is not None
    interceptors = []
    if secure:
        chain, key = client_certificate if client_certificate else (None, None)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root_certificates, private_key=key, certificate_chain=chain
        )
        if token is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token)
            )
    elif token is not None:
        headers.append((AUTHORIZATION_HEADER, f"Bearer {token}"))
    if headers:
        interceptors.append(_DefaultMetadata(headers))
    if secure:
        return grpc.aio.secure_channel(
            target, credentials, options=channel_options(options), interceptors=interceptors
        )
    return grpc.aio.insecure_channel(
        target, options=channel_options(options), interceptors=interceptors
    )


_Req = TypeVar("_Req")


class _DefaultMetadata(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Adds the channel's headers to every call that does not set them itself.

    Only when absent: the services refuse an `x-user-id` sent twice, so a call's
    own `as_user(...)` replaces the channel's rather than adding a second one.
    (The API has no client-streaming methods, so only these two kinds.)
    """

    def __init__(self, headers: Sequence[tuple[str, str]]) -> None:
        self.headers = tuple(headers)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in self.headers:
            if not metadata.get_all(key):
                metadata.add(key, value)
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: _Req
    ) -> Any:
        return await continuation(self._details(client_call_details), request)

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: _Req
    ) -> Any:
        return await continuation(self._details(client_call_details), request)
