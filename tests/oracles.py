"""Reference conversions for tests, independent of the code under test."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """protobuf's own conversion of `value` (None: unset), not services.common.convert's."""
    if value is None:
        return None
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(value)
    return result
