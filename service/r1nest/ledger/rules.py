"""Argument checks every backend applies before it touches storage. Pure functions, no I/O.

Backends call these first, so a bad amount is refused the same way everywhere and never reaches
a transaction. The limits keep every balance exact in SQLite (64-bit), DynamoDB (38 digits) and
JSON clients that read numbers as doubles (2**53).
"""

from __future__ import annotations

import math

from r1nest.errors import StoreError

MAX_CREDITS = 2**53 - 1  # the largest balance or amount any backend holds
MAX_NAME_CHARS = 200
MAX_IDEMPOTENCY_KEY_CHARS = 200
MAX_TTL_S = 30 * 86_400.0


def check_credits(credits: object, *, what: str, minimum: int = 0) -> int:
    # bool is an int subclass; True credits is a bug, not one credit.
    if not isinstance(credits, int) or isinstance(credits, bool):
        raise StoreError(f"{what} must be a whole number of credits, got {credits!r}")
    if credits < minimum or credits > MAX_CREDITS:
        raise StoreError(f"{what} must be between {minimum} and {MAX_CREDITS}, got {credits}")
    return credits


def check_balance_after(balance: int, added: int) -> None:
    if balance + added > MAX_CREDITS:
        raise StoreError(f"balance would exceed {MAX_CREDITS} credits")


def check_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        raise StoreError(f"key name must be a string of at most {MAX_NAME_CHARS} characters")
    return name


def check_idempotency_key(idempotency_key: str) -> str:
    if not isinstance(idempotency_key, str) or not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise StoreError(
            f"idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"
        )
    return idempotency_key


def check_ttl(ttl_s: float) -> float:
    if not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) or not 0 < ttl_s <= MAX_TTL_S:
        raise StoreError(f"reservation ttl must be between 0 and {MAX_TTL_S:.0f} seconds")
    return float(ttl_s)


def check_charge(credits_charged: int, credits_reserved: int) -> int:
    check_credits(credits_charged, what="charged credits")
    if credits_charged > credits_reserved:
        raise StoreError(
            f"cannot charge {credits_charged} credits on a reservation of {credits_reserved}"
        )
    return credits_charged
