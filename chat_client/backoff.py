"""Capped exponential backoff with jitter, and the server's RetryInfo hint on top."""

from __future__ import annotations

import random
from dataclasses import dataclass

from chat_client.errors import ChatError


@dataclass(frozen=True)
class Backoff:
    """Delays of `initial_s`, doubling (`multiplier`) up to `max_s`, each jittered to
    50-100% of its value so that clients cut off together do not return together
    (the same shape as the services' own listener reconnects)."""

    initial_s: float = 0.05
    max_s: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s or self.multiplier < 1:
            raise ValueError("need 0 < initial_s <= max_s and multiplier >= 1")

    def start(self) -> Attempts:
        return Attempts(self)


class Attempts:
    """The delays of one run of retries."""

    def __init__(self, policy: Backoff) -> None:
        self.policy = policy
        self.failures = 0
        self._next = policy.initial_s

    def delay_after(self, error: ChatError) -> float:
        """How long to wait after `error`: the server's RetryInfo when it gave one
        (it knows when a slot frees up), else the next jittered backoff step."""
        self.failures += 1
        step = self._next
        self._next = min(self._next * self.policy.multiplier, self.policy.max_s)
        if error.retry_delay_s is not None:
            return error.retry_delay_s
        return step * random.uniform(0.5, 1.0)  # jitter, not a secret

    def reset(self) -> None:
        self.failures = 0
        self._next = self.policy.initial_s
