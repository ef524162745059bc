"""Every RPC of every service, with requests generated from its descriptor (hypothesis).

Each field gets hostile values by its type: boundary strings (empty, whitespace,
NUL, SQL and JSON fragments, 10^6 characters), UUIDs real and malformed, negative
and huge integers, unknown enum values, deep and wide Structs, random field
mask paths; fields may also stay unset. A call may succeed, or fail with a client
error carrying details; it may never be INTERNAL or UNKNOWN or hang, and a
refused call writes nothing. String fields also draw the ids of a seeded world
(users, a group, messages, a reply, an attachment), so calls reach real rows and
succeed too; after every call, accepted or refused, the data's rules are checked
(INVARIANTS). Bytes that are not valid UTF-8 in a string field
(what protobuf cannot even build) are sent raw over the wire as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import grpc
import pytest
from chat.v1 import admin_pb2, messages_pb2, threads_pb2, users_pb2
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.server import ServiceDefinition
from services.messages.service import DEFINITION as MESSAGES
from services.threads.service import DEFINITION as THREADS
from services.users.service import DEFINITION as USERS
from tests.hostile.world import ALLOWED, FRAGMENTS, broken_invariants, row_counts, structs
from tests.rpc_errors import error_info, violated_fields

SERVICES: list[tuple[ServiceDefinition, Any]] = [
    (USERS, users_pb2.DESCRIPTOR),
    (THREADS, threads_pb2.DESCRIPTOR),
    (MESSAGES, messages_pb2.DESCRIPTOR),
]
METHODS = [
    (definition, method)
    for definition, file in SERVICES
    for service in (
        *file.services_by_name.values(),
        *admin_pb2.DESCRIPTOR.services_by_name.values(),
    )
    for method in service.methods
]

strings = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.uuids().map(str),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=300),
    st.sampled_from([" " * 1000, "z" * 10_001, "é" * 1_000_000]),
)
integers = st.one_of(
    st.sampled_from([0, -1, 1, 200, 201, 2**31 - 1, -(2**31)]),
    st.integers(-(2**31), 2**31 - 1),
)
SCALARS: dict[int, Any] = {
    FieldDescriptor.TYPE_STRING: strings,
    FieldDescriptor.TYPE_INT32: integers,
    FieldDescriptor.TYPE_INT64: st.one_of(integers, st.integers(-(2**63), 2**63 - 1)),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_ENUM: st.integers(-3, 12),
}


def message_strategy(
    descriptor: Descriptor, depth: int = 0, known_ids: Sequence[str] = ()
) -> st.SearchStrategy[Message]:
    """Requests of `descriptor`'s type with any subset of fields set to hostile values.

    String fields may also take the ids of a seeded world (`known_ids`), so calls
    reach real users, threads and messages rather than only ids that match nothing.
    """
    cls = GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Struct":
        return structs.map(lambda value: _struct(value))
    if descriptor.full_name == "google.protobuf.FieldMask":
        paths = st.lists(st.sampled_from(["content", "name", "email", "id", "x", "", "a.b"]))
        return paths.map(lambda p: cls(paths=p))
    if descriptor.full_name == "google.protobuf.Timestamp":
        return st.builds(lambda s, n: cls(seconds=s, nanos=n), integers, st.integers(0, 10**9 - 1))
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 2:
                continue
            assert field.message_type is not None
            value: st.SearchStrategy[Any] = message_strategy(
                field.message_type, depth + 1, known_ids
            )
        elif field.type == FieldDescriptor.TYPE_STRING and known_ids:
            value = st.one_of(st.sampled_from(list(known_ids)), SCALARS[field.type])
        else:
            value = SCALARS[field.type]
        if _repeated(field):
            value = st.lists(value, max_size=3)
        fields[field.name] = st.none() | value
    return st.fixed_dictionaries(fields).map(lambda values: _build(cls, values))


def _repeated(field: FieldDescriptor) -> bool:
    # `is_repeated` (protobuf 6) is not in the type stubs yet.
    return bool(getattr(field, "is_repeated", False))


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    holder = struct_pb2.Struct()
    holder.update(value)
    return holder


def _build(cls: Any, values: dict[str, Any]) -> Message:
    message: Message = cls()
    for name, value in values.items():
        if value is None:
            continue
        field = getattr(message, name)
        if isinstance(value, list):
            field.extend(value)
        elif isinstance(value, Message):
            field.CopyFrom(value)
        else:
            oneof = cls.DESCRIPTOR.fields_by_name[name].containing_oneof
            if oneof is not None and message.WhichOneof(oneof.name):
                continue  # one member of a oneof is enough
            setattr(message, name, value)
    return message


async def _call(
    channel: grpc.aio.Channel, method: MethodDescriptor, payload: bytes
) -> grpc.aio.AioRpcError | None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            streaming: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
            stream = streaming(payload, timeout=10)
            await stream.read()  # the first event, or the refusal
            stream.cancel()
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
            await unary(payload, timeout=10)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming:
            return None  # a live stream with nothing to say yet
        return err
    return None


def _assert_allowed(err: grpc.aio.AioRpcError, path: str) -> None:
    assert err.code() in ALLOWED, (path, err.code(), str(err.details())[:300])
    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (
        err.details() or ""
    ):
        return  # GRPC_MAX_RECEIVE_MESSAGE_BYTES, refused by gRPC itself before any handler
    assert error_info(err).reason, path  # rich details, always


@pytest.mark.parametrize(
    ("definition", "method"),
    METHODS,
    ids=[f"{m.containing_service.name}.{m.name}@{d.name}" for d, m in METHODS],
)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_generated_requests(
    definition: ServiceDefinition,
    method: MethodDescriptor,
    channels: dict[str, Any],
    db_pool: asyncpg.Pool,
    world: list[str],
    data: st.DataObject,
) -> None:
    path = f"{method.containing_service.name}/{method.name}"
    request = data.draw(message_strategy(method.input_type, known_ids=world), label="request")
    before = await row_counts(db_pool)
    err = await _call(channels[definition.name], method, request.SerializeToString())
    if err is not None:
        _assert_allowed(err, path)
        assert await row_counts(db_pool) == before, f"{path} was refused but wrote"
    # Accepted or not, the rules still hold.
    assert await broken_invariants(db_pool) == [], (path, request)


def _invalid_utf8_request(descriptor: Descriptor) -> bytes | None:
    """A serialized request whose first string field holds bytes that are not UTF-8."""
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING and not _repeated(field):
            tag = (field.number << 3) | 2  # length-delimited
            bad = b"\xed\xa0\x80 lone surrogate \xff"
            return bytes([tag]) + bytes([len(bad)]) + bad
    return None


async def test_invalid_utf8_on_the_wire_is_invalid_argument(
    channels: dict[str, Any], db_pool: asyncpg.Pool
) -> None:
    checked = 0
    for definition, method in METHODS:
        payload = _invalid_utf8_request(method.input_type)
        if payload is None:
            continue
        before = await row_counts(db_pool)
        err = await _call(channels[definition.name], method, payload)
        assert err is not None, method.full_name
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.full_name, err.code())
        assert violated_fields(err) == {"request"}
        assert await row_counts(db_pool) == before
        checked += 1
    assert checked > 20


def test_descriptor_is_complete() -> None:
    """The generated requests cover every RPC the protos declare."""
    declared = {
        m.full_name
        for _, file in SERVICES
        for service in file.services_by_name.values()
        for m in service.methods
    }
    assert declared <= {m.full_name for _, m in METHODS}


@pytest.mark.parametrize(
    "identity",
    [
        [("x-user-id", "")],
        [("x-user-id", "00000000-0000-0000-0000-000000000001")] * 2,
        [
            ("x-user-id", "00000000-0000-0000-0000-000000000001"),
            ("x-user-id", "00000000-0000-0000-0000-000000000002"),
        ],
    ],
    ids=["empty", "repeated", "two-users"],
)
async def test_an_ambiguous_identity_is_invalid_argument_on_every_rpc(
    identity: list[tuple[str, str]], channels: dict[str, Any], db_pool: asyncpg.Pool
) -> None:
    """Never read as a trusted call, never one of two users: refused, naming the header."""
    before = await row_counts(db_pool)
    for definition, method in METHODS:
        path = f"/{method.containing_service.full_name}/{method.name}"
        channel = channels[definition.name]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if method.server_streaming:
                stream = channel.unary_stream(path)(b"", metadata=identity, timeout=10)
                await stream.read()
            else:
                await channel.unary_unary(path)(b"", metadata=identity, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, caught.value)
        assert violated_fields(caught.value) == {"x-user-id"}, path
    assert await row_counts(db_pool) == before
