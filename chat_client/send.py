"""`send_message`: a send that is retried until its outcome is known, never written twice."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence

import grpc
from chat.v1 import messages_pb2, messages_pb2_grpc

from chat_client.backoff import Backoff
from chat_client.errors import ChatError

# The codes after which a send is repeated with the same request_id. The server
# dedups by (sender, request_id) under the thread lock, so a repeat of a send that
# did commit returns the original message and writes nothing (services/messages
# README, "request_id means one request"):
# - UNAVAILABLE: the service or its database is away, or stopping; the send may
#   or may not have committed.
# - DEADLINE_EXCEEDED: our attempt timeout ran out (outcome unknown), or the
#   statement timeout (STATEMENT_TIMEOUT: nothing written).
# - ABORTED: a lock wait or a deadlock rolled it back (LOCK_TIMEOUT,
#   CONCURRENT_CONFLICT): nothing written.
# - CANCELLED that we did not ask for (ours raises asyncio.CancelledError, not an
#   RpcError): a call a stopping server accepted but never handled
#   (grpc/grpc#41785, docs/reliability.md), so it did nothing.
# Everything else (INVALID_ARGUMENT incl. REQUEST_ID_REUSED, NOT_FOUND,
# PERMISSION_DENIED, FAILED_PRECONDITION, ...) would fail the same way again.
SEND_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
SEND_BACKOFF = Backoff(initial_s=0.05, max_s=2.0)

RetryHook = Callable[[ChatError, float], None]


def with_request_id(request: messages_pb2.SendMessageRequest) -> messages_pb2.SendMessageRequest:
    """A copy of `request` that carries a request_id (a new UUID if it had none)."""
    copy = messages_pb2.SendMessageRequest()
    copy.CopyFrom(request)
    if not copy.request_id:
        copy.request_id = str(uuid.uuid4())
    return copy


async def send_message(
    channel: grpc.aio.Channel,
    request: messages_pb2.SendMessageRequest,
    *,
    metadata: Sequence[tuple[str, str]] | None = None,
    attempt_timeout_s: float = 10.0,
    total_timeout_s: float = 60.0,
    backoff: Backoff = SEND_BACKOFF,
    on_retry: RetryHook | None = None,
) -> messages_pb2.Message:
    """Send `request` and return the stored message.

    A request without a request_id gets one, so every attempt is the same request
    and the message is stored at most once. Retries on `SEND_RETRYABLE` with
    jittered exponential backoff (or the server's RetryInfo delay) until
    `total_timeout_s` has passed; each attempt has at most `attempt_timeout_s`.
    `on_retry(error, delay_s)` is called before each wait (for logs or metrics).
    Raises ChatError with the last failure.
    """
    request = with_request_id(request)
    stub = messages_pb2_grpc.MessagesServiceStub(channel)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + total_timeout_s
    attempts = backoff.start()
    while True:
        remaining = give_up - loop.time()
        try:
            reply = await stub.SendMessage(
                request, metadata=metadata, timeout=max(min(attempt_timeout_s, remaining), 0.001)
            )
            return reply.message
        except grpc.aio.AioRpcError as err:
            error = ChatError.from_rpc_error(err)
        if error.code not in SEND_RETRYABLE:
            raise error
        delay = attempts.delay_after(error)
        if loop.time() + delay >= give_up:
            raise error
        if on_retry is not None:
            on_retry(error, delay)
        await asyncio.sleep(delay)
