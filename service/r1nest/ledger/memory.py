"""The reference ledger: plain dictionaries in one process.

It obeys every money rule of `base.py` (the contract tests run against it first) and is what
fast tests use. Each method runs to completion without awaiting, so on one event loop every
operation is atomic; do not share one instance between event loops in different threads.
"""

from __future__ import annotations

import dataclasses
import uuid

from r1nest.errors import InsufficientCredits, InvalidLedgerArgument, ReservationClosed, UnknownKey
from r1nest.ledger import rules
from r1nest.ledger.base import KeyRecord, Posting, PostingKind, Reservation


@dataclasses.dataclass(slots=True)
class _PendingReservation:
    key_id: str
    credits_reserved: int
    expires_at: float
    closed: bool = False


class MemoryStore:
    def __init__(self) -> None:
        self._keys: dict[str, KeyRecord] = {}
        self._reservations: dict[str, _PendingReservation] = {}
        self._postings: dict[str, list[Posting]] = {}
        self._topups_seen: set[tuple[str, str]] = set()

    # keys ---------------------------------------------------------------------------------

    async def create_key(
        self, *, key_id: str, key_hash: str, name: str, credits: int, expires_at: float | None, now: float
    ) -> KeyRecord:
        rules.check_credits(credits, what="initial credits")
        rules.check_name(name)
        expires_at = rules.check_expires_at(expires_at)
        if key_id in self._keys:
            raise InvalidLedgerArgument(f"key id {key_id} already exists")
        record = KeyRecord(
            key_id=key_id,
            name=name,
            key_hash=key_hash,
            created_at=now,
            expires_at=expires_at,
            revoked=False,
            remaining_credits=credits,
        )
        self._keys[key_id] = record
        self._postings[key_id] = [Posting(key_id, "grant", credits, now)]
        return record

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    async def list_keys(self) -> list[KeyRecord]:
        return sorted(self._keys.values(), key=lambda k: (k.created_at, k.key_id))

    async def revoke_key(self, key_id: str) -> KeyRecord:
        record = dataclasses.replace(self._key(key_id), revoked=True)
        self._keys[key_id] = record
        return record

    # credits ------------------------------------------------------------------------------

    async def topup(self, key_id: str, credits: int, *, idempotency_key: str, now: float) -> int:
        rules.check_credits(credits, what="top-up credits", minimum=1)
        rules.check_idempotency_key(idempotency_key)
        record = self._key(key_id)
        if (key_id, idempotency_key) in self._topups_seen:
            return record.remaining_credits
        rules.check_balance_after(record.remaining_credits, credits)
        self._topups_seen.add((key_id, idempotency_key))
        return self._post(key_id, "topup", credits, now, note=f"idempotency-key {idempotency_key}")

    async def balance(self, key_id: str) -> int:
        return self._key(key_id).remaining_credits

    async def reserve(self, key_id: str, credits: int, *, ttl_s: float, now: float) -> Reservation:
        rules.check_credits(credits, what="reserved credits")
        rules.check_ttl(ttl_s)
        record = self._key(key_id)
        if not record.usable(now):
            raise UnknownKey(f"key {key_id} is revoked or expired")
        if record.remaining_credits < credits:
            raise InsufficientCredits(record.remaining_credits, credits)
        reservation_id = uuid.uuid4().hex
        expires_at = now + ttl_s
        self._reservations[reservation_id] = _PendingReservation(key_id, credits, expires_at)
        remaining = self._post(key_id, "reserve", -credits, now, reservation_id=reservation_id)
        return Reservation(reservation_id, key_id, credits, expires_at, remaining)

    async def settle(self, reservation_id: str, credits_charged: int, *, now: float) -> int:
        pending = self._open(reservation_id)
        rules.check_charge(credits_charged, pending.credits_reserved)
        pending.closed = True
        refund = pending.credits_reserved - credits_charged
        return self._post(
            pending.key_id, "settle", refund, now,
            reservation_id=reservation_id, note=f"charged {credits_charged}",
        )

    async def void(self, reservation_id: str, *, now: float) -> int:
        pending = self._open(reservation_id)
        pending.closed = True
        return self._post(pending.key_id, "void", pending.credits_reserved, now, reservation_id=reservation_id)

    async def sweep_expired(self, *, now: float) -> int:
        expired = [
            rid for rid, r in self._reservations.items() if not r.closed and r.expires_at <= now
        ]
        for reservation_id in expired:
            await self.void(reservation_id, now=now)
        return len(expired)

    async def postings(self, key_id: str) -> list[Posting]:
        self._key(key_id)
        return list(self._postings[key_id])

    async def close(self) -> None:
        return None

    # helpers ------------------------------------------------------------------------------

    def _key(self, key_id: str) -> KeyRecord:
        record = self._keys.get(key_id)
        if record is None:
            raise UnknownKey(f"no key with id {key_id}")
        return record

    def _open(self, reservation_id: str) -> _PendingReservation:
        pending = self._reservations.get(reservation_id)
        if pending is None:
            raise InvalidLedgerArgument(f"no reservation with id {reservation_id}")
        if pending.closed:
            raise ReservationClosed(f"reservation {reservation_id} is already closed")
        return pending

    def _post(
        self, key_id: str, kind: PostingKind, credits: int, now: float, *,
        reservation_id: str | None = None, note: str = "",
    ) -> int:
        record = self._keys[key_id]
        remaining = record.remaining_credits + credits
        assert 0 <= remaining <= rules.MAX_CREDITS, "a balance left its bounds"
        self._keys[key_id] = dataclasses.replace(record, remaining_credits=remaining)
        self._postings[key_id].append(Posting(key_id, kind, credits, now, reservation_id, note))
        return remaining
