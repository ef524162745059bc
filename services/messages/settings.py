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
    # Events and bytes (serialised) buffered per open stream; a consumer that far
    # behind is cut off with RESOURCE_EXHAUSTED and resumes from its cursor.
    stream_buffer: int = Field(default=256, ge=1, alias="STREAM_BUFFER_EVENTS")
    stream_buffer_bytes: int = Field(
        default=4 * 1024 * 1024, ge=64 * 1024, alias="STREAM_BUFFER_BYTES"
    )
    # One database round trip of a replay or live fetch returns at most this many
    # events and, past the first, about this many bytes of them.
    stream_fetch_batch: int = Field(default=200, ge=1, le=10_000, alias="STREAM_FETCH_BATCH")
    stream_fetch_bytes: int = Field(default=1024 * 1024, ge=16 * 1024, alias="STREAM_FETCH_BYTES")
    # Between the live batches of a backlog, each stream of the thread gets this
    # long to drain to half its buffer before the next batch (streams/fanout.py).
    stream_backlog_wait_s: float = Field(default=2.0, ge=0, le=60, alias="STREAM_BACKLOG_WAIT")
    # A page of ListMessages, ListReplies, ListUserMessages or SearchMessages is at
    # most this many bytes serialised (next_page_token included): it ends early,
    # with a token, before the message that would cross it, and always holds at
    # least one. Well under gRPC's default 4 MiB receive limit (services/messages/paging.py).
    list_response_max_bytes: int = Field(
        default=3 * 1024 * 1024, ge=64 * 1024, alias="LIST_RESPONSE_MAX_BYTES"
    )
    # Listings serve messages from their serialised bytes, cached per version
    # (id, change_seq) in each process up to this many bytes, entries' overhead
    # included; 0 turns the cache off (services/messages/message_cache.py).
    message_cache_bytes: int = Field(
        default=32 * 1024 * 1024, ge=0, le=4 * 1024**3, alias="MESSAGE_CACHE_BYTES"
    )
    # Streams one process serves at once; past it, opens get RESOURCE_EXHAUSTED
    # with a retry hint (another replica, or this one a little later).
    stream_max_open: int = Field(default=10_000, ge=1, alias="STREAM_MAX_OPEN")
    # Live fetches (one per thread with new events) running at once.
    stream_fetch_concurrency: int = Field(default=4, ge=1, alias="STREAM_FETCH_CONCURRENCY")
    # Every feed's thread position is read this often (one query for all of a
    # process's feeds), so a wake-up that never arrived delays delivery at most
    # this long (streams/waker.py).
    stream_catch_up_s: float = Field(default=1.0, gt=0, le=60, alias="STREAM_CATCH_UP_INTERVAL")
    # First delay before the listening connection is re-opened after it drops;
    # it doubles (with jitter) up to STREAM_LISTENER_RETRY_MAX.
    listener_retry_s: float = Field(default=1.0, gt=0, alias="STREAM_LISTENER_RETRY")
    listener_retry_max_s: float = Field(default=15.0, gt=0, alias="STREAM_LISTENER_RETRY_MAX")
    # The listening connection is probed this often; a probe unanswered within
    # the timeout counts it as dead (a blackholed TCP connection never errors).
    listener_heartbeat_s: float = Field(default=5.0, gt=0, alias="STREAM_LISTENER_HEARTBEAT")
    listener_heartbeat_timeout_s: float = Field(
        default=5.0, gt=0, alias="STREAM_LISTENER_HEARTBEAT_TIMEOUT"
    )
    # User streams (StreamUserEvents). The sequencer numbers committed log events
    # at least this often (a send's notification wakes it at once; membership
    # changes, renames and read marks wait for the tick).
    log_tick_s: float = Field(default=0.05, gt=0, le=10, alias="USER_LOG_TICK")
    # Events numbered per sequencer transaction.
    log_sequence_batch: int = Field(default=5000, ge=1, alias="USER_LOG_SEQUENCE_BATCH")
    # How long the log keeps events: a cursor older than this is CURSOR_EXPIRED.
    log_retention_s: float = Field(default=7 * 24 * 3600, gt=0, alias="USER_LOG_RETENTION")
    # How often one process prunes expired events, and how many per pass.
    log_prune_every_s: float = Field(default=60.0, gt=0, alias="USER_LOG_PRUNE_EVERY")
    log_prune_batch: int = Field(default=10_000, ge=1, alias="USER_LOG_PRUNE_BATCH")
