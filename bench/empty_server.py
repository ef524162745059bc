"""`python -m bench.empty_server`: an empty unary RPC on the services' own stack.

Same bootstrap, interceptor, uvloop and pool as a real service; the method does
nothing. Its throughput is what gRPC Python itself costs: the ceiling for every
RPC of the services.
"""

from __future__ import annotations

import grpc

from services.common.server import Runtime, ServiceDefinition, run_service
from services.common.types import Context


async def _empty(request: bytes, context: Context) -> bytes:
    return b""


async def _register(server: grpc.aio.Server, runtime: Runtime) -> None:
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Empty", {"Call": grpc.unary_unary_rpc_method_handler(_empty)}
            ),
        )
    )


DEFINITION = ServiceDefinition(name="users", full_name="bench.Empty", register=_register)

if __name__ == "__main__":
    raise SystemExit(run_service(DEFINITION))
