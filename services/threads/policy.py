"""Who may do what in ThreadsService: every permission decision of the service.

Invariant: a call acting for a user (x-user-id) touches a thread only after
`visible_thread` found that user among its participants (to anyone else the
thread does not exist: NOT_FOUND), and changes it only as far as the user's role
allows:

- a user acts only as themselves: creates groups as the creator, opens direct
  threads they are one of, reads and marks their own inbox and read state;
- owners and admins manage a group (rename, archive, add participants, remove
  others, change roles); only an owner makes, unmakes or removes an owner, and
  only an owner deletes a thread; anyone may leave;
- the last active owner of a group can neither leave nor step down;
- a direct thread keeps exactly its two participants and no name;
- an archived thread is read-only: reads, MarkRead, unarchiving, leaving and
  deleting only (a trusted call may still remove participants from it).

Trusted calls (no x-user-id) may do everything the last three rules allow. The
servicer makes no permission decision of its own: it calls one of these before
the store, inside the transaction that then writes (locked reads are held there).
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from services.common.access import MANAGERS, Role, ThreadAccess, ThreadRow, visible_thread
from services.common.errors import FailedPrecondition, NotFound, PermissionDenied
from services.common.identity import Caller, require_self_or_trusted, user_inactive
from services.common.types import DbConnection
from services.threads import store


def acts_as(caller: Caller, user_id: UUID) -> None:
    """A user acts only on their own inbox and read state; trusted calls on anyone's."""
    require_self_or_trusted(
        caller, user_id, "a user may only act on their own inbox and read state"
    )


def may_create_group(caller: Caller, creator: UUID) -> None:
    require_self_or_trusted(caller, creator, "creator_id must be the calling user")


def may_open_direct(caller: Caller, user_ids: Sequence[UUID]) -> None:
    if not caller.trusted and caller.user_id not in user_ids:
        raise PermissionDenied("the calling user must be one of the two users")


async def readable(conn: DbConnection, caller: Caller, thread_id: UUID) -> ThreadAccess:
    """The thread, for reading it or its participants."""
    return await visible_thread(conn, caller, thread_id)


async def may_update_thread(
    conn: DbConnection, caller: Caller, thread_id: UUID, *, renames: bool, unarchives: bool
) -> ThreadAccess:
    """Renaming and (un)archiving: managers; a rename needs a group that is not
    archived, unless the same call unarchives it. Locks the thread."""
    access = await visible_thread(conn, caller, thread_id, lock=True)
    if not access.trusted and access.role not in MANAGERS:
        raise PermissionDenied("only owners and admins change a thread")
    if renames:
        _group_only(access.thread)
        if not unarchives:
            _not_archived(access.thread)
    return access


async def may_delete_thread(conn: DbConnection, caller: Caller, thread_id: UUID) -> None:
    """Only an owner deletes a thread (archived or not). Locks the thread."""
    access = await visible_thread(conn, caller, thread_id, lock=True)
    if not access.trusted and access.role != Role.OWNER:
        raise PermissionDenied("only an owner deletes a thread")


async def may_add_participants(
    conn: DbConnection, caller: Caller, thread_id: UUID, role: Role
) -> None:
    """Managers add to a group that is not archived; only an owner adds owners.
    Locks the thread (lock the users named first: the lock order)."""
    access = await visible_thread(conn, caller, thread_id, lock=True)
    _group_only(access.thread)
    _not_archived(access.thread)
    if not access.trusted:
        if access.role not in MANAGERS:
            raise PermissionDenied("only owners and admins add participants")
        if role == Role.OWNER and access.role != Role.OWNER:
            raise PermissionDenied("only an owner makes others owners")


async def may_remove_participant(
    conn: DbConnection, caller: Caller, thread_id: UUID, user_id: UUID
) -> None:
    """Anyone may leave; managers remove others (an owner only by an owner), not
    from an archived thread; never the last active owner. Locks the thread."""
    access = await visible_thread(conn, caller, thread_id, lock=True)
    target = await _participant(conn, thread_id, user_id)
    _group_only(access.thread)
    leaving = caller.is_user(user_id)
    if not leaving and not caller.trusted:
        _not_archived(access.thread)  # leaving stays possible; removing others does not
    if not access.trusted and not leaving:
        if access.role not in MANAGERS:
            raise PermissionDenied("only owners and admins remove others")
        if target == Role.OWNER and access.role != Role.OWNER:
            raise PermissionDenied("only an owner removes an owner")
    if target == Role.OWNER:
        await _not_last_owner(conn, thread_id, user_id, "the last active owner cannot leave")


async def may_set_role(
    conn: DbConnection, caller: Caller, thread_id: UUID, user_id: UUID, role: Role
) -> None:
    """Managers change roles in a group that is not archived; ownership is granted
    and revoked by owners only; the last active owner cannot step down. Locks the thread."""
    access = await visible_thread(conn, caller, thread_id, lock=True)
    target = await _participant(conn, thread_id, user_id)
    _group_only(access.thread)
    _not_archived(access.thread)
    if not access.trusted:
        if access.role not in MANAGERS:
            raise PermissionDenied("only owners and admins change roles")
        if Role.OWNER in (role, target) and access.role != Role.OWNER:
            raise PermissionDenied("only an owner grants or revokes ownership")
    if target == Role.OWNER and role != Role.OWNER:
        await _not_last_owner(conn, thread_id, user_id, "the last active owner cannot step down")


async def _participant(conn: DbConnection, thread_id: UUID, user_id: UUID) -> Role:
    """The role of the participant a call names; NOT_FOUND when it is none."""
    target = await store.membership(conn, thread_id, user_id)
    if target is None:
        raise NotFound("participant", f"{thread_id}/{user_id}")
    return Role(target.role)


async def _not_last_owner(conn: DbConnection, thread_id: UUID, user_id: UUID, what: str) -> None:
    """Checked under the thread's lock, so two owners leaving at once cannot both pass.
    Inactive owners manage nothing, so they do not count."""
    if await store.other_active_owners(conn, thread_id, user_id) == 0:
        raise FailedPrecondition(
            f"{what}: make another participant owner first",
            reason="LAST_OWNER",
            subject=f"thread/{thread_id}",
        )


def _group_only(thread: ThreadRow) -> None:
    if thread.is_direct:
        raise FailedPrecondition(
            "a direct thread always has exactly its two participants",
            reason="DIRECT_THREAD",
            subject=f"thread/{thread.id}",
        )


def _not_archived(thread: ThreadRow) -> None:
    """An archived thread is read-only (the messages service refuses sends, edits
    and attachments the same way) until it is unarchived."""
    if thread.is_archived:
        raise FailedPrecondition(
            "the thread is archived: unarchive it first",
            reason="THREAD_ARCHIVED",
            subject=f"thread/{thread.id}",
        )


async def may_type(conn: DbConnection, caller: Caller, thread_id: UUID, user_id: UUID) -> None:
    """Only a participant types, and not in an archived thread (NOT_FOUND to anyone
    who is not in it, as for reading)."""
    del caller  # checked by acts_as: the participation that counts is the typist's
    access = await visible_thread(conn, Caller(user_id), thread_id)
    if not await store.user_active(conn, user_id):  # a gateway may name anyone
        raise user_inactive(user_id, "the typing user is deactivated")
    if access.thread.is_archived:
        raise FailedPrecondition(
            "the thread is archived", reason="THREAD_ARCHIVED", subject=f"thread/{thread_id}"
        )
