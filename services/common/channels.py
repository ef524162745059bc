"""PostgreSQL NOTIFY channels shared between services (the cross-service contract).

The SQL side is db/functions/notify.sql, the only place that sends: SQL calls
chat_notify_thread_event / chat_notify_membership, and so does Python (never
pg_notify). This module holds the channel names to LISTEN on and the payloads as
types; tests/db/test_notify.py checks both sides agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

# "thread_id:position" after a thread's stream moved on (a message created,
# edited or deleted, an attachment added, messages removed): ThreadEvent.
THREAD_EVENTS = "chat_thread_events"
# {"thread_id": ..., "user_id": ... | null} after a participant leaves, a thread is
# deleted or archived (flag or `db archive`); {"thread_id": null, "user_id": ...}
# after a user is deactivated or deleted: MembershipChange. A hint only: the stream
# hub re-checks the named subscriptions against the database, which decides how
# they end.
MEMBERSHIP = "chat_membership"


@dataclass(frozen=True, slots=True)
class ThreadEvent:
    """A payload of THREAD_EVENTS (chat_notify_thread_event)."""

    thread_id: UUID
    position: int
    # The W3C traceparent of the write that caused it, when tracing was on.
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """A payload of MEMBERSHIP (chat_notify_membership); None means "any"."""

    thread_id: UUID | None
    user_id: UUID | None


def parse_thread_event(payload: object) -> ThreadEvent:
    """Raises ValueError for anything chat_notify_thread_event does not send."""
    thread, sep, rest = str(payload).partition(":")
    if not sep:
        raise ValueError(f"not a thread event: {payload!r}")
    position, _, traceparent = rest.partition(":")
    return ThreadEvent(UUID(thread), int(position), traceparent or None)


def parse_membership_change(payload: object) -> MembershipChange:
    """Raises ValueError for anything chat_notify_membership does not send."""
    try:
        change = json.loads(str(payload))
        thread_id = UUID(change["thread_id"]) if change.get("thread_id") else None
        user_id = UUID(change["user_id"]) if change.get("user_id") else None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a membership change: {payload!r}") from exc
    return MembershipChange(thread_id, user_id)


# The user streams' log reached a position (chat_notify_log, sent by the
# sequencer after it numbered committed events): the position as text.
LOG = "chat_log"
# A participant is typing (chat_notify_typing): Typing. Never stored.
TYPING = "chat_typing"


@dataclass(frozen=True, slots=True)
class Typing:
    """A payload of TYPING (chat_notify_typing)."""

    thread_id: UUID
    user_id: UUID
    expire_time: datetime


def parse_log_position(payload: object) -> int:
    """Raises ValueError for anything chat_notify_log does not send."""
    return int(str(payload))


def parse_typing(payload: object) -> Typing:
    """Raises ValueError for anything chat_notify_typing does not send."""
    try:
        typing = json.loads(str(payload))
        return Typing(
            UUID(typing["thread_id"]),
            UUID(typing["user_id"]),
            datetime.fromisoformat(typing["expire_time"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a typing notification: {payload!r}") from exc
