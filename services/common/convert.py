"""Conversions between database values and protobuf well-known types."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message as ProtoMessage

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for a timestamptz value; None stays unset (see set_timestamp)."""
    if value is None:
        return None
    timestamp = timestamp_pb2.Timestamp()
    set_timestamp(timestamp, value)
    return timestamp


Message = TypeVar("Message", bound=ProtoMessage)
Row = TypeVar("Row")


def built(message_type: type[Message], fill: Callable[[Message, Row], None], row: Row) -> Message:
    """A new `message_type` with `row` written into it by `fill`.

    Each service's convert module has `fill_*` functions that write a row into a
    message in place (a fresh one, or the element a list response's repeated
    field just added): a page then builds no intermediate messages and copies
    none into its parent, about half the CPU of building and copying them. This
    is their whole-message form.
    """
    message = message_type()
    fill(message, row)
    return message


def set_timestamp(target: timestamp_pb2.Timestamp, value: datetime) -> None:
    """Write `value` into a message's Timestamp field in place: on list paths this
    beats building a Timestamp and copying it into its parent (to_timestamp).

    Integer arithmetic on the offset from the epoch: exact to the microsecond,
    and several times cheaper than Timestamp.FromDatetime."""
    delta = value - _EPOCH
    target.seconds = delta.days * 86_400 + delta.seconds
    target.nanos = delta.microseconds * 1000


def to_struct(value: dict[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def from_struct(value: struct_pb2.Struct) -> dict[str, Any]:
    """The JSON object a Struct holds (numbers come back as floats, as in JSON)."""
    result: dict[str, Any] = json_format.MessageToDict(value)
    return result
