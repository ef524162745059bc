"""Responses serialised once, sent many times.

A live stream event reaches every subscriber of a thread (or every user a log
event concerns) as the same bytes, so it is serialised once when it is
converted, and each stream hands those bytes to gRPC. gRPC serialises whatever a
handler yields with the method's response serializer; the interceptor wraps that
serializer so bytes pass through untouched (interceptors.py, `passing_bytes`).
The client sees the same message either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

Message = TypeVar("Message")


def as_response(payload: bytes, response_type: type[Message]) -> Message:
    """`payload`, a serialised `response_type`, typed as one for the servicer's
    signature; the response serializer passes it through as it is."""
    return cast(Message, payload)


def passing_bytes(
    serialize: Callable[[Any], bytes] | None,
) -> Callable[[Any], bytes] | None:
    """A response serializer that sends bytes as they are and serialises the rest."""
    if serialize is None:
        return None

    def encode(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return encode
