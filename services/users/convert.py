"""Store rows to protobuf messages."""

from __future__ import annotations

from chat.v1 import users_pb2

from services.common.convert import to_timestamp
from services.users.store import UserRow


def user_to_proto(row: UserRow) -> users_pb2.User:
    return users_pb2.User(
        id=str(row.id),
        email=row.email,
        username=row.username,
        first_name=row.first_name or "",
        last_name=row.last_name or "",
        profile_image=row.profile_image or "",
        is_active=row.is_active,
        last_login_at=to_timestamp(row.last_login_at),
        created_at=to_timestamp(row.created_at),
        updated_at=to_timestamp(row.updated_at),
    )
