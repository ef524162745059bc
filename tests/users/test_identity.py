# ruff: noqa: RUF001  (look-alike characters are what this file is about)
"""One identity per person (issue 14): look-alike emails and usernames, and names.

Identity form: NFKC, which must then be ASCII; compared ignoring ASCII case. So a
compatibility variant (KELVIN SIGN, fullwidth, mathematical, ligature) IS the
ASCII identity (ALREADY_EXISTS beside it, LookupUser finds it), and anything NFKC
leaves non-ASCII (other scripts' look-alikes, İ, ß) is INVALID_ARGUMENT. Every
name field refuses control, format (zero-width, bidi) and similar characters.

The generated sets are checked at the validation functions for every code point
(about 1.1 million, a few seconds) and through real RPCs for samples of dozens.
"""

from __future__ import annotations

import string
import sys
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from chat.v1 import (
    messages_pb2,
    messages_pb2_grpc,
    threads_pb2,
    threads_pb2_grpc,
    users_pb2,
)
from google.protobuf import field_mask_pb2

from services.common.settings import ServiceSettings
from services.common.validation import (
    BLANK_NAME_CHARACTERS,
    Violations,
    refused_name_character,
)
from services.messages.service import DEFINITION as MESSAGES
from services.threads.service import DEFINITION as THREADS
from services.users.validation import check_email, check_username
from tests.conftest import running
from tests.rpc_errors import error_of, violated_fields

if TYPE_CHECKING:
    from chat.v1 import users_pb2_grpc

    Stub = users_pb2_grpc.UsersServiceAsyncStub

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXISTS = grpc.StatusCode.ALREADY_EXISTS

KELVIN = "\u212a"  # KELVIN SIGN, displays as "K"

# Well-known cross-script homoglyphs of ASCII letters (and the letter each
# imitates): NFKC keeps every one of them, so each must be refused.
HOMOGLYPHS = {
    # Cyrillic small
    "\u0430": "a", "\u0435": "e", "\u043e": "o", "\u0440": "p", "\u0441": "c",
    "\u0443": "y", "\u0445": "x", "\u0456": "i", "\u0458": "j", "\u0455": "s",
    "\u0501": "d", "\u051b": "q", "\u051d": "w", "\u04bb": "h", "\u04cf": "l",
    # Cyrillic capital
    "\u0410": "A", "\u0412": "B", "\u0415": "E", "\u041a": "K", "\u041c": "M",
    "\u041d": "H", "\u041e": "O", "\u0420": "P", "\u0421": "C", "\u0422": "T",
    "\u0425": "X", "\u0405": "S", "\u0406": "I", "\u0408": "J", "\u04ae": "Y",
    # Greek
    "\u03bf": "o", "\u03bd": "v", "\u03b1": "a", "\u03b9": "i", "\u03ba": "k",
    "\u03c1": "p", "\u03c4": "t", "\u03c5": "u", "\u0391": "A", "\u0392": "B",
    "\u0395": "E", "\u0396": "Z", "\u0397": "H", "\u0399": "I", "\u039a": "K",
    "\u039c": "M", "\u039d": "N", "\u039f": "O", "\u03a1": "P", "\u03a4": "T",
    "\u03a5": "Y", "\u03a7": "X",
    # Armenian, Cherokee, Latin extensions and IPA
    "\u0585": "o", "\u057d": "u", "\u13aa": "A", "\u13ac": "E", "\u13bb": "H",
    "\u13a2": "T", "\u0131": "i", "\u0251": "a", "\u0261": "g", "\u028f": "y",
    "\u1d0f": "o", "\u01c0": "l",
    # Case folding's own traps: dotted capital I, sharp s, Angstrom sign
    "\u0130": "I", "\u00df": "ss", "\u1e9e": "SS", "\u212b": "A",
}  # fmt: skip

# Characters every name field refuses: the list, then one of each
# refused category and a noncharacter.
BAD_NAME_PARTS = {
    "BEL": "\a",
    "ANSI red (ESC[31m)": "\x1b[31m",
    "RIGHT-TO-LEFT OVERRIDE": "\u202e",
    "ZERO WIDTH SPACE": "\u200b",
    "LEFT-TO-RIGHT ISOLATE": "\u2066",
    "BOM": "\ufeff",
    "DEL": "\x7f",
    "C1 CSI": "\x9b",
    "ZERO WIDTH JOINER": "\u200d",
    "RIGHT-TO-LEFT MARK": "\u200f",
    "POP DIRECTIONAL ISOLATE": "\u2069",
    "LINE SEPARATOR": "\u2028",
    "PARAGRAPH SEPARATOR": "\u2029",
    "private use": "\ue000",
    "TAG LATIN CAPITAL LETTER A": "\U000e0041",
    "noncharacter U+FFFF": "\uffff",
    "noncharacter U+10FFFF": "\U0010ffff",
    "newline": "\n",
}
GOOD_NAMES = [
    "Zoë",
    "José",
    "李小龙",
    "Ольга",
    "محمد",
    "Ἀθηνᾶ",
    "e\u0301mile",
    "🙂 Smile",
    "O'Brien",
]

USERNAME_CHARS = frozenset(string.ascii_letters + string.digits + "_.-")
ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-")


def every_code_point() -> range:
    return range(sys.maxunicode + 1)


def to_ascii_variants() -> dict[str, str]:
    """Every non-ASCII code point whose NFKC form is one ASCII letter or digit."""
    found = {}
    for cp in range(0x80, sys.maxunicode + 1):
        char = chr(cp)
        normal = unicodedata.normalize("NFKC", char)
        if len(normal) == 1 and normal.isascii() and normal.isalnum():
            found[char] = normal
    return found


def spread(items: list[str], count: int) -> list[str]:
    """`count` items spread evenly over `items` (deterministic)."""
    step = max(1, len(items) // count)
    return items[::step][:count]


@dataclass
class Services:
    users: Stub
    threads: threads_pb2_grpc.ThreadsServiceAsyncStub
    messages: messages_pb2_grpc.MessagesServiceAsyncStub


@pytest.fixture
async def services(users: Stub, service_settings: ServiceSettings) -> AsyncIterator[Services]:
    async with (
        running(THREADS, service_settings) as (_, threads_channel),
        running(MESSAGES, service_settings) as (_, messages_channel),
    ):
        yield Services(
            users,
            threads_pb2_grpc.ThreadsServiceStub(threads_channel),
            messages_pb2_grpc.MessagesServiceStub(messages_channel),
        )


async def create(
    users: Stub,
    username: str,
    email: str | None = None,
    *,
    first_name: str = "",
    last_name: str = "",
) -> users_pb2.User:
    user = users_pb2.User(
        username=username,
        email=email or f"{username}@example.com",
        first_name=first_name,
        last_name=last_name,
    )
    return (await users.CreateUser(users_pb2.CreateUserRequest(user=user))).user


async def lookup(users: Stub, **key: str) -> users_pb2.User:
    return (await users.LookupUser(users_pb2.LookupUserRequest(**key))).user


async def count_users(db_pool: asyncpg.Pool) -> int:
    return int(await db_pool.fetchval("SELECT count(*) FROM users"))


# --- the cases, over gRPC ---------------------------------------------------


async def test_kelvin_sign_is_the_same_identity_as_k(users: Stub, db_pool: asyncpg.Pool) -> None:
    kate = await create(users, "kate", "kate@example.com")
    err = await error_of(create(users, "mallory", f"{KELVIN}ate@example.com"))
    assert err.code() == EXISTS and violated_fields(err) == {"email"}
    err = await error_of(create(users, f"{KELVIN}ate", "mallory@example.com"))
    assert err.code() == EXISTS and violated_fields(err) == {"username"}
    # Every spelling finds the real Kate: one identity.
    for key in ({"email": "kate@example.com"}, {"email": f"{KELVIN}ate@example.com"}):
        assert (await lookup(users, **key)).id == kate.id
    assert (await lookup(users, username=f"{KELVIN}ATE")).id == kate.id
    assert await count_users(db_pool) == 1


async def test_kelvin_sign_first_is_stored_in_ascii(users: Stub, db_pool: asyncpg.Pool) -> None:
    # Registered first, the KELVIN spelling does not squat a look-alike: it is
    # the ASCII address itself, stored as such, and the lookup says who holds it.
    first = await create(users, f"{KELVIN}ate", f"{KELVIN}ate@example.com")
    assert (first.email, first.username) == ("Kate@example.com", "Kate")
    stored = await db_pool.fetchrow("SELECT email, username FROM users WHERE id = $1", first.id)
    assert stored is not None and tuple(stored) == ("Kate@example.com", "Kate")
    err = await error_of(create(users, "kate", "kate@example.com"))
    assert err.code() == EXISTS
    assert (await lookup(users, email="kate@example.com")).id == first.id


async def test_dotted_i_and_sharp_s_are_refused(users: Stub, db_pool: asyncpg.Pool) -> None:
    info = await create(users, "info", "info@example.com")
    for email in ("\u0130nfo@example.com", "info@exam\u0131ple.com", "straße@example.com"):
        err = await error_of(create(users, "someone", email))
        assert err.code() == INVALID and violated_fields(err) == {"user.email"}, email
        err = await error_of(users.LookupUser(users_pb2.LookupUserRequest(email=email)))
        assert err.code() == INVALID and violated_fields(err) == {"email"}, email
    for name in ("\u0130nfo", "straße", "stra\u1e9ee"):
        err = await error_of(create(users, name, "x@example.com"))
        assert err.code() == INVALID and violated_fields(err) == {"user.username"}, name
    # STRASSE is plain ASCII and its own identity; it registers once.
    strasse = await create(users, "STRASSE", "STRASSE@example.com")
    err = await error_of(create(users, "strasse", "strasse@example.com"))
    assert err.code() == EXISTS
    assert (await lookup(users, email="info@example.com")).id == info.id
    assert (await lookup(users, username="strasse")).id == strasse.id
    assert await count_users(db_pool) == 2


async def test_update_user_takes_the_same_form(users: Stub) -> None:
    await create(users, "kate", "kate@example.com")
    bob = await create(users, "bob", "bob@example.com")

    def update(**fields: str) -> users_pb2.UpdateUserRequest:
        user = users_pb2.User(id=bob.id)
        for field, value in fields.items():
            setattr(user, field, value)
        return users_pb2.UpdateUserRequest(
            user=user, update_mask=field_mask_pb2.FieldMask(paths=list(fields))
        )

    err = await error_of(users.UpdateUser(update(email="\uff4bate@example.com")))  # fullwidth k
    assert err.code() == EXISTS and violated_fields(err) == {"email"}
    err = await error_of(users.UpdateUser(update(username=f"{KELVIN}ATE")))
    assert err.code() == EXISTS and violated_fields(err) == {"username"}
    err = await error_of(
        users.UpdateUser(update(email="b\u043eb@example.com", username="b\u03bfb"))
    )
    assert err.code() == INVALID
    assert violated_fields(err) == {"user.email", "user.username"}
    renamed = await users.UpdateUser(update(email="\U0001d41b\U0001d428\U0001d41b@example.com"))
    assert renamed.user.email == "bob@example.com"  # mathematical bold, stored in ASCII
    ligature = await users.UpdateUser(update(username="bob_\ufb00"))  # ff ligature
    assert ligature.user.username == "bob_ff"


# --- generated confusables ------------------------------------------------------------


def test_every_code_point_in_a_username_is_ascii_after_nfkc_or_refused() -> None:
    accepted = refused = 0
    for cp in every_code_point():
        char = chr(cp)
        violations = Violations()
        got = check_username(violations, f"ab{char}cd")
        normal = unicodedata.normalize("NFKC", char)
        if normal and set(normal) <= USERNAME_CHARS:
            # The same identity as its ASCII spelling: stored as that, so it collides.
            assert got == f"ab{normal}cd" and not violations, hex(cp)
            accepted += 1
        else:
            assert got is None and violations, hex(cp)
            refused += 1
    assert accepted == 1_224 + 65  # 65 ASCII: letters, digits, '_', '.', '-'
    assert refused == sys.maxunicode + 1 - accepted


def test_every_code_point_in_an_email_is_ascii_after_nfkc_or_refused() -> None:
    accepted = refused = 0
    for cp in every_code_point():
        char = chr(cp)
        violations = Violations()
        got = check_email(violations, f"ab{char}cd@example.com")
        normal = unicodedata.normalize("NFKC", char)
        local = f"ab{normal}cd"
        if normal and set(normal) <= ATEXT | {"."} and ".." not in local:
            assert got == f"{local}@example.com" and not violations, hex(cp)
            accepted += 1
        else:
            assert got is None and violations, hex(cp)
            refused += 1
    assert accepted > 1_224 + 65
    assert refused > 1_100_000


def test_case_folding_traps_are_refused() -> None:
    """Code points whose casefold or lower is ASCII while NFKC is not (ß, ẞ), İ."""
    traps = [
        chr(cp)
        for cp in range(0x80, sys.maxunicode + 1)
        if not unicodedata.normalize("NFKC", chr(cp)).isascii()
        and (chr(cp).casefold().isascii() or chr(cp).lower().isascii())
    ]
    assert traps == ["\u00df", "\u1e9e"]
    for char in [*traps, "\u0130"]:
        for check, value in ((check_username, f"stra{char}e"), (check_email, f"{char}@x.io")):
            violations = Violations()
            assert check(violations, value) is None and violations


def test_homoglyphs_are_refused_by_the_validation() -> None:
    for glyph, letter in HOMOGLYPHS.items():
        for check, value in ((check_username, f"p{glyph}ypal"), (check_email, f"{glyph}@x.io")):
            violations = Violations()
            assert check(violations, value) is None, (glyph, letter)
        assert unicodedata.normalize("NFKC", glyph) != letter


async def test_sampled_variants_collide_with_the_ascii_account(users: Stub) -> None:
    variants = to_ascii_variants()
    assert len(variants) == 998  # every code point NFKC turns into one ASCII letter/digit
    assert {KELVIN, "\uff2b", "\U0001d40a", "\u24c0"} <= variants.keys()
    sample = spread(sorted(variants), 48)
    for i, char in enumerate(sample):
        letter = variants[char]
        real = await create(users, f"t{i}{letter}z", f"t{i}{letter}z@example.com")
        err = await error_of(create(users, f"t{i}{char}z", f"other{i}@example.com"))
        assert err.code() == EXISTS and violated_fields(err) == {"username"}, hex(ord(char))
        err = await error_of(create(users, f"other{i}", f"t{i}{char}z@example.com"))
        assert err.code() == EXISTS and violated_fields(err) == {"email"}, hex(ord(char))
        assert (await lookup(users, username=f"t{i}{char}z")).id == real.id
        assert (await lookup(users, email=f"T{i}{char}Z@example.com")).id == real.id


async def test_homoglyphs_are_refused_over_rpc(users: Stub, db_pool: asyncpg.Pool) -> None:
    await create(users, "paypal", "paypal@example.com")
    for glyph in HOMOGLYPHS:
        err = await error_of(create(users, f"p{glyph}ypal", f"p{glyph}ypal@example.com"))
        assert err.code() == INVALID, hex(ord(glyph))
        assert violated_fields(err) == {"user.email", "user.username"}, hex(ord(glyph))
        err = await error_of(
            users.LookupUser(users_pb2.LookupUserRequest(username=f"p{glyph}ypal"))
        )
        assert err.code() == INVALID and violated_fields(err) == {"username"}
    assert await count_users(db_pool) == 1


# --- ListUsers: the query is lowered by PostgreSQL, like the indexes ----------------

SEARCH_NAMES = [
    ("ilker", "İlker", "Yıldız"),
    ("ilgaz", "ılgaz", "IŞIK"),
    ("ilse", "Ilse", "Straße"),
    ("ilona", "ilona", "STRASSE"),
    ("asa", "Äsa", "äsa"),
    ("sofia", "Σοφία", "ΣΟΦΊΑ"),
    ("dzemal", "ǅemal", "ǆ"),
    ("fiona", "ﬁona", "Ｋａｔｅ"),
    ("smile", "🙂smile", "東京"),
    ("kate", "Kate", "\U00020000plane2"),
]
QUERIES = [
    "İ", "İL", "i̇", "I", "i", "ı", "IŞ", "ß", "STRA", "Straß", "ẞ", "Ä", "ä", "Σ", "σ", "ς",
    "ΣΟΦ", "ǅ", "ǆ", "Ǆ", "ﬁ", "fi", "Ｋ", "ｋａ", "K", f"{KELVIN}a", "🙂", "東", "\U00020000",
    "ka", "KATE@", "yıl", "ilk", "x",
]  # fmt: skip


async def test_list_users_prefix_search_matches_what_postgres_lowers(
    users: Stub, db_pool: asyncpg.Pool
) -> None:
    for username, first, last in SEARCH_NAMES:
        await create(users, username, first_name=first, last_name=last)
    found_any = 0
    for query in QUERIES:
        # The oracle: starts_with over the same lower(), no index, no range trick.
        expected = [
            r["username"]
            for r in await db_pool.fetch(
                """
                SELECT username FROM users
                WHERE starts_with(lower(username), lower($1))
                   OR starts_with(lower(email), lower($1))
                   OR starts_with(lower(first_name), lower($2))
                   OR starts_with(lower(last_name), lower($2))
                ORDER BY lower(username) USING ~<~
                """,
                unicodedata.normalize("NFKC", query),
                query,
            )
        ]
        got: list[str] = []
        token = ""
        while True:  # pages of 2 exercise the page token's position too
            reply = await users.ListUsers(
                users_pb2.ListUsersRequest(query=query, page_size=2, page_token=token)
            )
            got += [u.username for u in reply.users]
            token = reply.next_page_token
            if not token:
                break
        assert got == expected, query
        found_any += bool(got)
    assert found_any >= 25
    # The case: a name starting with İ is found by a query starting with İ.
    reply = await users.ListUsers(users_pb2.ListUsersRequest(query="İ"))
    assert "ilker" in {u.username for u in reply.users}
    # A compatibility spelling finds the identity it stands for (kate, as LookupUser
    # does) and the names written in it (fiona's last name is fullwidth).
    reply = await users.ListUsers(users_pb2.ListUsersRequest(query="\uff4b\uff41\uff54"))
    assert [u.username for u in reply.users] == ["fiona", "kate"]


# --- names: control, format and bidi characters -----------------------------------


def test_refused_name_characters_are_exactly_the_categories() -> None:
    refused = 0
    for cp in every_code_point():
        char = chr(cp)
        category = unicodedata.category(char)
        noncharacter = 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE
        blank = char in BLANK_NAME_CHARACTERS
        expected = category in {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"} or noncharacter or blank
        assert (refused_name_character(f"a{char}b") is not None) == expected, hex(cp)
        refused += expected
    assert refused == 65 + 163 + 2_048 + 137_468 + 1 + 1 + 66 + len(BLANK_NAME_CHARACTERS)


# Names a reader sees as empty, though no character is in a refused category.
INVISIBLE_NAMES = {
    "spaces": "   ",
    "no-break spaces": "\u00a0\u00a0",
    "ideographic space": "\u3000",
    "em spaces": "\u2003\u2003",
    "combining marks only": "\u0301" * 99,
    "variation selector only": "\ufe0f",
    "HANGUL FILLER": "\u3164",
    "HALFWIDTH HANGUL FILLER": "\uffa0",
    "HANGUL CHOSEONG FILLER": "\u115f",
    "BRAILLE PATTERN BLANK": "\u2800",
    "COMBINING GRAPHEME JOINER": "\u034f",
    "filler between spaces": " \u3164 ",
}


def test_names_a_reader_sees_as_empty_are_refused() -> None:
    for label, name in INVISIBLE_NAMES.items():
        violations = Violations()
        assert not violations.check_name(name, "name", max_len=255), label
    for name in [*GOOD_NAMES, "❤️ Ann", "Ann 👩", "١٢٣", "-"]:
        violations = Violations()
        assert violations.check_name(name, "name", max_len=255), name


async def test_names_refuse_control_format_and_bidi_characters(
    services: Services, db_pool: asyncpg.Pool
) -> None:
    users, threads, messages = services.users, services.threads, services.messages
    owner = await create(users, "owner")
    thread = (
        await threads.CreateThread(threads_pb2.CreateThreadRequest(name="t", creator_id=owner.id))
    ).thread
    sent = (
        await messages.SendMessage(
            messages_pb2.SendMessageRequest(thread_id=thread.id, user_id=owner.id, content="hi")
        )
    ).message

    def attachment(name: str) -> messages_pb2.Attachment:
        return messages_pb2.Attachment(
            url="https://files.example.com/a", type="text/plain", name=name, size=1
        )

    refused = 0
    for label, bad in BAD_NAME_PARTS.items():
        name = f"Ev{bad}il"
        user = users_pb2.User(
            username=f"user{refused}", email=f"user{refused}@x.io", first_name=name, last_name=name
        )
        err = await error_of(users.CreateUser(users_pb2.CreateUserRequest(user=user)))
        assert err.code() == INVALID, label
        assert violated_fields(err) == {"user.first_name", "user.last_name"}, label
        for field in ("first_name", "last_name"):
            changed = users_pb2.User(id=owner.id)
            setattr(changed, field, name)
            err = await error_of(
                users.UpdateUser(
                    users_pb2.UpdateUserRequest(
                        user=changed, update_mask=field_mask_pb2.FieldMask(paths=[field])
                    )
                )
            )
            assert err.code() == INVALID and violated_fields(err) == {f"user.{field}"}, label
        err = await error_of(
            threads.CreateThread(threads_pb2.CreateThreadRequest(name=name, creator_id=owner.id))
        )
        assert err.code() == INVALID and violated_fields(err) == {"name"}, label
        err = await error_of(
            threads.UpdateThread(
                threads_pb2.UpdateThreadRequest(
                    thread=threads_pb2.Thread(id=thread.id, name=name),
                    update_mask=field_mask_pb2.FieldMask(paths=["name"]),
                )
            )
        )
        assert err.code() == INVALID and violated_fields(err) == {"thread.name"}, label
        err = await error_of(
            messages.SendMessage(
                messages_pb2.SendMessageRequest(
                    thread_id=thread.id,
                    user_id=owner.id,
                    content="file",
                    attachments=[attachment("ok.txt"), attachment(f"{name}.txt")],
                )
            )
        )
        assert err.code() == INVALID and violated_fields(err) == {"attachments[1].name"}, label
        err = await error_of(
            messages.AddAttachment(
                messages_pb2.AddAttachmentRequest(
                    message_id=sent.id, attachment=attachment(f"{name}.txt")
                )
            )
        )
        assert err.code() == INVALID and violated_fields(err) == {"attachment.name"}, label
        refused += 1
    assert refused == len(BAD_NAME_PARTS)
    # Nothing was written by any refused call.
    assert await count_users(db_pool) == 1
    assert await db_pool.fetchval("SELECT count(*) FROM threads") == 1
    assert await db_pool.fetchval("SELECT count(*) FROM messages") == 1
    assert await db_pool.fetchval("SELECT count(*) FROM message_attachments") == 0
    assert await db_pool.fetchval("SELECT name FROM threads") == "t"
    assert await db_pool.fetchval("SELECT first_name FROM users") is None

    # Names in any script, with combining marks, emoji and apostrophes, are kept as given.
    for i, name in enumerate(GOOD_NAMES):
        user = await create(users, f"good{i}", first_name=name, last_name=name)
        assert (user.first_name, user.last_name) == (name, name)
        renamed = await threads.UpdateThread(
            threads_pb2.UpdateThreadRequest(
                thread=threads_pb2.Thread(id=thread.id, name=name),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            )
        )
        assert renamed.thread.name == name
        added = await messages.AddAttachment(
            messages_pb2.AddAttachmentRequest(message_id=sent.id, attachment=attachment(name))
        )
        assert added.attachment.name == name


async def test_invisible_names_and_control_characters_in_media_types_are_refused(
    services: Services, db_pool: asyncpg.Pool
) -> None:
    users, threads, messages = services.users, services.threads, services.messages
    owner = await create(users, "owner")
    err = await error_of(
        users.CreateUser(
            users_pb2.CreateUserRequest(
                user=users_pb2.User(username="blank", email="blank@x.io", first_name="\u3164")
            )
        )
    )
    assert err.code() == INVALID and violated_fields(err) == {"user.first_name"}
    err = await error_of(
        threads.CreateThread(threads_pb2.CreateThreadRequest(name="   ", creator_id=owner.id))
    )
    assert err.code() == INVALID and violated_fields(err) == {"name"}
    thread = (
        await threads.CreateThread(threads_pb2.CreateThreadRequest(name="t", creator_id=owner.id))
    ).thread

    def send(media_type: str) -> Any:
        return messages.SendMessage(
            messages_pb2.SendMessageRequest(
                thread_id=thread.id,
                user_id=owner.id,
                content="file",
                attachments=[
                    messages_pb2.Attachment(
                        url="https://x.io/a", type=media_type, name="a.txt", size=1
                    )
                ],
            )
        )

    for bad in ["text/plain\x1b[31m", "text/\u202eexe", "\x07", " text", "text/plain\n", "тext"]:
        err = await error_of(send(bad))
        assert err.code() == INVALID and violated_fields(err) == {"attachments[0].type"}, bad
    assert await db_pool.fetchval("SELECT count(*) FROM messages") == 0
    for good in ["image/png", "text/plain; charset=utf-8", "file", "t"]:
        await send(good)


def test_the_shortest_length_is_checked_on_the_identity_form() -> None:
    """ "㎒" is one character but the username MHz: the minimum applies after NFKC."""
    violations = Violations()
    assert check_username(violations, "\u3392") == "MHz"
    assert check_username(violations, "\uff4d\uff48") is None  # fullwidth "mh": 2 characters
