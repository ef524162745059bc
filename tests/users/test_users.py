"""chat.v1.UsersService over a real server and database."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from chat.v1 import users_pb2, users_pb2_grpc
from google.protobuf import field_mask_pb2

from tests.rpc_errors import as_user, error_info, error_of, rich_status, violated_fields

if TYPE_CHECKING:
    Stub = users_pb2_grpc.UsersServiceAsyncStub


async def create(
    users: Stub,
    username: str,
    email: str | None = None,
    *,
    first_name: str = "",
    last_name: str = "",
    profile_image: str = "",
) -> users_pb2.User:
    user = users_pb2.User(
        username=username,
        email=email or f"{username}@example.com",
        first_name=first_name,
        last_name=last_name,
        profile_image=profile_image,
    )
    reply = await users.CreateUser(users_pb2.CreateUserRequest(user=user))
    return reply.user


async def count_users(db_pool: asyncpg.Pool) -> int:
    return int(await db_pool.fetchval("SELECT count(*) FROM users"))


async def test_create_get_and_lookup(users: Stub) -> None:
    ada = await create(users, "Ada.L", "Ada@Example.com", first_name="Ada", last_name="Lovelace")
    assert uuid.UUID(ada.id)
    assert ada.is_active and ada.created_at.seconds > 0 and not ada.HasField("last_login_at")
    assert ada.email == "Ada@Example.com"  # stored as given
    got = await users.GetUser(users_pb2.GetUserRequest(id=ada.id))
    assert got.user == ada
    by_email = await users.LookupUser(users_pb2.LookupUserRequest(email="ada@EXAMPLE.com"))
    by_name = await users.LookupUser(users_pb2.LookupUserRequest(username="ada.l"))
    assert by_email.user.id == by_name.user.id == ada.id


@pytest.mark.parametrize(
    ("user", "fields"),
    [
        (users_pb2.User(), {"user.email", "user.username"}),
        (users_pb2.User(email="not-an-email", username="ok_name"), {"user.email"}),
        (users_pb2.User(email="a@b.io", username="ab"), {"user.username"}),
        (users_pb2.User(email="a@b.io", username="x" * 51), {"user.username"}),
        (users_pb2.User(email="a@b.io", username="has space"), {"user.username"}),
        (users_pb2.User(email="a@b.io", username="nul\x00name"), {"user.username"}),
        # A final newline: `$` alone would match before it (victim\n beside victim).
        (users_pb2.User(email="a@b.io", username="victim\n"), {"user.username"}),
        (users_pb2.User(email="a@b.io\n", username="victim"), {"user.email"}),
        (users_pb2.User(email=("e" * 250) + "@b.io", username="okname"), {"user.email"}),
        (
            users_pb2.User(email="a@b.io", username="okname", first_name="f" * 101),
            {"user.first_name"},
        ),
        (
            users_pb2.User(email="a@b.io", username="okname", last_name="l" * 101),
            {"user.last_name"},
        ),
        (
            users_pb2.User(email="a@b.io", username="okname", profile_image="ftp://x.io/a.png"),
            {"user.profile_image"},
        ),
        (
            users_pb2.User(
                email="a@b.io", username="okname", profile_image="https://x.io/" + "p" * 250
            ),
            {"user.profile_image"},
        ),
    ],
)
async def test_invalid_input_names_fields_and_writes_nothing(
    users: Stub, db_pool: asyncpg.Pool, user: users_pb2.User, fields: set[str]
) -> None:
    err = await error_of(users.CreateUser(users_pb2.CreateUserRequest(user=user)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(err) == fields
    assert await count_users(db_pool) == 0


async def test_limits_at_the_boundary_are_accepted(users: Stub) -> None:
    email = "e" * 64 + "@" + "d" * 61 + "." + "d" * 61 + "." + "d" * 61 + ".abcd"
    assert len(email) == 255
    user = await create(
        users,
        "u" * 50,
        email,
        first_name="f" * 100,
        last_name="l" * 100,
        profile_image="https://x.io/" + "p" * 242,
    )
    assert (len(user.email), len(user.username), len(user.first_name)) == (255, 50, 100)
    assert len(user.profile_image) == 255
    assert (await create(users, "abc")).username == "abc"  # 3 characters
    err = await error_of(create(users, "longer", "e" + email))  # 256 characters
    assert violated_fields(err) == {"user.email"}


async def test_duplicates_are_already_exists_naming_the_field(
    users: Stub, db_pool: asyncpg.Pool
) -> None:
    await create(users, "bob", "bob@x.io")
    err = await error_of(create(users, "other", "BOB@x.io"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert violated_fields(err) == {"email"}
    err = await error_of(create(users, "BOB", "someone@x.io"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert violated_fields(err) == {"username"}
    assert await count_users(db_pool) == 1


async def test_concurrent_duplicate_creates_exactly_one_wins(
    users: Stub, db_pool: asyncpg.Pool
) -> None:
    results = await asyncio.gather(
        *(create(users, f"racer{i}", "Race@x.io" if i % 2 else "race@X.io") for i in range(12)),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, users_pb2.User)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    assert len(losers) == 11
    assert all(e.code() == grpc.StatusCode.ALREADY_EXISTS for e in losers)
    assert await count_users(db_pool) == 1


async def test_bad_and_unknown_ids(users: Stub) -> None:
    err = await error_of(users.GetUser(users_pb2.GetUserRequest(id="nope")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and violated_fields(err) == {"id"}
    err = await error_of(users.GetUser(users_pb2.GetUserRequest(id=str(uuid.uuid4()))))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert rich_status(err).details  # ErrorInfo and ResourceInfo
    err = await error_of(users.LookupUser(users_pb2.LookupUserRequest(email="ghost@x.io")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await error_of(users.LookupUser(users_pb2.LookupUserRequest()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_batch_get_in_request_order_with_missing_reported(users: Stub) -> None:
    a, b = await create(users, "alpha"), await create(users, "bravo")
    ghost = str(uuid.uuid4())
    reply = await users.BatchGetUsers(users_pb2.BatchGetUsersRequest(ids=[b.id, ghost, a.id]))
    assert [u.id for u in reply.users] == [b.id, a.id]
    assert list(reply.missing_ids) == [ghost]
    err = await error_of(users.BatchGetUsers(users_pb2.BatchGetUsersRequest(ids=[a.id, "bad"])))
    assert violated_fields(err) == {"ids[1]"}
    too_many = [str(uuid.uuid4()) for _ in range(1001)]
    err = await error_of(users.BatchGetUsers(users_pb2.BatchGetUsersRequest(ids=too_many)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and violated_fields(err) == {"ids"}
    ok = await users.BatchGetUsers(users_pb2.BatchGetUsersRequest(ids=too_many[:1000]))
    assert len(ok.missing_ids) == 1000


async def test_list_pages_through_everyone_in_username_order(users: Stub) -> None:
    names = ["delta", "Alpha", "charlie", "bravo", "echo", "foxtrot", "golf"]
    for name in names:
        await create(users, name)
    seen: list[str] = []
    token = ""
    while True:
        page = await users.ListUsers(users_pb2.ListUsersRequest(page_size=3, page_token=token))
        assert len(page.users) <= 3
        seen += [u.username for u in page.users]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(names, key=str.lower)


async def test_list_search_inactive_and_token_misuse(users: Stub) -> None:
    await create(users, "marie", "mc@x.io", first_name="Marie", last_name="Curie")
    await create(users, "pierre", "pierre@x.io", first_name="Pierre", last_name="Curie")
    hidden = await create(users, "curious", "cu@x.io")
    await create(users, "zed", "zed@x.io")
    await users.UpdateUser(
        users_pb2.UpdateUserRequest(
            user=users_pb2.User(id=hidden.id, is_active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["is_active"]),
        )
    )
    found = await users.ListUsers(users_pb2.ListUsersRequest(query="CU"))
    assert [u.username for u in found.users] == ["marie", "pierre"]  # last name; "curious" hidden
    found = await users.ListUsers(users_pb2.ListUsersRequest(query="cu", include_inactive=True))
    assert [u.username for u in found.users] == ["curious", "marie", "pierre"]
    by_email = await users.ListUsers(users_pb2.ListUsersRequest(query="mc@"))
    assert [u.username for u in by_email.users] == ["marie"]

    page = await users.ListUsers(users_pb2.ListUsersRequest(query="cu", page_size=1))
    assert page.next_page_token
    err = await error_of(
        users.ListUsers(users_pb2.ListUsersRequest(query="z", page_token=page.next_page_token))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(err) == {"page_token"}
    err = await error_of(users.ListUsers(users_pb2.ListUsersRequest(page_size=-1)))
    assert violated_fields(err) == {"page_size"}


async def test_update_changes_only_masked_fields(users: Stub) -> None:
    ada = await create(users, "ada", first_name="Ada", last_name="Lovelace")
    reply = await users.UpdateUser(
        users_pb2.UpdateUserRequest(
            user=users_pb2.User(id=ada.id, first_name="Augusta", last_name="IGNORED"),
            update_mask=field_mask_pb2.FieldMask(paths=["first_name"]),
        ),
        metadata=as_user(ada.id),
    )
    assert reply.user.first_name == "Augusta"
    assert reply.user.last_name == "Lovelace"
    assert reply.user.updated_at.ToDatetime() > ada.updated_at.ToDatetime()
    # Clearing a field: listed in the mask, empty in the message.
    cleared = await users.UpdateUser(
        users_pb2.UpdateUserRequest(
            user=users_pb2.User(id=ada.id),
            update_mask=field_mask_pb2.FieldMask(paths=["last_name"]),
        )
    )
    assert cleared.user.last_name == "" and cleared.user.first_name == "Augusta"

    err = await error_of(
        users.UpdateUser(
            users_pb2.UpdateUserRequest(
                user=users_pb2.User(id=ada.id),
                update_mask=field_mask_pb2.FieldMask(paths=["created_at"]),
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and violated_fields(err) == {
        "update_mask"
    }


async def test_update_permissions_and_uniqueness(users: Stub) -> None:
    ada, bob = await create(users, "ada"), await create(users, "bob")
    err = await error_of(
        users.UpdateUser(
            users_pb2.UpdateUserRequest(
                user=users_pb2.User(id=bob.id, first_name="Mallory"),
                update_mask=field_mask_pb2.FieldMask(paths=["first_name"]),
            ),
            metadata=as_user(ada.id),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await users.GetUser(users_pb2.GetUserRequest(id=bob.id))).user.first_name == ""
    err = await error_of(
        users.UpdateUser(
            users_pb2.UpdateUserRequest(
                user=users_pb2.User(id=bob.id, email="ADA@example.com"),
                update_mask=field_mask_pb2.FieldMask(paths=["email"]),
            )
        )
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and violated_fields(err) == {"email"}
    err = await error_of(
        users.UpdateUser(
            users_pb2.UpdateUserRequest(
                user=users_pb2.User(id=str(uuid.uuid4()), first_name="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["first_name"]),
            )
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_record_login_and_deactivation(users: Stub) -> None:
    ada = await create(users, "ada")
    logged = await users.RecordLogin(
        users_pb2.RecordLoginRequest(id=ada.id), metadata=as_user(ada.id)
    )
    assert logged.user.HasField("last_login_at")
    await users.UpdateUser(
        users_pb2.UpdateUserRequest(
            user=users_pb2.User(id=ada.id, is_active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["is_active"]),
        )
    )
    err = await error_of(users.RecordLogin(users_pb2.RecordLoginRequest(id=ada.id)))
    # USER_INACTIVE has one status wherever it is raised: a deactivated user acts on nothing.
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(err).reason == "USER_INACTIVE"
    err = await error_of(users.RecordLogin(users_pb2.RecordLoginRequest(id=str(uuid.uuid4()))))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_cascades_to_messages_and_memberships(
    users: Stub, db_pool: asyncpg.Pool
) -> None:
    ada, bob = await create(users, "ada"), await create(users, "bob")
    thread = await db_pool.fetchval("INSERT INTO threads (name) VALUES ('t') RETURNING id")
    await db_pool.execute(
        "INSERT INTO thread_participants (thread_id, user_id) VALUES ($1, $2), ($1, $3)",
        thread,
        uuid.UUID(ada.id),
        uuid.UUID(bob.id),
    )
    ada_said = await db_pool.fetchval(
        "INSERT INTO messages (thread_id, user_id, content) VALUES ($1, $2, 'hi') RETURNING id",
        thread,
        uuid.UUID(ada.id),
    )
    await db_pool.execute(
        "INSERT INTO message_attachments (message_id, name, type, size, url) "
        "VALUES ($1, 'a.txt', 'text/plain', 1, 'https://x.io/a.txt')",
        ada_said,
    )
    # Bob's reply to Ada outlives her message, as a reply to nothing (parent SET NULL).
    await db_pool.execute(
        "INSERT INTO messages (thread_id, user_id, content, parent_id) VALUES ($1, $2, 'yo', $3)",
        thread,
        uuid.UUID(bob.id),
        ada_said,
    )
    err = await error_of(
        users.DeleteUser(users_pb2.DeleteUserRequest(id=bob.id), metadata=as_user(ada.id))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    await users.DeleteUser(users_pb2.DeleteUserRequest(id=ada.id), metadata=as_user(ada.id))
    assert await db_pool.fetchval("SELECT count(*) FROM messages") == 1
    assert await db_pool.fetchval("SELECT count(*) FROM thread_participants") == 1
    assert await db_pool.fetchval("SELECT count(*) FROM message_attachments") == 0
    assert await db_pool.fetchval("SELECT parent_id FROM messages") is None
    err = await error_of(users.DeleteUser(users_pb2.DeleteUserRequest(id=ada.id)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
