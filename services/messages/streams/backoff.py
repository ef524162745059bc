"""Retry delays shared by the listener and the feeds."""

from __future__ import annotations

import random


def jittered(delay: float) -> float:
    """`delay` spread over [delay/2, delay]: replicas do not reconnect in lockstep."""
    return delay * (0.5 + random.random() / 2)  # not security: spreading reconnects
