"""`python -m bench.empty_server`: an empty unary RPC on the services' own stack.

Same bootstrap, interceptor, uvloop and pool as a real service; the method does
nothing. Its throughput is what gRPC Python itself costs: the ceiling for every
RPC of the services.

`bench.Empty/Stream` is the same for streams: a server-streaming call that
yields the same pre-serialised event (STREAM_EVENT_BYTES, about a small chat
message's stream event) as many times as the request's bytes say (an integer,
little-endian), through the
interceptor's stream path as the services' streams are. Its CPU per event is
the floor under a live stream's fan-out cost per delivered event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.common.server import Runtime, ServiceDefinition, run_service
from services.common.types import Context

# A stream event of a short message (thread, user and message ids, content,
# timestamps, cursor) is about 300 bytes serialised.
STREAM_EVENT_BYTES = 300
# (The client reads raw bytes: no message type to match.)
_EVENT = bytes(STREAM_EVENT_BYTES)


async def _empty(request: bytes, context: Context) -> bytes:
    return b""


async def _stream(request: bytes, context: Context) -> AsyncIterator[bytes]:
    for _ in range(int.from_bytes(request, "little")):
        yield _EVENT


async def _register(server: grpc.aio.Server, runtime: Runtime) -> None:
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Empty",
                {
                    "Call": grpc.unary_unary_rpc_method_handler(_empty),
                    "Stream": grpc.unary_stream_rpc_method_handler(_stream),
                },
            ),
        )
    )


DEFINITION = ServiceDefinition(name="users", full_name="bench.Empty", register=_register)

if __name__ == "__main__":
    raise SystemExit(run_service(DEFINITION))
