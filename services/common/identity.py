"""Who a call acts for.

Metadata `x-user-id` names the end user a call acts for; without it the call is a
trusted service call that may do everything. (Which *service* is calling is
authenticated separately by the bearer token, see interceptors.py.)

The header is parsed once per call, by the interceptor (`parse_caller`), which
carries the result in a context variable for the rest of the call
(`bound_caller`); handlers read it with `caller_of(context)`. grpc.aio runs each
RPC in a task of its own, so the variable never leaks from one call to another.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from services.common.errors import InvalidArgument, PermissionDenied
from services.common.statement_names import named
from services.common.types import Context

USER_ID_HEADER = "x-user-id"

ACTIVE_CALLER = named("identity.active_caller", "SELECT is_active FROM users WHERE id = $1")


@dataclass(frozen=True)
class Caller:
    user_id: UUID | None

    @property
    def trusted(self) -> bool:
        """A service acting on its own authority, not on behalf of one user."""
        return self.user_id is None

    def is_user(self, user_id: UUID) -> bool:
        return self.user_id == user_id


def require_self_or_trusted(caller: Caller, user_id: UUID, refusal: str) -> None:
    """The one rule, in every service, for what belongs to a user (their account,
    inbox, read state, sends, messages, stream): a user acts only as themselves, a
    trusted call as anyone. Anyone else is PERMISSION_DENIED `refusal`."""
    if not caller.trusted and not caller.is_user(user_id):
        raise PermissionDenied(refusal)


def metadata_values(context: Context, key: str) -> list[str]:
    """Every value sent for `key` (a header may be repeated)."""
    return [
        value if isinstance(value, str) else value.decode()
        for item_key, value in context.invocation_metadata() or ()
        if item_key == key
    ]


def parse_caller(context: Context) -> Caller:
    """Who the call acts for, read from its metadata; an ambiguous identity is refused,
    never read as trusted.

    No header: a trusted call. An empty header, or the header twice (even with one
    value), is INVALID_ARGUMENT naming it: a proxy that blanks or appends the
    header must not turn a user's call into a trusted one, or pick one of two.
    """
    values = metadata_values(context, USER_ID_HEADER)
    if not values:
        return Caller(user_id=None)
    if len(values) > 1:
        raise InvalidArgument.field(USER_ID_HEADER, "must be sent at most once")
    if values[0] == "":
        raise InvalidArgument.field(
            USER_ID_HEADER, "must be a user's UUID (omit it for a trusted call)"
        )
    try:
        return Caller(user_id=UUID(values[0]))
    except ValueError:
        raise InvalidArgument.field(USER_ID_HEADER, "must be a UUID") from None


_CALLER: ContextVar[Caller | None] = ContextVar("chat_caller", default=None)


@contextmanager
def bound_caller(caller: Caller) -> Iterator[Caller]:
    """Make `caller` the current call's caller until the block ends (the interceptor)."""
    token = _CALLER.set(caller)
    try:
        yield caller
    finally:
        _CALLER.reset(token)


def caller_of(context: Context) -> Caller:
    """The caller the interceptor parsed for this call.

    A handler run without the interceptor (none is, in the services) gets the
    header parsed here, by the same rules: never a trusted call by default.
    """
    caller = _CALLER.get()
    return parse_caller(context) if caller is None else caller


async def require_active_caller(pool: asyncpg.Pool, caller: Caller) -> None:
    """A call made for an end user needs that user to exist and be active.

    A deactivated (or deleted) account acts on nothing, on any service: one
    primary-key lookup per user-scoped call, so deactivation takes effect at once
    (no cache that would let a deactivated user act for a while longer).
    """
    if caller.user_id is None:
        return
    active = await pool.fetchval(ACTIVE_CALLER, caller.user_id)
    if active is None:
        raise PermissionDenied(
            f"{USER_ID_HEADER} names no user",
            reason="USER_UNKNOWN",
            metadata={"user_id": str(caller.user_id)},
        )
    if not active:
        raise user_inactive(caller.user_id)


def user_inactive(
    user_id: UUID, message: str = "the calling user is deactivated"
) -> PermissionDenied:
    """The error of a deactivated (or since deleted) user acting: calling, still
    streaming, sending or logging in. USER_INACTIVE is always PERMISSION_DENIED."""
    return PermissionDenied(
        message,
        reason="USER_INACTIVE",
        metadata={"user_id": str(user_id)},
    )
