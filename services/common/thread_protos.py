"""Thread and participant rows to protobuf messages, and roles between their two
spellings: the threads service serves them, and user streams (messages) carry them."""

from __future__ import annotations

from chat.v1 import threads_pb2

from services.common.access import ParticipantRow, ThreadRow
from services.common.convert import to_timestamp

ROLE_TO_PROTO = {
    "owner": threads_pb2.PARTICIPANT_ROLE_OWNER,
    "admin": threads_pb2.PARTICIPANT_ROLE_ADMIN,
    "member": threads_pb2.PARTICIPANT_ROLE_MEMBER,
}
ROLE_FROM_PROTO = {value: key for key, value in ROLE_TO_PROTO.items()}


def thread_to_proto(row: ThreadRow) -> threads_pb2.Thread:
    return threads_pb2.Thread(
        id=str(row.id),
        name=row.name or "",
        is_direct=row.is_direct,
        is_archived=row.is_archived,
        last_message_at=to_timestamp(row.last_message_at),
        created_at=to_timestamp(row.created_at),
        updated_at=to_timestamp(row.updated_at),
    )


def participant_to_proto(row: ParticipantRow) -> threads_pb2.Participant:
    return threads_pb2.Participant(
        thread_id=str(row.thread_id),
        user_id=str(row.user_id),
        role=ROLE_TO_PROTO[row.role],
        last_read_at=to_timestamp(row.last_read_at),
        created_at=to_timestamp(row.created_at),
    )
