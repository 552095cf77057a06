"""Argument checks every backend applies before it touches storage. Pure functions, no I/O.

Backends call these first, so a bad amount is refused the same way everywhere and never reaches
a transaction. The limits keep every balance exact in SQLite (64-bit), DynamoDB (38 digits) and
JSON clients that read numbers as doubles (2**53).
"""

from __future__ import annotations

import math

from r1nest.errors import InvalidLedgerArgument

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
