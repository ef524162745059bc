"""Process logging: one line per event, key=value fields, to stderr."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str, service: str, rpc_level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
        force=True,
    )
    # The per-RPC lines (interceptors.py) have their own level.
    logging.getLogger("services.rpc").setLevel(
        max(logging.getLevelName(level), logging.getLevelName(rpc_level))
    )
