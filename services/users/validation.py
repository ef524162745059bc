"""The users service's input rules; limits come from the spec's column sizes."""

from __future__ import annotations

import re
import unicodedata

from chat.v1 import users_pb2

from services.common.validation import Violations
from services.users.store import NewUser

EMAIL_MAX = 255
USERNAME_MIN, USERNAME_MAX = 3, 50
NAME_MAX = 100
PROFILE_IMAGE_MAX = 255
BATCH_GET_MAX = 1000
QUERY_MAX = 100

# Identity (see README.md, "One identity per person"): an email or username is
# taken through Unicode NFKC and must then be ASCII and match its pattern; two
# identities are the same when their NFKC forms are equal ignoring ASCII case,
# which the unique indexes on lower(...) decide. NFKC folds compatibility
# variants (KELVIN SIGN, fullwidth and mathematical letters, ligatures) into the
# letters they stand for, so they collide with the real account; what it leaves
# non-ASCII (other scripts' look-alikes, dotted capital I, sharp s) is refused.
#
# Matched with fullmatch: `$` would also match before a final newline, so
# "victim\n" would register beside "victim".
USERNAME = re.compile(r"[A-Za-z0-9_.-]+")
# RFC 5321 dot-atom local part (atext, no quoted strings), then a domain of DNS
# labels with at least one dot; all ASCII.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EMAIL = re.compile(rf"(?=[^@]{{1,64}}@){_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})+")


def identity_form(value: str) -> str:
    """The form an email or username is stored and compared in (before ASCII lower)."""
    return unicodedata.normalize("NFKC", value)


def _identity(
    violations: Violations,
    value: str,
    field: str,
    *,
    min_len: int,
    max_len: int,
    pattern: re.Pattern[str],
    rule: str,
) -> str | None:
    """`value` in identity form, or None after adding the violation.

    The longest allowed length is checked before normalising (NFKC never shortens
    a value that ends up ASCII, so a longer one is refused anyway, and the
    normalisation never sees an unbounded input) and both bounds after (it may
    lengthen: U+3392 is "MHz", so "㎒" is the username MHz).
    """
    if not value:
        violations.add(field, "is required")
        return None
    if not violations.check_length(value, field, max_len=max_len):
        return None
    normal = identity_form(value)
    if not normal.isascii():
        bad = next(c for c in normal if not c.isascii())
        violations.add(
            field,
            f"{rule}; after Unicode NFKC normalisation it must be ASCII, and "
            f"U+{ord(bad):04X} {unicodedata.name(bad, 'unnamed character')} is not "
            "(look-alike letters of other scripts are refused)",
        )
        return None
    if not violations.check_length(normal, field, min_len=min_len, max_len=max_len):
        return None
    if not pattern.fullmatch(normal):
        violations.add(field, rule)
        return None
    return normal


def check_email(violations: Violations, value: str, field: str = "user.email") -> str | None:
    """The email in identity form, or None (and a violation naming `field`)."""
    return _identity(
        violations,
        value,
        field,
        min_len=0,
        max_len=EMAIL_MAX,
        pattern=EMAIL,
        rule="must be an email address like name@example.com",
    )


def check_username(violations: Violations, value: str, field: str = "user.username") -> str | None:
    """The username in identity form, or None (and a violation naming `field`)."""
    return _identity(
        violations,
        value,
        field,
        min_len=USERNAME_MIN,
        max_len=USERNAME_MAX,
        pattern=USERNAME,
        rule="may contain only letters, digits, '_', '.' and '-'",
    )


def check_profile(violations: Violations, user: users_pb2.User, fields: set[str]) -> None:
    if "first_name" in fields:
        violations.check_name(user.first_name, "user.first_name", max_len=NAME_MAX)
    if "last_name" in fields:
        violations.check_name(user.last_name, "user.last_name", max_len=NAME_MAX)
    if "profile_image" in fields:
        violations.check_http_url(
            user.profile_image, "user.profile_image", max_len=PROFILE_IMAGE_MAX
        )


def new_user(user: users_pb2.User) -> NewUser:
    """A validated NewUser, or INVALID_ARGUMENT naming every bad field."""
    violations = Violations()
    email = check_email(violations, user.email)
    username = check_username(violations, user.username)
    check_profile(violations, user, {"first_name", "last_name", "profile_image"})
    violations.raise_if_any()
    assert email is not None and username is not None
    return NewUser(
        email=email,
        username=username,
        first_name=user.first_name or None,
        last_name=user.last_name or None,
        profile_image=user.profile_image or None,
    )
