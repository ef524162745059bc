"""A free TCP port for a process the caller is about to start (a /metrics port).

Picked below the kernel's ephemeral range (net.ipv4.ip_local_port_range), where
nothing bound to port 0 lands: a port found free by binding port 0 and closing
it is itself an ephemeral port, and another socket bound to port 0 (the started
service's own gRPC port, a client connection) can take it before the process
binds it. That race failed CI once (tests/common/test_metrics.py).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Below the usual ephemeral ranges (Linux 32768-60999, IANA 49152-65535) and
# above the well-known and most registered service ports.
_LOWEST = 20_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_ATTEMPTS = 200


def _first_ephemeral() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` nobody listens on now, outside the ephemeral range."""
    top = _first_ephemeral()
    for _ in range(_ATTEMPTS):
        port = random.randrange(_LOWEST, max(top, _LOWEST + 1))
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found in {_LOWEST}-{top} after {_ATTEMPTS} attempts")
