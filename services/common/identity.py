"""Who a call acts for.

Metadata `x-user-id` names the end user a call acts for; without it the call is a
trusted service call that may do everything. (Which *service* is calling is
authenticated separately by the bearer token, see interceptors.py.)
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from services.common.errors import InvalidArgument
from services.common.types import Context

USER_ID_HEADER = "x-user-id"


@dataclass(frozen=True)
class Caller:
    user_id: UUID | None

    @property
    def trusted(self) -> bool:
        """A service acting on its own authority, not on behalf of one user."""
        return self.user_id is None

    def is_user(self, user_id: UUID) -> bool:
        return self.user_id == user_id


def metadata_value(context: Context, key: str) -> str | None:
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            return value if isinstance(value, str) else value.decode()
    return None


def caller_of(context: Context) -> Caller:
    raw = metadata_value(context, USER_ID_HEADER)
    if raw is None or raw == "":
        return Caller(user_id=None)
    try:
        return Caller(user_id=UUID(raw))
    except ValueError:
        raise InvalidArgument.field(USER_ID_HEADER, "must be a UUID") from None
