"""The messages service's input rules (limits in MessagesSettings)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from chat.v1 import messages_pb2
from google.protobuf import struct_pb2

from services.common.convert import from_struct
from services.common.validation import Violations
from services.messages.settings import MessagesSettings
from services.messages.store import NewAttachment

URL_MAX = 255
TYPE_MAX = 50
NAME_MAX = 255
SIZE_MAX = 2**31 - 1
# An attachment's type (a media type like image/png, or a caller's own word like
# "file"): printable ASCII, no leading or trailing space; so no controls, escape
# sequences or bidi tricks reach a client that shows it.
MEDIA_TYPE = re.compile(r"[!-~](?:[ -~]*[!-~])?")


def check_content(v: Violations, content: str, settings: MessagesSettings, field: str) -> None:
    if not content.strip():
        v.add(field, "must not be empty")
    else:
        v.check_length(content, field, max_len=settings.max_content_chars)


def metadata_of(
    v: Violations, struct: struct_pb2.Struct, settings: MessagesSettings, field: str
) -> dict[str, Any] | None:
    """The metadata as a dict (None when empty), within the size limit."""
    try:
        value = from_struct(struct)
    except ValueError:  # NaN or ±Infinity: JSON (and jsonb) has no such numbers
        v.add(field, "must hold only finite numbers (JSON has no NaN or Infinity)")
        return None
    if not value:
        return None
    encoded = json.dumps(value, separators=(",", ":"), allow_nan=False)
    if len(encoded.encode()) > settings.max_metadata_bytes:
        v.add(field, f"must be at most {settings.max_metadata_bytes} bytes as JSON")
    elif "\\u0000" in encoded:
        v.add(field, "must not contain NUL characters")
    return value


def attachment_of(
    v: Violations, a: messages_pb2.Attachment, settings: MessagesSettings, field: str
) -> NewAttachment:
    v.check_http_url(a.url, f"{field}.url", max_len=URL_MAX)
    if not a.url:
        v.add(f"{field}.url", "is required")
    if v.check_length(a.type, f"{field}.type", max_len=TYPE_MAX):
        if not a.type:
            v.add(f"{field}.type", "is required")
        elif not MEDIA_TYPE.fullmatch(a.type):
            v.add(f"{field}.type", "must be printable ASCII, like image/png")
    if v.check_name(a.name, f"{field}.name", max_len=NAME_MAX) and not a.name:
        v.add(f"{field}.name", "is required")
    if not 0 <= a.size <= SIZE_MAX:
        v.add(f"{field}.size", f"must be between 0 and {SIZE_MAX}")
    metadata = metadata_of(v, a.metadata, settings, f"{field}.metadata")
    return NewAttachment(a.url, a.type, a.name, a.size, metadata)


def attachments_of(
    v: Violations,
    attachments: Sequence[messages_pb2.Attachment],
    settings: MessagesSettings,
) -> list[NewAttachment]:
    if len(attachments) > settings.max_attachments:
        v.add("attachments", f"at most {settings.max_attachments} per message")
        return []
    return [attachment_of(v, a, settings, f"attachments[{i}]") for i, a in enumerate(attachments)]
