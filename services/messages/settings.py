"""The messages service's own limits, from the environment (documented in its README)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class MessagesSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    # Content: non-empty after trimming, at most this many characters.
    max_content_chars: int = Field(default=10_000, ge=1, alias="MESSAGE_MAX_CONTENT_CHARS")
    # Metadata (message or attachment): at most this many bytes as compact JSON.
    max_metadata_bytes: int = Field(default=16 * 1024, ge=2, alias="MESSAGE_MAX_METADATA_BYTES")
    # Attachments per message, in one send or added later.
    max_attachments: int = Field(default=20, ge=0, alias="MESSAGE_MAX_ATTACHMENTS")
    # Events buffered per open stream; a consumer this far behind is cut off with
    # RESOURCE_EXHAUSTED and resumes from its cursor.
    stream_buffer: int = Field(default=256, ge=1, alias="STREAM_BUFFER_EVENTS")
    # Rows per database round trip when replaying or fetching a thread's events.
    stream_fetch_batch: int = Field(default=200, ge=1, le=10_000, alias="STREAM_FETCH_BATCH")
    # Delay before the listening connection is re-opened after it drops.
    listener_retry_s: float = Field(default=1.0, gt=0, alias="STREAM_LISTENER_RETRY")
