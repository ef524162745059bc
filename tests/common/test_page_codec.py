"""The typed page token codec: byte-compatible with the tokens handed out before it,
typed positions checked on the way in, over-fetch and next token in one place."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from services.common.errors import InvalidArgument
from services.common.pagination import (
    ID,
    TIME_ID,
    PageCodec,
    PageKind,
    decode_page_token,
    encode_page_token,
    text,
)

AT = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
ID_1 = uuid.UUID("6f1c1d1e-0000-4000-8000-000000000001")


def test_tokens_are_the_ones_handed_out_before() -> None:
    """Tokens already held by clients stay valid: the same bytes, both ways."""
    params = {"user": str(ID_1), "archived": False}
    inbox = PageCodec(PageKind.INBOX, TIME_ID)
    legacy = encode_page_token("inbox", params, [AT.isoformat(), str(ID_1)])
    assert inbox.encode((AT, ID_1), params) == legacy
    assert inbox.decode(legacy, params) == (AT, ID_1)
    users = PageCodec(PageKind.USERS, text(200))
    assert users.encode("kate", {"q": ""}) == encode_page_token("users", {"q": ""}, ["kate"])
    participants = PageCodec(PageKind.PARTICIPANTS, ID)
    token = encode_page_token("participants", {"thread": "t"}, [str(ID_1)])
    assert participants.decode(token, {"thread": "t"}) == ID_1
    assert decode_page_token(
        participants.encode(ID_1, {"thread": "t"}), "participants", {"thread": "t"}
    ) == [str(ID_1)]


def test_kinds_and_positions_are_checked() -> None:
    params = {"thread": "t"}
    history = PageCodec(PageKind.HISTORY, TIME_ID)
    replies = PageCodec(PageKind.REPLIES, TIME_ID)
    token = history.encode((AT, ID_1), params)
    with pytest.raises(InvalidArgument):
        replies.decode(token, params)  # another method's token
    with pytest.raises(InvalidArgument):
        history.decode(token, {"thread": "u"})  # other parameters
    forged = encode_page_token("history", params, ["not a time", str(ID_1)])
    with pytest.raises(InvalidArgument) as caught:
        history.decode(forged, params)
    assert caught.value.violations[0].field == "page_token"
    assert history.decode("", params) is None


def test_a_page_over_fetches_one_row_and_tokens_the_last_served() -> None:
    codec = PageCodec(PageKind.PARTICIPANTS, ID)
    ids = sorted(uuid.uuid4() for _ in range(5))
    first = codec.page(3, "", {"thread": "t"})
    assert first.after is None and first.fetch == 4
    served, token = first.finish(ids[: first.fetch], lambda row: row)
    assert served == ids[:3]
    second = codec.page(3, token, {"thread": "t"})
    assert second.after == ids[2]
    served, token = second.finish(ids[3:], lambda row: row)
    assert served == ids[3:] and token == ""
