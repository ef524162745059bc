"""How the messages service plugs into the shared server bootstrap."""

from __future__ import annotations

import logging

import grpc
from chat.v1 import messages_pb2, messages_pb2_grpc

from services.common.errors import ShuttingDown
from services.common.server import Runtime, ServiceDefinition
from services.messages.paging import (
    PAGE_TOKEN_RESERVE,
    largest_message_bytes,
    repeated_field_size,
)
from services.messages.servicer import MessagesServicer
from services.messages.settings import MessagesSettings
from services.messages.streams import StreamHub

log = logging.getLogger(__name__)


async def register(server: grpc.aio.Server, runtime: Runtime) -> None:
    settings = MessagesSettings()
    largest = largest_message_bytes(settings)
    if PAGE_TOKEN_RESERVE + repeated_field_size(largest) > settings.list_response_max_bytes:
        # A page still carries one message, so such a page can exceed the budget.
        log.warning(
            "one message within the configured limits can be about %d bytes serialised, "
            "more than a list page may hold (LIST_RESPONSE_MAX_BYTES=%d); a page of one "
            "such message exceeds it",
            largest,
            settings.list_response_max_bytes,
        )
    hub = StreamHub(runtime.pool, runtime.settings, settings)
    await hub.start()

    async def end_streams() -> None:
        # Before in-flight RPCs drain, so clients resume (elsewhere) from their cursor.
        hub.end_streams(ShuttingDown("the server is shutting down; resume from your cursor"))

    runtime.stopping_hooks.append(end_streams)
    runtime.shutdown_hooks.append(hub.stop)
    runtime.extras["hub"] = hub
    messages_pb2_grpc.add_MessagesServiceServicer_to_server(
        MessagesServicer(runtime.pool, hub, settings), server
    )


DEFINITION = ServiceDefinition(
    name="messages",
    full_name=messages_pb2.DESCRIPTOR.services_by_name["MessagesService"].full_name,
    register=register,
    # Writes wake streams after they commit, not by a NOTIFY in their transaction
    # (streams/waker.py; db/functions/positions.sql).
    session_settings={"chat.wake_after_commit": "on"},
)
