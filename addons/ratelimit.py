"""Requests per minute per key: a token bucket per key (burst = the per-minute limit).

The proxy answers 429 with ``Retry-After`` when ``check`` returns a delay. A bucket left
alone for a minute is full again, which is what a missing bucket means, so idle keys are
dropped and memory stays bounded by the keys active in the last minute.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

WINDOW = 60.0  # seconds: the limit is per minute, and an idle bucket refills in this time


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._pruned = clock()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key_id: str, limit_rpm: int) -> float | None:
        """Take one request from ``key_id``'s bucket: None if allowed, else seconds to wait.

        ``key_id`` is whatever identifies the budget (a masked key, or key and route)."""
        now = self._clock()
        if now - self._pruned >= WINDOW:
            self._prune(now)
        rate = limit_rpm / WINDOW
        tokens, at = self._buckets.get(key_id, (float(limit_rpm), now))
        tokens = min(float(limit_rpm), tokens + (now - at) * rate)
        if tokens >= 1.0:
            self._buckets[key_id] = (tokens - 1.0, now)
            return None
        self._buckets[key_id] = (tokens, now)
        return (1.0 - tokens) / rate

    @staticmethod
    def retry_after(delay: float) -> str:
        """The ``Retry-After`` header value: whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(delay)))

    def _prune(self, now: float) -> None:
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < WINDOW}
        self._pruned = now
