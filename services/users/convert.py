"""Store rows to protobuf messages."""

from __future__ import annotations

from chat.v1 import users_pb2

from services.common.convert import built, set_timestamp
from services.users.store import UserRow


def user_to_proto(row: UserRow) -> users_pb2.User:
    return built(users_pb2.User, fill_user, row)


def fill_user(message: users_pb2.User, row: UserRow) -> None:
    """`row` written into `message` in place (see services/common/convert.py `built`)."""
    message.id = str(row.id)
    message.email = row.email
    message.username = row.username
    message.first_name = row.first_name or ""
    message.last_name = row.last_name or ""
    message.profile_image = row.profile_image or ""
    message.is_active = row.is_active
    if row.last_login_at is not None:
        set_timestamp(message.last_login_at, row.last_login_at)
    set_timestamp(message.created_at, row.created_at)
    set_timestamp(message.updated_at, row.updated_at)
