"""Opaque stream cursors: a position in one thread's commit-ordered change log."""

from __future__ import annotations

import base64
import binascii
from uuid import UUID

from services.common.errors import InvalidArgument


def encode_cursor(thread_id: UUID, position: int) -> str:
    return base64.urlsafe_b64encode(f"{thread_id}:{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str, thread_id: UUID, field: str = "after") -> int:
    """The position in `cursor`; it must come from this thread."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        thread, _, position = raw.partition(":")
        if UUID(thread) != thread_id:
            raise InvalidArgument.field(field, "is a cursor of another thread")
        value = int(position)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument.field(field, "is not a cursor from this API") from None
    if value < 0:
        raise InvalidArgument.field(field, "is not a cursor from this API")
    return value
