"""chat.v1.UsersService: translates protobuf requests into store calls.

Each method parses its request, asks `policy` whether the caller may do it,
calls the store and converts the result (permissions: services/users/policy.py).
"""

from __future__ import annotations

from uuid import UUID

from chat.v1 import users_pb2, users_pb2_grpc

from services.common.errors import InvalidArgument
from services.common.fieldmask import update_paths
from services.common.identity import caller_of
from services.common.pagination import PageCodec, PageKind, page_size_of, text
from services.common.server import Runtime
from services.common.types import Context
from services.common.validation import Violations, parse_uuid
from services.users import policy, store
from services.users.convert import fill_user, user_to_proto
from services.users.validation import (
    BATCH_GET_MAX,
    QUERY_MAX,
    USERNAME_MAX,
    check_email,
    check_profile,
    check_username,
    identity_form,
    new_user,
)

# A page token's position is lower(username) as PostgreSQL computes it; a legacy
# username (one migration 0009 could not bring to the identity form) may lengthen
# when lowered, so a position may be longer than USERNAME_MAX.
POSITION_MAX = 4 * USERNAME_MAX
USER_PAGES = PageCodec(PageKind.USERS, text(POSITION_MAX))


def _changeable_user(raw_id: str, context: Context) -> UUID:
    """The user a request's `id` names, once policy lets the caller change them
    (DeleteUser, RecordLogin; UpdateUser checks its fields in between)."""
    user_id = parse_uuid(raw_id, "id")
    policy.may_change(caller_of(context), user_id)
    return user_id


class UsersServicer(users_pb2_grpc.UsersServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._pool = runtime.pool

    async def CreateUser(
        self, request: users_pb2.CreateUserRequest, context: Context
    ) -> users_pb2.CreateUserResponse:
        row = await self._pool.run(store.create_user, new_user(request.user))
        return users_pb2.CreateUserResponse(user=user_to_proto(row))

    async def GetUser(
        self, request: users_pb2.GetUserRequest, context: Context
    ) -> users_pb2.GetUserResponse:
        row = await self._pool.run(store.get_user, parse_uuid(request.id, "id"))
        response = users_pb2.GetUserResponse()
        fill_user(response.user, row)
        return response

    async def LookupUser(
        self, request: users_pb2.LookupUserRequest, context: Context
    ) -> users_pb2.LookupUserResponse:
        key = request.WhichOneof("key")
        violations = Violations()
        # The same identity form as CreateUser: the KELVIN SIGN spelling of
        # kate@example.com finds kate@example.com, a Cyrillic look-alike is refused.
        email = username = None
        if key == "email":
            email = check_email(violations, request.email, "email")
        elif key == "username":
            username = check_username(violations, request.username, "username")
        else:
            violations.add("key", "set email or username")
        violations.raise_if_any()
        row = await self._pool.run(store.lookup_user, email=email or "", username=username or "")
        return users_pb2.LookupUserResponse(user=user_to_proto(row))

    async def BatchGetUsers(
        self, request: users_pb2.BatchGetUsersRequest, context: Context
    ) -> users_pb2.BatchGetUsersResponse:
        if len(request.ids) > BATCH_GET_MAX:
            raise InvalidArgument.field("ids", f"at most {BATCH_GET_MAX} ids per call")
        violations = Violations()
        ids = [violations.check_uuid(raw, f"ids[{i}]") for i, raw in enumerate(request.ids)]
        violations.raise_if_any()
        wanted = [i for i in ids if i is not None]
        found = await self._pool.run(store.batch_get_users, wanted)
        response = users_pb2.BatchGetUsersResponse(
            missing_ids=[str(i) for i in wanted if i not in found]
        )
        for i in wanted:
            if i in found:
                fill_user(response.users.add(), found[i])
        return response

    async def ListUsers(
        self, request: users_pb2.ListUsersRequest, context: Context
    ) -> users_pb2.ListUsersResponse:
        size = page_size_of(request.page_size)
        violations = Violations()
        violations.check_length(request.query, "query", max_len=QUERY_MAX)
        violations.raise_if_any()
        params = {"query": request.query.lower(), "inactive": request.include_inactive}
        page = USER_PAGES.page(size, request.page_token, params)
        found = await self._pool.run(
            store.list_users,
            after_username=page.after,
            include_inactive=request.include_inactive,
            query=request.query,
            identity_query=identity_form(request.query),
            limit=page.fetch,
        )
        listed, token = page.finish(found, lambda item: item.sort_key)
        response = users_pb2.ListUsersResponse(next_page_token=token)
        for item in listed:
            fill_user(response.users.add(), item.user)
        return response

    async def UpdateUser(
        self, request: users_pb2.UpdateUserRequest, context: Context
    ) -> users_pb2.UpdateUserResponse:
        user_id = parse_uuid(request.user.id, "user.id")
        paths = update_paths(request.update_mask, request.user, store.UPDATABLE_COLUMNS)
        violations = Violations()
        user = request.user
        email = check_email(violations, user.email) if "email" in paths else None
        username = check_username(violations, user.username) if "username" in paths else None
        check_profile(violations, request.user, paths)
        violations.raise_if_any()
        policy.may_change(caller_of(context), user_id)
        changes = store.UserChanges(
            fields=frozenset(paths),
            email=email or "",
            username=username or "",
            first_name=user.first_name or None,
            last_name=user.last_name or None,
            profile_image=user.profile_image or None,
            is_active=user.is_active,
        )
        row = await self._pool.run_in_transaction(store.update_user, user_id, changes)
        return users_pb2.UpdateUserResponse(user=user_to_proto(row))

    async def DeleteUser(
        self, request: users_pb2.DeleteUserRequest, context: Context
    ) -> users_pb2.DeleteUserResponse:
        user_id = _changeable_user(request.id, context)
        await self._pool.run_in_transaction(store.delete_user, user_id)
        return users_pb2.DeleteUserResponse()

    async def RecordLogin(
        self, request: users_pb2.RecordLoginRequest, context: Context
    ) -> users_pb2.RecordLoginResponse:
        user_id = _changeable_user(request.id, context)
        row = await self._pool.run(store.record_login, user_id)
        return users_pb2.RecordLoginResponse(user=user_to_proto(policy.logged_in(row, user_id)))
