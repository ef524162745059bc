"""Rows written into protobufs in place (convert.fill_*, thread_protos.fill_*)
against the plain construction they replaced, field for field, over generated
rows: presence of optional fields (no metadata vs an empty one, no parent, no
read mark), tombstones, attachments, extreme times and text."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from chat.v1 import messages_pb2, threads_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.access import ParticipantRow, ThreadRow
from services.common.convert import to_struct
from services.common.thread_protos import ROLE_TO_PROTO, participant_to_proto, thread_to_proto
from services.messages.convert import STATUS_TO_PROTO, message_to_proto
from services.messages.cursor import encode_cursor
from services.messages.store import AttachmentRow, MessageRow
from tests import oracles

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
times = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
metadata = st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=4)


_ts = oracles.timestamp


_struct = to_struct


attachments = st.builds(
    AttachmentRow,
    id=st.uuids(),
    message_id=st.uuids(),
    url=st.text(max_size=30),
    type=st.text(max_size=10),
    name=st.text(max_size=10),
    size=st.integers(0, 2**62),
    metadata=metadata,
    created_at=times,
)
messages = st.builds(
    MessageRow,
    id=st.uuids(),
    thread_id=st.uuids(),
    user_id=st.uuids(),
    content=st.text(max_size=50),
    parent_id=st.none() | st.uuids(),
    status=st.sampled_from(sorted(STATUS_TO_PROTO)),
    metadata=metadata,
    created_at=times,
    updated_at=times,
    seq=st.integers(1, 2**62),
    change_seq=st.integers(1, 2**62),
    attachments=st.lists(attachments, max_size=3),
)


@settings(max_examples=400, deadline=None)
@given(messages)
def test_a_message_in_place_equals_one_built_whole(row: MessageRow) -> None:
    deleted = row.status == "deleted"
    expected = messages_pb2.Message(
        id=str(row.id),
        thread_id=str(row.thread_id),
        user_id=str(row.user_id),
        content="" if deleted else row.content,
        parent_id=str(row.parent_id) if row.parent_id else "",
        status=STATUS_TO_PROTO[row.status],
        metadata=None if deleted else _struct(row.metadata),
        attachments=[]
        if deleted
        else [
            messages_pb2.Attachment(
                id=str(a.id),
                message_id=str(a.message_id),
                url=a.url,
                type=a.type,
                name=a.name,
                size=a.size,
                metadata=_struct(a.metadata),
                created_at=_ts(a.created_at),
            )
            for a in row.attachments
        ],
        created_at=_ts(row.created_at),
        updated_at=_ts(row.updated_at),
        cursor=encode_cursor(row.thread_id, row.seq),
    )
    # Equal as messages (a Struct's map entries may serialise in another order),
    # presence included: an empty metadata is set, a missing one is not.
    assert message_to_proto(row) == expected
    assert message_to_proto(row).HasField("metadata") == expected.HasField("metadata")


@settings(max_examples=300, deadline=None)
@given(
    st.builds(
        ThreadRow,
        id=st.uuids(),
        name=st.none() | st.text(max_size=20),
        is_direct=st.booleans(),
        is_archived=st.booleans(),
        last_message_at=st.none() | times,
        created_at=times,
        updated_at=times,
    ),
    st.builds(
        ParticipantRow,
        thread_id=st.uuids(),
        user_id=st.uuids(),
        role=st.sampled_from(sorted(ROLE_TO_PROTO)),
        last_read_at=st.none() | times,
        created_at=times,
    ),
)
def test_threads_and_participants_in_place_equal_ones_built_whole(
    thread: ThreadRow, participant: ParticipantRow
) -> None:
    assert (
        thread_to_proto(thread).SerializeToString()
        == threads_pb2.Thread(
            id=str(thread.id),
            name=thread.name or "",
            is_direct=thread.is_direct,
            is_archived=thread.is_archived,
            last_message_at=_ts(thread.last_message_at),
            created_at=_ts(thread.created_at),
            updated_at=_ts(thread.updated_at),
        ).SerializeToString()
    )
    assert (
        participant_to_proto(participant).SerializeToString()
        == threads_pb2.Participant(
            thread_id=str(participant.thread_id),
            user_id=str(participant.user_id),
            role=ROLE_TO_PROTO[participant.role],
            last_read_at=_ts(participant.last_read_at),
            created_at=_ts(participant.created_at),
        ).SerializeToString()
    )


def test_the_epoch_and_microseconds_survive() -> None:
    at = EPOCH + timedelta(microseconds=1)
    row = ThreadRow(uuid.uuid4(), None, False, False, EPOCH, at, at)
    proto = thread_to_proto(row)
    assert proto.HasField("last_message_at") and proto.last_message_at.seconds == 0
    assert proto.created_at.nanos == 1000
