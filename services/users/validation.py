"""The users service's input rules; limits come from the spec's column sizes."""

from __future__ import annotations

import re

from chat.v1 import users_pb2

from services.common.validation import Violations
from services.users.store import NewUser

EMAIL_MAX = 255
USERNAME_MIN, USERNAME_MAX = 3, 50
NAME_MAX = 100
PROFILE_IMAGE_MAX = 255
BATCH_GET_MAX = 1000
QUERY_MAX = 100

# Matched with fullmatch: `$` would also match before a final newline, so
# "victim\n" would register beside "victim".
USERNAME = re.compile(r"[A-Za-z0-9_.-]+")
# local@domain with at least one dot in the domain, DNS labels, no whitespace.
EMAIL = re.compile(
    r"[^@\s]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)


def check_email(violations: Violations, value: str, field: str = "user.email") -> None:
    if not value:
        violations.add(field, "is required")
    elif violations.check_length(value, field, max_len=EMAIL_MAX) and not EMAIL.fullmatch(value):
        violations.add(field, "must be an email address like name@example.com")


def check_username(violations: Violations, value: str, field: str = "user.username") -> None:
    if not value:
        violations.add(field, "is required")
    elif violations.check_length(
        value, field, min_len=USERNAME_MIN, max_len=USERNAME_MAX
    ) and not USERNAME.fullmatch(value):
        violations.add(field, "may contain only letters, digits, '_', '.' and '-'")


def check_profile(violations: Violations, user: users_pb2.User, fields: set[str]) -> None:
    if "first_name" in fields:
        violations.check_length(user.first_name, "user.first_name", max_len=NAME_MAX)
    if "last_name" in fields:
        violations.check_length(user.last_name, "user.last_name", max_len=NAME_MAX)
    if "profile_image" in fields:
        violations.check_http_url(
            user.profile_image, "user.profile_image", max_len=PROFILE_IMAGE_MAX
        )


def new_user(user: users_pb2.User) -> NewUser:
    """A validated NewUser, or INVALID_ARGUMENT naming every bad field."""
    violations = Violations()
    check_email(violations, user.email)
    check_username(violations, user.username)
    check_profile(violations, user, {"first_name", "last_name", "profile_image"})
    violations.raise_if_any()
    return NewUser(
        email=user.email,
        username=user.username,
        first_name=user.first_name or None,
        last_name=user.last_name or None,
        profile_image=user.profile_image or None,
    )
