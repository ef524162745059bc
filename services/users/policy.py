"""Who may do what in UsersService: every permission decision of the service.

Invariant: a call acting for a user (x-user-id) changes only that same user:
UpdateUser, DeleteUser and RecordLogin name the caller or are PERMISSION_DENIED.
Reads (GetUser, LookupUser, BatchGetUsers, ListUsers) and CreateUser are open to
every caller. A deactivated user logs in to nothing: RecordLogin of an inactive
user is PERMISSION_DENIED `USER_INACTIVE`, the answer an inactive user gets
when it acts on any RPC. Trusted calls (no x-user-id) may do everything else.
The servicer makes no permission decision of its own.
"""

from __future__ import annotations

from uuid import UUID

from services.common.identity import Caller, require_self_or_trusted, user_inactive
from services.users.store import UserRow


def may_change(caller: Caller, user_id: UUID) -> None:
    """Update, delete or record a login: the user themselves, or a trusted call."""
    require_self_or_trusted(caller, user_id, "a user may only change their own account")


def logged_in(user: UserRow | None, user_id: UUID) -> UserRow:
    """The user RecordLogin recorded; None means they are inactive, so refused."""
    if user is None:
        raise user_inactive(user_id, "the user is inactive and cannot log in")
    return user
