"""AIP-158 pagination: page sizes and opaque keyset page tokens.

A token is URL-safe base64 of a small JSON document holding the keyset position
of the last row served and a fingerprint of the request's other parameters; a
token reused with different parameters, or tampered with, is INVALID_ARGUMENT.
Tokens never expire: they are positions, not server-side cursors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


def page_size_of(
    requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE
) -> int:
    """0 means the default; above the maximum is coerced down (AIP-158); negative is invalid."""
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    if requested == 0:
        return default
    return min(requested, maximum)


def _fingerprint(kind: str, params: Any) -> str:
    blob = json.dumps([kind, params], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode_page_token(kind: str, params: Any, position: list[Any]) -> str:
    """`position` is the keyset of the last row served (JSON-serialisable values)."""
    body = {"k": kind, "f": _fingerprint(kind, params), "p": position}
    raw = json.dumps(body, separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, kind: str, params: Any) -> list[Any] | None:
    """The keyset position in `token`, or None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        position = body["p"]
        valid = body["k"] == kind and isinstance(position, list)
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        valid = False
    if not valid:
        raise InvalidArgument.field("page_token", "is not a page token of this method")
    if body["f"] != _fingerprint(kind, params):
        raise InvalidArgument.field(
            "page_token", "was issued for a request with different parameters"
        )
    return list(position)
