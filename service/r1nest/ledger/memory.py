"""The reference ledger: plain dictionaries in one process.

It obeys every money rule of `base.py` (the contract tests run against it first) and is what
fast tests use. Each method runs to completion without awaiting, so on one event loop every
operation is atomic; do not share one instance between event loops in different threads.

Per-key limits are two counters per key, kept like the stores that share a ledger between
processes keep theirs: open reservations (`_in_flight`, up on reserve, down on the one close)
and reservations in the current 60 s window (`_windows`). Settled usage is a list of settle
records that `usage()` buckets.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import defaultdict

from r1nest.errors import (
    InsufficientCredits,
    InvalidLedgerArgument,
    KeyLimitReached,
    ReservationClosed,
    UnknownKey,
)
from r1nest.ledger import rules
from r1nest.ledger.base import KeyRecord, Posting, PostingKind, Reservation, Usage, UsageBucket


@dataclasses.dataclass(slots=True)
class _PendingReservation:
    key_id: str
    credits_reserved: int
    expires_at: float
    closed: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class _Settled:
    key_id: str
    at: float
    usage: Usage
    credits_charged: int


class MemoryStore:
    def __init__(self) -> None:
        self._keys: dict[str, KeyRecord] = {}
        self._reservations: dict[str, _PendingReservation] = {}
        self._postings: dict[str, list[Posting]] = {}
        self._topups_seen: set[tuple[str, str]] = set()
        self._in_flight: dict[str, int] = defaultdict(int)  # open reservations per key
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (window start, reservations in it)
        self._settled: list[_Settled] = []

    # keys ---------------------------------------------------------------------------------

    async def create_key(
        self, *, key_id: str, key_hash: str, name: str, credits: int, expires_at: float | None, now: float,
        max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
    ) -> KeyRecord:
        expires_at = rules.check_new_key(
            credits=credits, name=name, expires_at=expires_at, max_concurrency=max_concurrency,
            rate_limit_rpm=rate_limit_rpm,
        )
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
            max_concurrency=max_concurrency,
            rate_limit_rpm=rate_limit_rpm,
        )
        self._keys[key_id] = record
        self._postings[key_id] = [Posting(key_id, "grant", credits, now)]
        return record

    async def set_key_limits(
        self, key_id: str, *, max_concurrency: int | None, rate_limit_rpm: int | None
    ) -> KeyRecord:
        rules.check_limits(max_concurrency, rate_limit_rpm)
        record = dataclasses.replace(
            self._key(key_id), max_concurrency=max_concurrency, rate_limit_rpm=rate_limit_rpm
        )
        self._keys[key_id] = record
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

    async def reserve(
        self, key_id: str, credits: int, *, ttl_s: float, now: float,
        max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
    ) -> Reservation:
        rules.check_reservation(
            credits=credits, ttl_s=ttl_s, max_concurrency=max_concurrency, rate_limit_rpm=rate_limit_rpm
        )
        record = self._key(key_id)
        if not record.usable(now):
            raise UnknownKey(f"key {key_id} is revoked or expired")
        if record.remaining_credits < credits:
            raise InsufficientCredits(record.remaining_credits, credits)
        if max_concurrency is not None and self._in_flight[key_id] >= max_concurrency:
            raise KeyLimitReached("max_concurrency", 1.0)
        window, count = self._window(key_id, now)
        if rate_limit_rpm is not None and count >= rate_limit_rpm:
            raise KeyLimitReached("rate_limit_rpm", window + rules.RPM_WINDOW_S - now)
        self._in_flight[key_id] += 1
        self._windows[key_id] = (window, count + 1)
        reservation_id = uuid.uuid4().hex
        expires_at = now + ttl_s
        self._reservations[reservation_id] = _PendingReservation(key_id, credits, expires_at)
        remaining = self._post(key_id, "reserve", -credits, now, reservation_id=reservation_id)
        return Reservation(reservation_id, key_id, credits, expires_at, remaining)

    async def settle(
        self, reservation_id: str, credits_charged: int, *, now: float, usage: Usage | None = None
    ) -> int:
        usage = rules.check_usage(usage) or Usage()
        pending = self._open(reservation_id)
        rules.check_charge(credits_charged, pending.credits_reserved)
        self._closing(pending)
        self._settled.append(_Settled(pending.key_id, now, usage, credits_charged))
        refund = pending.credits_reserved - credits_charged
        return self._post(
            pending.key_id, "settle", refund, now,
            reservation_id=reservation_id, note=f"charged {credits_charged}",
        )

    async def void(self, reservation_id: str, *, now: float) -> int:
        pending = self._open(reservation_id)
        self._closing(pending)
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

    async def usage(
        self, *, key_id: str | None, since: float, until: float, bucket_s: int
    ) -> list[UsageBucket]:
        since, until, bucket_s = rules.check_usage_range(since, until, bucket_s)
        if key_id is not None:
            self._key(key_id)
        sums: dict[float, list[int]] = {}
        for settled in self._settled:
            if (key_id is not None and settled.key_id != key_id) or not since <= settled.at < until:
                continue
            row = sums.setdefault(rules.bucket_start(settled.at, bucket_s), [0, 0, 0, 0, 0])
            row[0] += 1
            row[1] += settled.usage.prompt_tokens
            row[2] += settled.usage.cached_tokens
            row[3] += settled.usage.completion_tokens
            row[4] += settled.credits_charged
        return [UsageBucket(start, *row) for start, row in sorted(sums.items())]

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

    def _window(self, key_id: str, now: float) -> tuple[float, int]:
        """The key's current rate-limit window and its count. A window stored by a later clock
        stays current (a counter never moves back)."""
        window = rules.rpm_window(now)
        stored, count = self._windows.get(key_id, (window, 0))
        return (stored, count) if stored >= window else (window, 0)

    def _closing(self, pending: _PendingReservation) -> None:
        pending.closed = True
        self._in_flight[pending.key_id] -= 1
        assert self._in_flight[pending.key_id] >= 0, "more closes than reservations"

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
