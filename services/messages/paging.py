"""Pages of messages bounded in bytes as well as rows.

Within the documented limits one message can be about 1 MB serialised (see
`largest_message_bytes`), so `page_size` alone cannot keep a page under gRPC's
default 4 MiB receive limit. A list response (ListMessages, ListReplies,
ListUserMessages, SearchMessages) therefore holds at most
LIST_RESPONSE_MAX_BYTES serialised bytes, page token included: the page ends
before the first message that would cross it, and the token continues right
after the last message served. It always holds at least one message (one
message fits the default budget, see the README), so paging always progresses.

Two bounds work together. The store walks the page's rows in order with a
running estimate of their stored size and stops once it reaches the budget
(store.bounded_page), so the database and this process never read more than
about a budget of rows whatever page_size says. Here the exact serialised size
decides: the estimate counts metadata as JSON text, which is up to 2.75 times
smaller than the same JSON as a protobuf Struct (a list of 0.0: 4 bytes of JSON,
11 of protobuf), so this check, not the estimate, keeps the promise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from chat.v1 import messages_pb2

from services.common.pagination import (
    TIME_ID,
    PageCodec,
    PageKind,
    Params,
    TimeId,
    page_size_of,
)
from services.common.wire import length_delimited
from services.messages.convert import message_to_proto
from services.messages.message_cache import SerializedMessages
from services.messages.settings import MessagesSettings
from services.messages.store import Page, PageRow, Position, Window
from services.messages.validation import NAME_MAX, TYPE_MAX, URL_MAX

# What each list RPC's token pages through; every listing's position is the
# (created_at, id) of the last message served.
HISTORY: PageCodec[TimeId] = PageCodec(PageKind.HISTORY, TIME_ID)
REPLIES: PageCodec[TimeId] = PageCodec(PageKind.REPLIES, TIME_ID)
USER_HISTORY: PageCodec[TimeId] = PageCodec(PageKind.USER_HISTORY, TIME_ID)
SEARCH: PageCodec[TimeId] = PageCodec(PageKind.SEARCH, TIME_ID)

# next_page_token is about 150 characters (kind, fingerprint, timestamp, id in
# base64); this much of the budget is kept for it and the response's framing.
PAGE_TOKEN_RESERVE = 512
# A google.protobuf.Struct is at most this many times its compact JSON (what
# MESSAGE_MAX_METADATA_BYTES counts): a list of 0.0 is 4 JSON bytes ("0.0,") and
# 11 protobuf bytes (a Value's tag and length, a double's tag and 8 bytes).
STRUCT_PER_JSON_BYTE = 2.75
UTF8_MAX = 4  # limits count characters; one is at most 4 bytes of UTF-8
# The field numbers every list response shares (messages.proto); the test of
# list_response checks them against the generated descriptors.
MESSAGES_FIELD = 1
NEXT_PAGE_TOKEN_FIELD = 2


def varint_size(value: int) -> int:
    """Bytes of `value` (non-negative) as a protobuf varint."""
    return max(1, math.ceil(value.bit_length() / 7))


def repeated_field_size(message_size: int) -> int:
    """What one element of a repeated message field adds to its parent: tag, length, body."""
    return 1 + varint_size(message_size) + message_size


def fit_page(
    rows: Sequence[PageRow],
    fetched: int,
    size: int,
    max_bytes: int,
    serialized: SerializedMessages,
) -> tuple[list[bytes], Position | None]:
    """The first of `rows` (at most `size`) whose response fits `max_bytes`, at least one.

    `rows` are the page's rows in order, `fetched` how many rows the page query
    found (at most size + 1; more than `rows` when the store stopped on bytes).
    Returns the messages as elements of the response's `messages` field (framed,
    see `element`) and the position of the last one served when more rows follow
    it (the next page token's), else None.
    """
    rows = rows[:size]
    elements = serialized.serialized(
        [r.version for r in rows], lambda i: element(message_to_proto(rows[i].row()))
    )
    served: list[bytes] = []
    total = PAGE_TOKEN_RESERVE
    for framed in elements:
        if served and total + len(framed) > max_bytes:
            break
        served.append(framed)
        total += len(framed)
    more = len(served) < fetched
    return served, rows[len(served) - 1].position if served and more else None


def element(message: messages_pb2.Message) -> bytes:
    """`message` as one element of a list response's `messages` field: tag, length,
    body. What the cache keeps, so a page is the concatenation of its elements."""
    return length_delimited(MESSAGES_FIELD, message.SerializeToString())


def list_response(elements: list[bytes], next_page_token: str) -> bytes:
    """A serialised list response (ListMessagesResponse and its three twins, which
    all hold `repeated Message messages = 1; string next_page_token = 2;`) from
    its messages' elements (`element`)."""
    if not next_page_token:
        return b"".join(elements)
    return b"".join(elements) + length_delimited(NEXT_PAGE_TOKEN_FIELD, next_page_token.encode())


@dataclass(frozen=True)
class PageRequest:
    """One list request's page: where it starts, how many rows and bytes it may hold."""

    codec: PageCodec[TimeId]  # what the token pages through; other kinds are refused
    params: Params  # the request's other parameters, fingerprinted in the token
    size: int
    after: Position | None  # continue after this message; None: the first page
    max_bytes: int

    @property
    def window(self) -> Window:
        """The rows to read: one more than the page says whether another page follows."""
        return Window(self.after, self.size + 1, self.max_bytes)

    def finish(self, page: Page, serialized: SerializedMessages) -> bytes:
        """The serialised response: the messages to serve and the next page token
        (none when no page follows)."""
        served, last = fit_page(page.rows, page.fetched, self.size, self.max_bytes, serialized)
        token = "" if last is None else self.codec.encode(last, self.params)
        return list_response(served, token)


class Listing(Protocol):
    """A list request: every one pages by these two fields (AIP-158)."""

    page_size: int
    page_token: str


def page_request(
    codec: PageCodec[TimeId], params: Params, page_size: int, page_token: str, max_bytes: int
) -> PageRequest:
    """The page a request asks for, its size and token checked (INVALID_ARGUMENT)."""
    size = page_size_of(page_size)
    return PageRequest(codec, params, size, codec.decode(page_token, params), max_bytes)


def largest_message_bytes(settings: MessagesSettings) -> int:
    """An upper estimate of one Message serialised at every limit in `settings`.

    Content and attachment strings at 4 bytes a character, metadata at
    STRUCT_PER_JSON_BYTE times its JSON limit (plus slack for nesting, whose
    lengths grow with depth), ids, timestamps, cursor and framing generously.
    """
    metadata = math.ceil(STRUCT_PER_JSON_BYTE * settings.max_metadata_bytes) + 1024
    attachment = UTF8_MAX * (URL_MAX + TYPE_MAX + NAME_MAX) + metadata + 256
    return (
        UTF8_MAX * settings.max_content_chars
        + metadata
        + settings.max_attachments * repeated_field_size(attachment)
        + 512
    )
