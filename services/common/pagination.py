"""AIP-158 pagination: page sizes and opaque keyset page tokens.

A token is URL-safe base64 of a small JSON document holding the keyset position
of the last row served and a fingerprint of the request's other parameters; a
token reused with different parameters, or tampered with, is INVALID_ARGUMENT.
Tokens never expire: they are positions, not server-side cursors.

Every list RPC pages through one `PageCodec`: its kind (`PageKind`) and its
typed position (`Position`) say what a token holds; `codec.page(...)` decodes
a request's token, says how many rows to fetch (one more than the page, to know
whether another follows) and `page.finish(rows, ...)` trims them and makes the
next token. The JSON spelling is the one these functions always wrote, so
tokens handed out before stay valid.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar
from uuid import UUID

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# The longest token this API hands out is far shorter (a fingerprint and a keyset
# position); anything longer is refused before it is decoded.
MAX_PAGE_TOKEN_CHARS = 4096


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
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise InvalidArgument.field("page_token", "is not a page token of this method")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        position = body["p"]
        fingerprint = body["f"]
        valid = body["k"] == kind and isinstance(position, list) and bool(position)
    # RecursionError: a hand-made token of thousands of nested brackets.
    except (binascii.Error, ValueError, KeyError, TypeError, RecursionError):
        valid = False
    if not valid:
        raise InvalidArgument.field("page_token", "is not a page token of this method")
    if fingerprint != _fingerprint(kind, params):
        raise InvalidArgument.field(
            "page_token", "was issued for a request with different parameters"
        )
    return list(position)


def _bad_position() -> InvalidArgument:
    return InvalidArgument.field("page_token", "is not a valid position")


def time_id_position(position: list[Any]) -> tuple[datetime, UUID]:
    """A (timestamp, id) keyset position, checked: the fingerprint is no secret, so a
    hand-made token must fail here with INVALID_ARGUMENT, never in the database."""
    try:
        stamp, ident = position
        if not (isinstance(stamp, str) and isinstance(ident, str)):
            raise TypeError(position)
        at = datetime.fromisoformat(stamp)
        if at.tzinfo is None:
            raise ValueError(stamp)
        return at.astimezone(UTC), UUID(ident)
    except (ValueError, TypeError, OverflowError):
        raise _bad_position() from None


def text_position(position: list[Any], *, max_len: int) -> str:
    """A one-string keyset position (e.g. a username), checked like time_id_position."""
    if len(position) != 1 or not isinstance(position[0], str):
        raise _bad_position()
    value: str = position[0]
    if len(value) > max_len or "\x00" in value or not _encodable(value):
        raise _bad_position()
    return value


def _encodable(value: str) -> bool:
    """False for a lone surrogate (JSON can spell one; UTF-8 and PostgreSQL cannot)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def id_position(position: list[Any]) -> UUID:
    """A one-UUID keyset position, checked like time_id_position."""
    try:
        return UUID(text_position(position, max_len=36))
    except ValueError:
        raise _bad_position() from None


class PageKind(StrEnum):
    """What a token pages through; a token of one kind is refused by every other."""

    USERS = "users"
    INBOX = "inbox"
    PARTICIPANTS = "participants"
    HISTORY = "history"
    REPLIES = "replies"
    USER_HISTORY = "user-history"
    SEARCH = "search"


P = TypeVar("P")
R = TypeVar("R")
Params = Mapping[str, Any]
TimeId = tuple[datetime, UUID]


@dataclass(frozen=True)
class Position(Generic[P]):
    """A keyset position type: how it is written into a token and read back, checked."""

    dump: Callable[[P], list[Any]]
    load: Callable[[list[Any]], P]


TIME_ID: Position[TimeId] = Position(
    dump=lambda at_id: [at_id[0].isoformat(), str(at_id[1])], load=time_id_position
)
ID: Position[UUID] = Position(dump=lambda ident: [str(ident)], load=id_position)


def text(max_len: int) -> Position[str]:
    """A one-string position of at most `max_len` characters."""
    return Position(dump=lambda value: [value], load=lambda p: text_position(p, max_len=max_len))


@dataclass(frozen=True)
class PageCodec(Generic[P]):
    kind: PageKind
    position: Position[P]

    def encode(self, position: P, params: Params) -> str:
        """The token of the page that starts right after `position`."""
        return encode_page_token(self.kind.value, params, self.position.dump(position))

    def decode(self, token: str, params: Params) -> P | None:
        """The position in `token` (checked), or None for the first page."""
        raw = decode_page_token(token, self.kind.value, params)
        return None if raw is None else self.position.load(raw)

    def page(self, size: int, token: str, params: Params) -> Page[P]:
        """The page a request asks for; `size` as page_size_of gave it."""
        return Page(self, params, size, self.decode(token, params))


@dataclass(frozen=True)
class Page(Generic[P]):
    codec: PageCodec[P]
    params: Params
    size: int
    after: P | None  # the position to continue after; None for the first page

    @property
    def fetch(self) -> int:
        """Rows to read: one more than the page says whether another page follows."""
        return self.size + 1

    def finish(self, rows: Sequence[R], position_of: Callable[[R], P]) -> tuple[list[R], str]:
        """The rows to serve and the next page token ("" when this page is the last)."""
        if len(rows) <= self.size:
            return list(rows), ""
        served = list(rows[: self.size])
        return served, self.codec.encode(position_of(served[-1]), self.params)
