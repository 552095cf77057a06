"""Per-key limits as HTTP answers: 429 `rate_limited` with Retry-After.

The limits themselves (`max_concurrency`: requests in flight; `rate_limit_rpm`: requests per
fixed 60 s window) are enforced by the ledger store when it reserves credits, atomically with
the balance check (ledger/base.py), so they hold across every gateway process and replica that
shares the store. Each key may carry its own limits; otherwise the deployment's defaults apply
(R1NEST_MAX_CONCURRENT_PER_KEY, R1NEST_RATE_LIMIT_RPM; 0: no limit).
"""

from __future__ import annotations

import math

from r1nest.errors import KeyLimitReached, RateLimited

MESSAGES = {
    "max_concurrency": "Too many requests in flight for this key; retry when one has finished.",
    "rate_limit_rpm": "Too many requests for this key this minute; retry after the time in Retry-After.",
}


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))


def rate_limited(exc: KeyLimitReached) -> RateLimited:
    return RateLimited(
        MESSAGES.get(exc.limit, "Too many requests for this key."),
        headers={"Retry-After": retry_after_header(exc.retry_after_s)},
    )
