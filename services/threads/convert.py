"""Store rows to protobuf messages (shared with user streams: services/common/thread_protos.py)."""

from __future__ import annotations

from services.common.thread_protos import (
    ROLE_FROM_PROTO,
    ROLE_TO_PROTO,
    participant_to_proto,
    thread_to_proto,
)

__all__ = ["ROLE_FROM_PROTO", "ROLE_TO_PROTO", "participant_to_proto", "thread_to_proto"]
