"""`python -m services.common.health_client HOST:PORT [SERVICE]`: exit 0 when SERVING.

A probe for containers and scripts that speaks the standard gRPC health protocol,
so no extra binary (grpc_health_probe) is needed. (What a server answers comes
from health_watch.py.)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(address: str, tls: TlsFiles | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca),
        private_key=_read(tls.key),
        certificate_chain=_read(tls.cert),
    )
    return grpc.secure_channel(address, credentials)


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclass(frozen=True)
class TlsFiles:
    ca: str | None = None  # CA that signed the server's certificate
    cert: str | None = None  # client certificate, for servers that require one
    key: str | None = None


def check(
    address: str, service: str = "", timeout: float = 2.0, tls: TlsFiles | None = None
) -> str:
    """The health status name of `service` at `address` ("" means the whole server)."""
    with _channel(address, tls) as channel:
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
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--tls-ca", help="CA certificate that signed the server's")
    parser.add_argument("--tls-cert", help="client certificate (mTLS)")
    parser.add_argument("--tls-key", help="client key (mTLS)")
    args = parser.parse_args()
    tls = TlsFiles(args.tls_ca, args.tls_cert, args.tls_key) if args.tls or args.tls_ca else None
    status = check(args.address, args.service, args.timeout, tls)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
