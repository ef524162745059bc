"""What a user's stream shows of each log event: the one rule, for replay and live.

`UserView.show(event)` is called for every event of the log in position order
(a replay only passes the events of threads the user was or became a member
of); it keeps the user's threads as of that position and answers the response
to send, or None. Invariant: an event of a thread reaches the user only while
they are a member: from their `thread_joined` up to and including their
`thread_left`, never before or after (no history is given to joiners through
the stream; ListMessages serves it). Read marks reach only their owner.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any
from uuid import UUID

from chat.v1 import messages_pb2, threads_pb2

from services.common.access import ParticipantRow, ThreadRow
from services.common.convert import to_timestamp
from services.common.errors import InvalidArgument
from services.common.thread_protos import participant_to_proto, thread_to_proto
from services.messages.convert import message_to_proto
from services.messages.log_store import LogEvent
from services.messages.store import MessageRow, attachment_from_json

Response = messages_pb2.StreamUserEventsResponse

LEAVE_REASONS = {
    "removed": messages_pb2.LEAVE_REASON_REMOVED,
    "left": messages_pb2.LEAVE_REASON_LEFT,
    "thread_deleted": messages_pb2.LEAVE_REASON_THREAD_DELETED,
}
# Events logged before unread counts were exact (migration 0014) counted up to
# this and one more; newer ones say "exact" (db/functions/events.sql).
LEGACY_UNREAD_CAP = 100

# -- cursors -----------------------------------------------------------------
# A user stream's cursor is a position in the one log every user stream reads;
# it names no user (a position is not a secret) and never a thread's cursor.
_TAG = "u:"
MAX_POSITION = 2**63 - 1


def encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"{_TAG}{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str, field: str = "after") -> int:
    """The position in `cursor`; only the exact spelling this API hands out."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, digits = raw[: len(_TAG)], raw[len(_TAG) :]
        if tag != _TAG or not (digits.isascii() and digits.isdigit()):
            raise ValueError(raw)
        position = int(digits)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument.field(field, "is not a user stream cursor from this API") from None
    if position > MAX_POSITION or encode_cursor(position) != cursor:
        raise InvalidArgument.field(field, "is not a user stream cursor from this API")
    return position


# -- rows from the log's JSON ------------------------------------------------


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _uuid(value: str | None) -> UUID | None:
    return None if value is None else UUID(value)


def _message(value: dict[str, Any], redacted: bool) -> MessageRow:
    attachments = [attachment_from_json(a) for a in value.get("attachments") or ()]
    return MessageRow(
        id=UUID(value["id"]),
        thread_id=UUID(value["thread_id"]),
        user_id=UUID(value["user_id"]),
        content=value.get("content") or "",
        parent_id=_uuid(value.get("parent_id")),
        # A message deleted since is served as deleted (no content) wherever it shows.
        status="deleted" if redacted else value.get("status", "deleted"),
        metadata=value.get("metadata"),
        created_at=datetime.fromisoformat(value["created_at"]),
        updated_at=datetime.fromisoformat(value["updated_at"]),
        seq=int(value.get("seq") or 0),
        change_seq=int(value.get("change_seq") or 0),
        attachments=attachments,
    )


def _thread(value: dict[str, Any]) -> ThreadRow:
    return ThreadRow(
        id=UUID(value["id"]),
        name=value["name"],
        is_direct=value["is_direct"],
        is_archived=value["is_archived"],
        last_message_at=_time(value["last_message_at"]),
        created_at=datetime.fromisoformat(value["created_at"]),
        updated_at=datetime.fromisoformat(value["updated_at"]),
    )


def _participant(value: dict[str, Any]) -> threads_pb2.Participant:
    return participant_to_proto(
        ParticipantRow(
            thread_id=UUID(value["thread_id"]),
            user_id=UUID(value["user_id"]),
            role=value["role"],
            last_read_at=_time(value["last_read_at"]),
            created_at=datetime.fromisoformat(value["created_at"]),
        )
    )


# -- responses -----------------------------------------------------------------


def caught_up(position: int) -> Response:
    cursor = encode_cursor(position)
    return Response(cursor=cursor, caught_up=messages_pb2.CaughtUp(cursor=cursor))


def typing(thread_id: UUID, user_id: UUID, expire_time: datetime) -> Response:
    return Response(
        typing=messages_pb2.Typing(
            thread_id=str(thread_id), user_id=str(user_id), expire_time=to_timestamp(expire_time)
        )
    )


def _response(event: LogEvent, variant: str) -> Response:
    """The response for `event` as `variant` (the oneof field) shows it."""
    cursor = encode_cursor(event.position)
    payload = event.payload
    if variant.startswith("message_"):
        response = Response(cursor=cursor)
        message = getattr(response, variant)
        message.CopyFrom(message_to_proto(_message(payload["message"], event.redacted)))
        return response
    if variant == "thread_joined":
        joined = messages_pb2.ThreadJoined(
            thread=thread_to_proto(_thread(payload["thread"])),
            participant=_participant(payload["participant"]),
        )
        return Response(cursor=cursor, thread_joined=joined)
    if variant == "thread_left":
        left = messages_pb2.ThreadLeft(
            thread_id=str(event.thread_id), reason=LEAVE_REASONS[payload["reason"]]
        )
        return Response(cursor=cursor, thread_left=left)
    if variant == "thread_updated":
        return Response(cursor=cursor, thread_updated=thread_to_proto(_thread(payload["thread"])))
    if variant == "read_marked":
        participant = payload["participant"]
        unread = int(payload["unread"])
        capped = not payload.get("exact") and unread > LEGACY_UNREAD_CAP
        marked = messages_pb2.ReadMarked(
            thread_id=str(event.thread_id),
            last_read_at=to_timestamp(_time(participant["last_read_at"])),
            unread_count=min(unread, LEGACY_UNREAD_CAP) if capped else unread,
            unread_count_capped=capped,
        )
        return Response(cursor=cursor, read_marked=marked)
    # participant_added / participant_removed / participant_updated
    response = Response(cursor=cursor)
    getattr(response, variant).CopyFrom(_participant(payload["participant"]))
    return response


def variant_for(event: LogEvent, user_id: UUID, threads: set[UUID]) -> str | None:
    """Which event `user_id` (member of `threads` just before `event`) sees, if any;
    updates `threads` to just after it. The rule of the module docstring."""
    own = event.user_id == user_id
    if event.kind == "participant_joined" and own:
        threads.add(event.thread_id)
        return "thread_joined"
    if event.thread_id not in threads:
        return None
    if event.kind == "participant_left":
        if own:
            threads.discard(event.thread_id)
            return "thread_left"
        return "participant_removed"
    if event.kind == "participant_joined":
        return "participant_added"
    if event.kind == "read_marked":
        return "read_marked" if own else None
    return event.kind  # message_*, participant_updated, thread_updated


class Converted:
    """One event's responses, each variant converted and serialised once for all
    users (services/common/wire.py)."""

    def __init__(self, event: LogEvent) -> None:
        self.event = event
        self._payloads: dict[str, bytes] = {}

    def payload(self, variant: str) -> bytes:
        found = self._payloads.get(variant)
        if found is None:
            found = self._payloads[variant] = _response(self.event, variant).SerializeToString()
        return found
