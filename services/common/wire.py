"""Responses serialised once, sent many times.

A live stream event reaches every subscriber of a thread (or every user a log
event concerns) as the same bytes, so it is serialised once when it is
converted, and each stream hands those bytes to gRPC. gRPC serialises whatever a
handler yields with the method's response serializer; the interceptor wraps that
serializer so bytes pass through untouched (interceptors.py, `passing_bytes`).
The client sees the same message either way.

A list response is assembled the same way from messages already serialised
(services/messages/message_cache.py): `length_delimited` frames each one as
protobuf's encoder would, so the bytes equal SerializeToString's.
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


# Protobuf wire type 2: a length-delimited field (a string, bytes or a message).
_LENGTH_DELIMITED = 2


def varint(value: int) -> bytes:
    """`value` (non-negative) as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One occurrence of field `field_number` holding `payload` (a serialised
    message or a UTF-8 string), framed as protobuf encodes it: tag, length, payload."""
    return varint(field_number << 3 | _LENGTH_DELIMITED) + varint(len(payload)) + payload
