"""SendTyping's per-process limits: how often a user may say they are typing in a
thread, and how long the others show it.

Typing is a hint, never stored: one notification per accepted call reaches the
participants' user streams (chat_typing). A client re-sends it while the user
keeps typing, no more than once per TYPING_MIN_INTERVAL; a call sooner is
RESOURCE_EXHAUSTED with a retry hint and sends nothing. The limit is per
threads-service process (a client spread over replicas may exceed it by the
replica count). At most TYPING_TRACKED_MAX (user, thread) pairs are remembered;
past it the oldest are forgotten (they may then type again at once).
"""

from __future__ import annotations

import collections
import time
from datetime import UTC, datetime, timedelta
from uuid import UUID

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.errors import ResourceExhausted


class TypingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    min_interval_s: float = Field(default=2.0, gt=0, le=60, alias="TYPING_MIN_INTERVAL")
    expires_s: float = Field(default=6.0, gt=0, le=60, alias="TYPING_EXPIRES")
    tracked_max: int = Field(default=100_000, ge=1, alias="TYPING_TRACKED_MAX")


class TypingLimiter:
    def __init__(self, settings: TypingSettings) -> None:
        self._settings = settings
        self._last: collections.OrderedDict[tuple[UUID, UUID], float] = collections.OrderedDict()

    def admit(self, thread_id: UUID, user_id: UUID) -> datetime:
        """When the indicator expires, if this call may notify; else RESOURCE_EXHAUSTED."""
        now = time.monotonic()
        key = (thread_id, user_id)
        last = self._last.get(key)
        if last is not None and now - last < self._settings.min_interval_s:
            raise ResourceExhausted(
                f"typing is sent at most once per {self._settings.min_interval_s:g} s "
                "per user and thread",
                reason="TYPING_RATE_LIMITED",
                retry_after_s=self._settings.min_interval_s - (now - last),
            )
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self._settings.tracked_max:
            self._last.popitem(last=False)
        return datetime.now(UTC) + timedelta(seconds=self._settings.expires_s)
