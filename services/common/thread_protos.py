"""Thread and participant rows to protobuf messages, and roles between their two
spellings: the threads service serves them, and user streams (messages) carry them."""

from __future__ import annotations

from chat.v1 import threads_pb2

from services.common.access import ParticipantRow, ThreadRow
from services.common.convert import built, set_timestamp

ROLE_TO_PROTO = {
    "owner": threads_pb2.PARTICIPANT_ROLE_OWNER,
    "admin": threads_pb2.PARTICIPANT_ROLE_ADMIN,
    "member": threads_pb2.PARTICIPANT_ROLE_MEMBER,
}
ROLE_FROM_PROTO = {value: key for key, value in ROLE_TO_PROTO.items()}


# Rows are written into messages in place: services/common/convert.py `built`.


def fill_thread(message: threads_pb2.Thread, row: ThreadRow) -> None:
    message.id = str(row.id)
    message.name = row.name or ""
    message.is_direct = row.is_direct
    message.is_archived = row.is_archived
    if row.last_message_at is not None:
        set_timestamp(message.last_message_at, row.last_message_at)
    set_timestamp(message.created_at, row.created_at)
    set_timestamp(message.updated_at, row.updated_at)


def thread_to_proto(row: ThreadRow) -> threads_pb2.Thread:
    return built(threads_pb2.Thread, fill_thread, row)


def fill_participant(message: threads_pb2.Participant, row: ParticipantRow) -> None:
    message.thread_id = str(row.thread_id)
    message.user_id = str(row.user_id)
    message.role = ROLE_TO_PROTO[row.role]
    if row.last_read_at is not None:
        set_timestamp(message.last_read_at, row.last_read_at)
    set_timestamp(message.created_at, row.created_at)


def participant_to_proto(row: ParticipantRow) -> threads_pb2.Participant:
    return built(threads_pb2.Participant, fill_participant, row)
