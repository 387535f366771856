"""Submit rate limits: a token bucket per API token, refilled at the tier's rate.

Kept in memory: each control-plane process counts for itself. A refusal is a 429 whose
Retry-After says when the next submit fits.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Buckets of tokens idle long enough to be full again are forgotten past this many.
_MAX_BUCKETS = 10_000


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, rate_per_s: float, burst: int) -> float:
        """Take one; returns 0 when allowed, else the seconds until one is there."""
        now = self._clock()
        tokens, at = self._buckets.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - at) * rate_per_s)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate_per_s
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > _MAX_BUCKETS:
            self._forget_full(now, rate_per_s, burst)
        return 0.0

    def _forget_full(self, now: float, rate_per_s: float, burst: int) -> None:
        for key, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * rate_per_s >= burst:
                del self._buckets[key]
