"""TLS and mutual TLS between internal services, with generated certificates."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from services.common.settings import ServiceSettings
from tests.certificates import CertificateAuthority
from tests.conftest import health_status, serve
from tests.probe_service import PROBE, call


async def test_mutual_tls_refuses_plaintext_and_foreign_clients(
    database_url: str, tmp_path: Path
) -> None:
    internal = CertificateAuthority(tmp_path, "internal-ca")
    foreign = CertificateAuthority(tmp_path, "foreign-ca")
    server_cert = internal.issue("server", server=True)
    good_client = internal.issue("client", server=False)
    foreign_client = foreign.issue("intruder", server=False)

    settings = ServiceSettings(
        DATABASE_URL=database_url,
        GRPC_HOST="127.0.0.1",
        METRICS_PORT=0,
        TLS_CERT_FILE=str(server_cert.cert),
        TLS_KEY_FILE=str(server_cert.key),
        TLS_CLIENT_CA_FILE=str(internal.issued.cert),
    )
    service = await serve(PROBE, settings)
    target = f"localhost:{service.port}"
    ca = internal.issued.cert.read_bytes()

    def secure(client_cert: tuple[bytes, bytes] | None) -> grpc.aio.Channel:
        cert, key = client_cert if client_cert else (None, None)
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
        return grpc.aio.secure_channel(target, creds)

    try:
        async with secure(good_client.read()) as channel:
            assert await call(channel, b"ok") == b"ok"
            assert await health_status(channel) == "SERVING"

        refused = [
            grpc.aio.insecure_channel(target),  # plaintext
            secure(None),  # TLS without a client certificate
            secure(foreign_client.read()),  # a certificate from another CA
        ]
        for channel in refused:
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(channel, b"ok", deadline_s=5)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await service.stop(grace=1.0)


def test_tls_settings_come_in_pairs() -> None:
    with pytest.raises(ValueError, match="TLS_CERT_FILE and TLS_KEY_FILE"):
        ServiceSettings(DATABASE_URL="postgresql://x/y", TLS_CERT_FILE="/a.crt")
    with pytest.raises(ValueError, match="TLS_CLIENT_CA_FILE"):
        ServiceSettings(DATABASE_URL="postgresql://x/y", TLS_CLIENT_CA_FILE="/ca.crt")
