"""Argument checks every backend applies before it touches storage. Pure functions, no I/O.

Backends call these first, so a bad amount is refused the same way everywhere and never reaches
a transaction. The limits keep every balance exact in SQLite (64-bit), DynamoDB (38 digits) and
JSON clients that read numbers as doubles (2**53). Per-key limits and usage queries are checked
here too, so every backend refuses a zero limit or an empty time range alike.
"""

from __future__ import annotations

import math

from r1nest.errors import InvalidLedgerArgument
from r1nest.ledger.base import Usage

MAX_CREDITS = 2**53 - 1  # the largest balance or amount any backend holds
MAX_NAME_CHARS = 200
MAX_IDEMPOTENCY_KEY_CHARS = 200
MAX_TTL_S = 30 * 86_400.0
MAX_EXPIRES_AT = 253_402_300_799.0  # 9999-12-31 23:59:59 UTC: the last instant a date shows


def check_credits(credits: object, *, what: str, minimum: int = 0) -> int:
    # bool is an int subclass; True credits is a bug, not one credit.
    if not isinstance(credits, int) or isinstance(credits, bool):
        raise InvalidLedgerArgument(f"{what} must be a whole number of credits, got {credits!r}")
    if credits < minimum or credits > MAX_CREDITS:
        raise InvalidLedgerArgument(f"{what} must be between {minimum} and {MAX_CREDITS}, got {credits}")
    return credits


def check_balance_after(balance: int, added: int) -> None:
    if balance + added > MAX_CREDITS:
        raise InvalidLedgerArgument(f"balance would exceed {MAX_CREDITS} credits")


def check_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        raise InvalidLedgerArgument(f"key name must be a string of at most {MAX_NAME_CHARS} characters")
    return name


def check_idempotency_key(idempotency_key: str) -> str:
    if not isinstance(idempotency_key, str) or not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidLedgerArgument(
            f"idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"
        )
    return idempotency_key


def check_expires_at(expires_at: object) -> float | None:
    """None (never expires) or finite unix seconds in (0, MAX_EXPIRES_AT]. NaN would make a key
    that never expires in SQLite (NaN is stored as NULL), Infinity one that no JSON can show."""
    if expires_at is None:
        return None
    if not isinstance(expires_at, (int, float)) or isinstance(expires_at, bool):
        raise InvalidLedgerArgument(f"a key's expiry must be unix seconds, got {expires_at!r}")
    value = _as_float(expires_at)
    if not 0 < value <= MAX_EXPIRES_AT:  # False for NaN too
        raise InvalidLedgerArgument(
            f"a key's expiry must be finite unix seconds between 0 and {MAX_EXPIRES_AT:.0f}, got {expires_at!r}"
        )
    return value


def _as_float(number: int | float) -> float:
    try:
        return float(number)
    except OverflowError:  # an int beyond any float
        return math.inf


def check_ttl(ttl_s: float) -> float:
    if not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool) or not 0 < _as_float(ttl_s) <= MAX_TTL_S:
        raise InvalidLedgerArgument(f"reservation ttl must be between 0 and {MAX_TTL_S:.0f} seconds")
    return float(ttl_s)


def check_charge(credits_charged: int, credits_reserved: int) -> int:
    check_credits(credits_charged, what="charged credits")
    if credits_charged > credits_reserved:
        raise InvalidLedgerArgument(
            f"cannot charge {credits_charged} credits on a reservation of {credits_reserved}"
        )
    return credits_charged


MAX_CONCURRENCY_LIMIT = 100_000  # open reservations of one key at once
MAX_RATE_LIMIT_RPM = 10_000_000  # reservations of one key per 60 s window
MAX_TOKENS = MAX_CREDITS  # token counts of one request
MAX_BUCKET_S = 100 * 366 * 86_400  # one usage bucket (a century: "all time" fits in one)


def check_limit(value: object, *, what: str, maximum: int) -> int | None:
    """A per-key limit: None (no override / unlimited) or a whole number in 1..maximum. Zero is
    refused: a key that may never reserve is a revoked key."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise InvalidLedgerArgument(
            f"{what} must be a whole number between 1 and {maximum}, or none; got {value!r}"
        )
    return value


def check_max_concurrency(value: object) -> int | None:
    return check_limit(value, what="max_concurrency", maximum=MAX_CONCURRENCY_LIMIT)


def check_rate_limit_rpm(value: object) -> int | None:
    return check_limit(value, what="rate_limit_rpm", maximum=MAX_RATE_LIMIT_RPM)


def check_limits(max_concurrency: object, rate_limit_rpm: object) -> tuple[int | None, int | None]:
    """A key's two limits (set_key_limits, create_key, reserve)."""
    return check_max_concurrency(max_concurrency), check_rate_limit_rpm(rate_limit_rpm)


def check_new_key(
    *, credits: object, name: str, expires_at: object, max_concurrency: object, rate_limit_rpm: object
) -> float | None:
    """Every argument of create_key; returns the expiry as stored."""
    check_credits(credits, what="initial credits")
    check_name(name)
    expiry = check_expires_at(expires_at)
    check_limits(max_concurrency, rate_limit_rpm)
    return expiry


def check_reservation(*, credits: object, ttl_s: float, max_concurrency: object, rate_limit_rpm: object) -> None:
    """Every argument of reserve but the key id and the time."""
    check_credits(credits, what="reserved credits")
    check_ttl(ttl_s)
    check_limits(max_concurrency, rate_limit_rpm)


def check_usage(usage: object) -> Usage | None:
    """None or a Usage of whole, non-negative token counts. Not refused: cached_tokens above
    prompt_tokens (the engine's report, recorded as it came; a settle is never lost over it)."""
    if usage is None:
        return None
    if not isinstance(usage, Usage):
        raise InvalidLedgerArgument(f"usage must be a Usage or none, got {type(usage).__name__}")
    for what in ("prompt_tokens", "cached_tokens", "completion_tokens"):
        count = getattr(usage, what)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_TOKENS:
            raise InvalidLedgerArgument(
                f"usage {what} must be a whole number between 0 and {MAX_TOKENS}, got {count!r}"
            )
    return usage


def check_usage_range(since: object, until: object, bucket_s: object) -> tuple[float, float, int]:
    """A usage query's bounds: finite unix seconds with since < until, and a whole bucket size in
    seconds (1..MAX_BUCKET_S)."""
    bounds = []
    for what, value in (("since", since), ("until", until)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(_as_float(value)):  # type: ignore[arg-type]
            raise InvalidLedgerArgument(f"usage {what} must be finite unix seconds, got {value!r}")
        bounds.append(_as_float(value))  # type: ignore[arg-type]
    if not bounds[0] < bounds[1]:
        raise InvalidLedgerArgument(f"usage since ({since!r}) must be before until ({until!r})")
    if not isinstance(bucket_s, int) or isinstance(bucket_s, bool) or not 1 <= bucket_s <= MAX_BUCKET_S:
        raise InvalidLedgerArgument(
            f"usage bucket_s must be whole seconds between 1 and {MAX_BUCKET_S}, got {bucket_s!r}"
        )
    return bounds[0], bounds[1], bucket_s


RPM_WINDOW_S = 60


def rpm_window(now: float) -> float:
    """Start of the fixed 60 s rate-limit window holding `now` (a multiple of 60 s of unix time)."""
    return float(math.floor(now / RPM_WINDOW_S) * RPM_WINDOW_S)


def bucket_start(at: float, bucket_s: int) -> float:
    """Start of the usage bucket holding `at`: floor(at / bucket_s) * bucket_s."""
    return float(math.floor(at / bucket_s) * bucket_s)
