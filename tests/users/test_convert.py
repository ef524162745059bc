"""A user row written into its protobuf in place (convert.fill_user) against the
plain construction it replaced, field for field and presence included."""

from __future__ import annotations

from datetime import UTC, datetime

from chat.v1 import users_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from services.users.convert import user_to_proto
from services.users.store import UserRow
from tests import oracles

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
times = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)


_ts = oracles.timestamp


@settings(max_examples=300, deadline=None)
@given(
    st.builds(
        UserRow,
        id=st.uuids(),
        email=st.text(max_size=30),
        username=st.text(max_size=20),
        first_name=st.none() | st.text(max_size=10),
        last_name=st.none() | st.text(max_size=10),
        profile_image=st.none() | st.text(max_size=10),
        is_active=st.booleans(),
        last_login_at=st.none() | times,
        created_at=times,
        updated_at=times,
    )
)
def test_a_user_in_place_equals_one_built_whole(row: UserRow) -> None:
    expected = users_pb2.User(
        id=str(row.id),
        email=row.email,
        username=row.username,
        first_name=row.first_name or "",
        last_name=row.last_name or "",
        profile_image=row.profile_image or "",
        is_active=row.is_active,
        last_login_at=_ts(row.last_login_at),
        created_at=_ts(row.created_at),
        updated_at=_ts(row.updated_at),
    )
    built = user_to_proto(row)
    assert built == expected
    assert built.SerializeToString() == expected.SerializeToString()
