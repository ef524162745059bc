"""PostgreSQL NOTIFY channels shared between services (the cross-service contract).

The SQL side is db/functions/notify.sql, the only place that sends: SQL calls
chat_notify_thread_event / chat_notify_membership, and so does Python (never
pg_notify). This module holds the channel names to LISTEN on and the payloads as
types; tests/db/test_notify.py checks both sides agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

_T = TypeVar("_T")

# "thread_id:position" after a thread's stream moved on (a message created,
# edited or deleted, an attachment added, messages removed): ThreadEvent.
THREAD_EVENTS = "chat_thread_events"


@dataclass(frozen=True, slots=True)
class ThreadEvent:
    """A payload of THREAD_EVENTS (chat_notify_thread_event)."""

    thread_id: UUID
    position: int
    # The W3C traceparent of the write that caused it, when tracing was on.
    traceparent: str | None = None


def parse_thread_event(payload: object) -> ThreadEvent:
    """Raises ValueError for anything chat_notify_thread_event does not send."""
    thread, sep, rest = str(payload).partition(":")
    if not sep:
        raise ValueError(f"not a thread event: {payload!r}")
    position, _, traceparent = rest.partition(":")
    return ThreadEvent(UUID(thread), int(position), traceparent or None)


# {"thread_id": ..., "user_id": ... | null} after a participant leaves, a thread is
# deleted or archived (flag or `db archive`); {"thread_id": null, "user_id": ...}
# after a user is deactivated or deleted: MembershipChange. A hint only: the stream
# hub re-checks the named subscriptions against the database, which decides how
# they end.
MEMBERSHIP = "chat_membership"


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """A payload of MEMBERSHIP (chat_notify_membership); None means "any"."""

    thread_id: UUID | None
    user_id: UUID | None


def parse_membership_change(payload: object) -> MembershipChange:
    """Raises ValueError for anything chat_notify_membership does not send."""
    return _parse_json(payload, "a membership change", _membership_change)


# The user streams' log reached a position (chat_notify_log, sent by the
# sequencer after it numbered committed events): the position as text.
LOG = "chat_log"


def parse_log_position(payload: object) -> int:
    """Raises ValueError for anything chat_notify_log does not send."""
    return int(str(payload))


# A participant is typing (chat_notify_typing): Typing. Never stored.
TYPING = "chat_typing"


@dataclass(frozen=True, slots=True)
class Typing:
    """A payload of TYPING (chat_notify_typing)."""

    thread_id: UUID
    user_id: UUID
    expire_time: datetime


def parse_typing(payload: object) -> Typing:
    """Raises ValueError for anything chat_notify_typing does not send."""
    return _parse_json(payload, "a typing notification", _typing)


def _parse_json(payload: object, what: str, build: Callable[[Any], _T]) -> _T:
    """`build` applied to the JSON object in `payload`. A field missing or of the
    wrong type (KeyError, TypeError, AttributeError in `build`) is, like text
    that is not JSON, a ValueError: the one error a payload parser raises."""
    try:
        return build(json.loads(str(payload)))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not {what}: {payload!r}") from exc


def _membership_change(change: Any) -> MembershipChange:
    return MembershipChange(
        _uuid_or_any(change.get("thread_id")), _uuid_or_any(change.get("user_id"))
    )


def _uuid_or_any(value: Any) -> UUID | None:
    """A membership change's id; null (or absent) means "any"."""
    return UUID(value) if value else None


def _typing(typing: Any) -> Typing:
    return Typing(
        UUID(typing["thread_id"]),
        UUID(typing["user_id"]),
        datetime.fromisoformat(typing["expire_time"]),
    )
