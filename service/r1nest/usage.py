"""Usage windows and their JSON: the one place that reads `from` / `to` / `bucket` and shapes buckets.

A window is [since, until) cut into buckets of one hour or one UTC day. `since` is floored to a
bucket boundary so every bucket is whole (the last one may still be running); the store sums
settled requests into the same buckets (`Store.usage`, bucket start = floor(at / bucket_s) *
bucket_s). The admin API (`GET /admin/usage`), the key's own `GET /v1/usage`, `r1nest usage` and
the overview's usage panel all go through here, so a window means the same everywhere.

Times are accepted as unix seconds ("1764547200", "1764547200.5"), ISO 8601 ("2026-11-30",
"2026-11-30T12:00:00Z", "2026-11-30T14:00:00+02:00"; without an offset: UTC) or a span back from
now ("90m", "24h", "7d", "2w"). Anything else is a BadRequest naming the parameter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from r1nest.errors import BadRequest
from r1nest.ledger.base import UsageBucket
from r1nest.ledger.rules import bucket_start

BUCKETS: dict[str, int] = {"hour": 3600, "day": 86400}
MAX_BUCKETS = 2000
DEFAULT_BUCKET = "day"
DEFAULT_SPAN_S = 30 * 86400
MAX_UNIX_S = 253_402_300_799.0  # 9999-12-31T23:59:59Z, the last second ISO 8601 writes with 4 digits
MAX_TIME_CHARS = 64

_UNIX = re.compile(r"^\d{1,12}(?:\.\d{1,20})?$", re.ASCII)
_SPAN = re.compile(r"^(\d{1,7})(m|h|d|w)$", re.ASCII)
_SPAN_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_ISO_CHARS = re.compile(r"^[0-9]{4}[0-9T:+\-.Zz ]*$")
TOTAL_FIELDS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "credits")


@dataclass(frozen=True)
class Window:
    since: float  # a multiple of bucket_s
    until: float
    bucket: str  # a name in BUCKETS
    bucket_s: int

    @property
    def bucket_count(self) -> int:
        """How many buckets the window touches (the last one may be cut by `until`)."""
        return math.ceil((self.until - self.since) / self.bucket_s)

    def starts(self) -> list[float]:
        """Every bucket start of the window, oldest first."""
        return [self.since + i * self.bucket_s for i in range(self.bucket_count)]


@dataclass(frozen=True, slots=True)
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    credits: int = 0

    def as_json(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in TOTAL_FIELDS}


def parse_time(value: str, *, now: float, param: str) -> float:
    """Unix seconds from unix seconds, ISO 8601 or a span back from `now`; BadRequest otherwise."""
    text = value.strip()
    if not text or len(text) > MAX_TIME_CHARS:
        raise _bad(param, f"expected unix seconds, an ISO 8601 time or a span like 24h or 7d, got {_shown(text)}")
    if _UNIX.match(text):
        seconds = float(text)
    elif match := _SPAN.match(text):
        seconds = now - int(match.group(1)) * _SPAN_UNIT_S[match.group(2)]
    else:
        seconds = _iso_seconds(text, param)
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_UNIX_S):
        raise _bad(param, f"{_shown(text)} is out of range: not between 1970 and 9999")
    return seconds


def _iso_seconds(text: str, param: str) -> float:
    if not _ISO_CHARS.match(text):
        raise _bad(
            param, f"{_shown(text)} is not unix seconds, an ISO 8601 time (2026-11-30T12:00:00Z) "
            "or a span back from now (90m, 24h, 7d, 2w)",
        )
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise _bad(param, f"{_shown(text)} is not a valid ISO 8601 date or time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.timestamp()
    except (OverflowError, OSError, ValueError):
        raise _bad(param, f"{_shown(text)} is out of range: not between 1970 and 9999") from None


def parse_window(*, start: str | None, end: str | None, bucket: str | None, now: float) -> Window:
    """The window a query names. Defaults: bucket "day", end now, start 30 days before end."""
    name = DEFAULT_BUCKET if bucket is None or not bucket.strip() else bucket.strip().lower()
    if name not in BUCKETS:
        raise _bad("bucket", f"bucket must be one of {', '.join(BUCKETS)}, got {_shown(bucket or '')}")
    bucket_s = BUCKETS[name]
    until = now if end is None or not end.strip() else parse_time(end, now=now, param="to")
    if start is None or not start.strip():
        start_s = max(0.0, until - DEFAULT_SPAN_S)
    else:
        start_s = parse_time(start, now=now, param="from")
    if not start_s < until:
        raise _bad("from", f"the start ({_iso(start_s)}) must be before the end ({_iso(until)})")
    window = Window(since=bucket_start(start_s, bucket_s), until=until, bucket=name, bucket_s=bucket_s)
    if window.bucket_count > MAX_BUCKETS:
        raise _bad(
            "from", f"the window spans {window.bucket_count} {name} buckets, more than {MAX_BUCKETS}: "
            "shorten it or use bucket=day",
        )
    return window


def recent_window(bucket: str, count: int, *, now: float) -> Window:
    """The last `count` whole buckets, the one holding `now` included (it ends in the future, where
    nothing is settled yet, so the window is never empty)."""
    bucket_s = BUCKETS[bucket]
    if not 1 <= count <= MAX_BUCKETS:
        raise ValueError(f"count must be 1..{MAX_BUCKETS}, got {count}")
    current = bucket_start(now, bucket_s)
    since = current - (count - 1) * bucket_s
    return Window(since=since, until=current + bucket_s, bucket=bucket, bucket_s=bucket_s)


def totals(buckets: list[UsageBucket] | tuple[UsageBucket, ...]) -> Totals:
    return Totals(**{name: sum(getattr(b, name) for b in buckets) for name in TOTAL_FIELDS})


def filled(window: Window, buckets: list[UsageBucket] | tuple[UsageBucket, ...]) -> list[UsageBucket]:
    """Every bucket of the window, oldest first, zeros where the store has none (for charts).
    A bucket outside the window is left out."""
    by_start = {b.start: b for b in buckets}
    return [by_start.get(start) or UsageBucket(start, 0, 0, 0, 0, 0) for start in window.starts()]


def iso(seconds: float) -> str:
    """`2026-11-30T14:00:00Z`: a bucket start as ISO 8601 UTC."""
    return _iso(seconds)


def usage_json(window: Window, buckets: list[UsageBucket], *, key_id: str | None) -> dict[str, Any]:
    """The answer of /admin/usage, /v1/usage and `r1nest usage --json`."""
    return {
        "object": "usage",
        "key": key_id,
        "bucket": window.bucket,
        "from": window.since,
        "to": window.until,
        "data": [
            {"start": b.start, "start_iso": _iso(b.start), **{name: getattr(b, name) for name in TOTAL_FIELDS}}
            for b in buckets
        ],
        "totals": totals(buckets).as_json(),
    }


def from_json(body: object) -> tuple[Window, list[UsageBucket]]:
    """The window and buckets of a usage_json answer (from a gateway); ValueError when it is not one."""
    if not isinstance(body, dict) or body.get("object") != "usage":
        raise ValueError("not a usage object")
    name = body.get("bucket")
    if not isinstance(name, str) or name not in BUCKETS:
        raise ValueError(f"unknown bucket {name!r}")
    since, until = _number(body.get("from")), _number(body.get("to"))
    if since is None or until is None or not 0 <= since < until <= MAX_UNIX_S:
        raise ValueError("from/to are not a window")
    window = Window(since=since, until=until, bucket=name, bucket_s=BUCKETS[name])
    if window.bucket_count > MAX_BUCKETS:
        raise ValueError("too many buckets")
    data = body.get("data")
    if not isinstance(data, list) or len(data) > MAX_BUCKETS:
        raise ValueError("data is not a list of buckets")
    buckets = []
    for entry in data:
        start = _number(entry.get("start")) if isinstance(entry, dict) else None
        if start is None:
            raise ValueError("a bucket without a start")
        counts = [entry.get(field) for field in TOTAL_FIELDS]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("a bucket with counts that are not whole numbers")
        buckets.append(UsageBucket(start, *counts))
    return window, buckets


def _number(value: object) -> float | None:
    """A finite JSON number as a float; None for anything else (booleans included)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _bad(param: str, message: str) -> BadRequest:
    return BadRequest(message, param=param)
