"""Opaque stream cursors: a position in one thread's commit-ordered change log."""

from __future__ import annotations

import base64
import binascii
from uuid import UUID

from services.common.errors import InvalidArgument

# "c:<uuid>:" is 39 bytes, a multiple of 3, so its base64 never pads and a cursor
# is the thread's cached prefix followed by the base64 of the position.
_PREFIXES: dict[UUID, str] = {}
_PREFIX_CACHE_MAX = 10_000


def _prefix(thread_id: UUID) -> str:
    prefix = _PREFIXES.get(thread_id)
    if prefix is None:
        if len(_PREFIXES) >= _PREFIX_CACHE_MAX:
            _PREFIXES.clear()
        prefix = _PREFIXES[thread_id] = base64.urlsafe_b64encode(
            f"c:{thread_id}:".encode()
        ).decode()
    return prefix


def encode_cursor(thread_id: UUID, position: int) -> str:
    tail = base64.urlsafe_b64encode(str(position).encode()).decode().rstrip("=")
    return _prefix(thread_id) + tail


# Positions are PostgreSQL bigints.
MAX_POSITION = 2**63 - 1


def decode_cursor(cursor: str, thread_id: UUID, field: str = "after") -> int:
    """The position in `cursor`; it must come from this thread.

    Only the exact spelling this API hands out is accepted (it is re-encoded and
    compared), so no two strings name one position and no out-of-range number
    reaches the database.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, thread, position = raw.split(":")
        if tag != "c" or not (position.isascii() and position.isdigit()):
            raise ValueError(raw)
        value = int(position)
        if value > MAX_POSITION:
            raise ValueError(raw)
        if UUID(thread) != thread_id:
            raise InvalidArgument.field(field, "is a cursor of another thread")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument.field(field, "is not a cursor from this API") from None
    if encode_cursor(thread_id, value) != cursor:
        raise InvalidArgument.field(field, "is not a cursor from this API")
    return value
