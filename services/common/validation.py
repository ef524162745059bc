"""Request-field checks shared by every service; each failure names its field."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from urllib.parse import urlsplit
from uuid import UUID

from google.protobuf import timestamp_pb2

from services.common.errors import FieldViolation, InvalidArgument


def parse_uuid(value: str, field: str) -> UUID:
    """A required UUID field: empty or malformed is INVALID_ARGUMENT naming `field`."""
    if not value:
        raise InvalidArgument.field(field, "is required")
    try:
        return UUID(value)
    except ValueError:
        raise InvalidArgument.field(field, "must be a UUID") from None


def parse_uuids(**fields: str) -> list[UUID]:
    """Required UUID fields, by name: one INVALID_ARGUMENT naming every bad one."""
    violations = Violations()
    found = [violations.check_uuid(value, field) for field, value in fields.items()]
    violations.raise_if_any()
    return [value for value in found if value is not None]


# google.protobuf.Timestamp's own range: 0001-01-01 to 9999-12-31, nanos 0..999,999,999.
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799


def parse_timestamp(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    """An aware datetime, or INVALID_ARGUMENT naming `field` when out of range."""
    if not (
        TIMESTAMP_MIN_SECONDS <= value.seconds <= TIMESTAMP_MAX_SECONDS
        and 0 <= value.nanos <= 999_999_999
    ):
        raise InvalidArgument.field(
            field, "must be a timestamp from 0001-01-01 to 9999-12-31 with nanos 0..999999999"
        )
    return value.ToDatetime(tzinfo=UTC)


def parse_optional_uuid(value: str, field: str) -> UUID | None:
    return parse_uuid(value, field) if value else None


# Unicode general categories refused in every name shown to people (user, thread
# and attachment names): Cc controls (NUL, BEL, ESC of ANSI escapes, C1), Cf format
# characters (zero-width space/joiners, bidi marks, embeddings, overrides and
# isolates, BOM, soft hyphen, tags), Cs surrogates, Co private use, Zl/Zp line and
# paragraph separators. Each can hide or reorder what a reader sees.
REFUSED_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
_CATEGORY_WORDS = {
    "Cc": "control",
    "Cf": "invisible or bidirectional format",
    "Cs": "surrogate",
    "Co": "private-use",
    "Zl": "line separator",
    "Zp": "paragraph separator",
}


def is_noncharacter(code_point: int) -> bool:
    """U+FDD0..U+FDEF and the last two code points of every plane (U+FFFE, U+10FFFF, ...)."""
    return 0xFDD0 <= code_point <= 0xFDEF or code_point & 0xFFFE == 0xFFFE


# Letters that render as nothing (Hangul fillers, the braille blank) and the
# combining grapheme joiner: not in the refused categories, but a name of them
# alone looks empty, and inside a name they hide in plain sight.
BLANK_NAME_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f")
# What makes a character visible: letters, numbers, punctuation, symbols (a mark or
# a space alone shows nothing).
_VISIBLE_CATEGORY_HEADS = frozenset("LNPS")


def has_visible_character(value: str) -> bool:
    """True if some character of `value` shows (not only spaces, blanks and marks)."""
    return any(
        unicodedata.category(char)[0] in _VISIBLE_CATEGORY_HEADS
        and char not in BLANK_NAME_CHARACTERS
        for char in value
    )


def refused_name_character(value: str) -> str | None:
    """Why the first character `value` must not contain is refused, or None if none is.

    Also refuses the 66 permanent noncharacters: U+10FFFF is the upper bound of
    the users' prefix search, so no stored name may contain it.
    """
    if value.isascii():
        for char in value:
            if char < " " or char == "\x7f":
                return f"control character U+{ord(char):04X}"
        return None
    for char in value:
        if char in BLANK_NAME_CHARACTERS:
            return f"blank character U+{ord(char):04X}"
        category = unicodedata.category(char)
        if category in REFUSED_NAME_CATEGORIES:
            return f"{_CATEGORY_WORDS[category]} character U+{ord(char):04X}"
        if category == "Cn" and is_noncharacter(ord(char)):
            return f"noncharacter U+{ord(char):04X}"
    return None


class Violations:
    """Collects every problem with a request so one error names them all."""

    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self._items.append(FieldViolation(field, description))

    def check_length(self, value: str, field: str, *, max_len: int, min_len: int = 0) -> bool:
        """Length within bounds and no NUL character (PostgreSQL text cannot hold one)."""
        if "\x00" in value:
            self.add(field, "must not contain NUL characters")
        elif len(value) > max_len:
            self.add(field, f"must be at most {max_len} characters")
        elif len(value) < min_len:
            self.add(field, f"must be at least {min_len} characters")
        else:
            return True
        return False

    def check_name(self, value: str, field: str, *, max_len: int, min_len: int = 0) -> bool:
        """check_length, and none of the characters a reader cannot see or that reorder text.

        The one rule for every name field (REFUSED_NAME_CATEGORIES, noncharacters).
        """
        if not self.check_length(value, field, max_len=max_len, min_len=min_len):
            return False
        refused = refused_name_character(value)
        if refused is not None:
            self.add(field, f"must not contain {refused}")
            return False
        if value and not has_visible_character(value):
            self.add(field, "must contain a visible character (not only spaces or blanks)")
            return False
        return True

    def check_http_url(self, value: str, field: str, *, max_len: int) -> None:
        """Empty, or an http(s) URL of at most `max_len` characters."""
        if self.check_length(value, field, max_len=max_len) and value:
            try:
                parts = urlsplit(value)
                valid = parts.scheme in ("http", "https") and bool(parts.netloc)
            except ValueError:  # e.g. "http://[x]/": a bracketed host that is no IPv6 address
                valid = False
            if not valid:
                self.add(field, "must be an http(s) URL")

    def check_uuid(self, value: str, field: str) -> UUID | None:
        try:
            return parse_uuid(value, field)
        except InvalidArgument as err:
            self._items.extend(err.violations)
            return None

    def raise_if_any(self) -> None:
        if self._items:
            raise InvalidArgument(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)
