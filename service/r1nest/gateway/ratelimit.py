"""Per-key request rate limit (429 + Retry-After): a token bucket per key id, in this process.

`rate_limit_rpm` requests per minute, with bursts of up to a tenth of that (at least one).
Off when the setting is 0. Bounded: at most MAX_TRACKED_KEYS buckets; the stalest go first.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Callable

MAX_TRACKED_KEYS = 100_000


class RateLimiter:
    def __init__(self, requests_per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        assert requests_per_minute > 0
        self.rate_per_s = requests_per_minute / 60.0
        self.burst = max(1.0, requests_per_minute / 10.0)
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key id -> (tokens, at)

    def acquire(self, key_id: str) -> float | None:
        """None if the request may go; else the seconds to wait before retrying."""
        now = self.clock()
        tokens, at = self._buckets.pop(key_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key_id] = (tokens, now)
        if len(self._buckets) > MAX_TRACKED_KEYS:
            self._buckets.popitem(last=False)
        return None if allowed else (1.0 - tokens) / self.rate_per_s


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))
