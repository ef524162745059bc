"""`python -m services.common.healthcheck HOST:PORT [SERVICE]`: exit 0 when SERVING.

A probe for containers and scripts that speaks the standard gRPC health protocol,
so no extra binary (grpc_health_probe) is needed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The health status name of `service` at `address` ("" means the whole server)."""
    with grpc.insecure_channel(address) as channel:
        # Typed Any: the types-grpcio-health-checking stub omits the stub's methods.
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            return f"UNREACHABLE ({err.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address")
    parser.add_argument("service", nargs="?", default="")
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    status = check(args.address, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
