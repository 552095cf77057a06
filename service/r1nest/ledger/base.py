"""The store interface every ledger backend implements, and the records it returns.

Money rules (tests/ledger/test_contract.py holds every backend to them):
- balances and amounts are integer credits; a balance never goes below zero;
- `reserve` takes credits out of the balance into a pending reservation, or raises
  InsufficientCredits and changes nothing;
- each reservation is closed exactly once: `settle(charged)` with 0 <= charged <= reserved
  returns reserved - charged to the balance; `void` returns all of it; a second close raises
  ReservationClosed and changes nothing;
- `sweep_expired(now)` voids every pending reservation whose deadline has passed (a crashed
  gateway's leftovers) and returns how many it voided;
- `topup` with an idempotency key already seen for that key id changes nothing and returns the
  current balance;
- every change of balance is recorded as a Posting; balance == sum of postings.

Per-key limits (enforced by `reserve`, atomically with the balance check, so that they hold
across every gateway process and replica sharing the store):
- `max_concurrency`: at most this many reservations of the key open (not yet settled, voided or
  swept) at once; one more raises KeyLimitReached("max_concurrency", 1.0) and changes nothing;
- `rate_limit_rpm`: at most this many reservations of the key per fixed 60-second window
  (windows start at multiples of 60 s of unix time); one more raises
  KeyLimitReached("rate_limit_rpm", seconds until the next window) and changes nothing. A refused
  reservation does not count.
`reserve` takes the limits to apply (the gateway resolves key override vs deployment default);
None means unlimited. The key's own limits live on its KeyRecord. Every reservation counts in
its window, limited or not. When several refusals apply, a store reports the first of: unusable
key, credits, max_concurrency, rate_limit_rpm. A window another process (whose clock runs ahead)
already opened is the one a reservation counts in, so retry_after_s may exceed 60.

Usage: `settle(..., usage=Usage(...))` records the request's token counts with its settle
posting. `usage()` sums settled requests into fixed buckets of `bucket_s` seconds (bucket start
= floor(at / bucket_s) * bucket_s, unix time, so days are UTC days), for one key or all keys,
over postings with since <= at < until. Voided reservations are not requests; a settle without
usage counts as a request with zero tokens. `credits` is what was charged (reserved - refund).
`usage(key_id=<unknown id>)` raises UnknownKey. A cached count above the prompt count is
recorded as given (a settle is never refused over usage numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

PostingKind = Literal["grant", "topup", "reserve", "settle", "void"]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    name: str
    key_hash: str  # sha256 hex of the whole plaintext key
    created_at: float  # unix seconds
    expires_at: float | None
    revoked: bool
    remaining_credits: int
    max_concurrency: int | None = None  # open reservations at once; None: the deployment default
    rate_limit_rpm: int | None = None  # reservations per 60 s window; None: the deployment default

    def usable(self, now: float) -> bool:
        return not self.revoked and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    key_id: str
    credits_reserved: int
    expires_at: float
    remaining_credits: int  # the key's balance right after the reservation


@dataclass(frozen=True, slots=True)
class Posting:
    key_id: str
    kind: PostingKind
    credits: int  # signed change of the balance
    at: float
    reservation_id: str | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request, recorded when it settles."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, served from the engine's prefix cache
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class UsageBucket:
    start: float  # unix seconds, a multiple of the bucket size
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    credits: int  # charged



class Store(Protocol):
    """Keys and credits. Async so that network stores and group-committing SQLite fit alike."""

    async def create_key(
        self, *, key_id: str, key_hash: str, name: str, credits: int, expires_at: float | None, now: float,
        max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
    ) -> KeyRecord: ...

    async def set_key_limits(
        self, key_id: str, *, max_concurrency: int | None, rate_limit_rpm: int | None
    ) -> KeyRecord: ...  # UnknownKey; both replaced (None clears the override)

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def list_keys(self) -> list[KeyRecord]: ...

    async def revoke_key(self, key_id: str) -> KeyRecord: ...  # UnknownKey

    async def topup(self, key_id: str, credits: int, *, idempotency_key: str, now: float) -> int: ...

    async def balance(self, key_id: str) -> int: ...  # UnknownKey

    async def reserve(
        self, key_id: str, credits: int, *, ttl_s: float, now: float,
        max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
    ) -> Reservation: ...  # InsufficientCredits, KeyLimitReached, UnknownKey

    async def settle(
        self, reservation_id: str, credits_charged: int, *, now: float, usage: Usage | None = None
    ) -> int: ...

    async def void(self, reservation_id: str, *, now: float) -> int: ...

    async def sweep_expired(self, *, now: float) -> int: ...

    async def postings(self, key_id: str) -> list[Posting]: ...

    async def usage(
        self, *, key_id: str | None, since: float, until: float, bucket_s: int
    ) -> list[UsageBucket]: ...  # buckets with at least one request, oldest first

    async def close(self) -> None: ...
