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


class Store(Protocol):
    """Keys and credits. Async so that network stores and group-committing SQLite fit alike."""

    async def create_key(
        self, *, key_id: str, key_hash: str, name: str, credits: int, expires_at: float | None, now: float
    ) -> KeyRecord: ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def list_keys(self) -> list[KeyRecord]: ...

    async def revoke_key(self, key_id: str) -> KeyRecord: ...  # UnknownKey

    async def topup(self, key_id: str, credits: int, *, idempotency_key: str, now: float) -> int: ...

    async def balance(self, key_id: str) -> int: ...  # UnknownKey

    async def reserve(self, key_id: str, credits: int, *, ttl_s: float, now: float) -> Reservation: ...

    async def settle(self, reservation_id: str, credits_charged: int, *, now: float) -> int: ...

    async def void(self, reservation_id: str, *, now: float) -> int: ...

    async def sweep_expired(self, *, now: float) -> int: ...

    async def postings(self, key_id: str) -> list[Posting]: ...

    async def close(self) -> None: ...
