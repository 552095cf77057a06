"""The one owner of a request's credits: reserve the worst case before the engine runs, settle
at actual usage after. Each reservation is closed exactly once (settled or voided), never above
what was reserved.

    grant = await reserve(...)          # max_tokens decided, worst case reserved
    ...relay with grant.max_tokens...   # proxy.py: returns an Outcome, never touches credits
    balance = await grant.close(outcome)

An `Outcome` says what the relay produced: usage the engine `reported`, usage the gateway
`estimated` (an engine that sent none), or `nothing` (a failure before any token reached the
client: voided, free).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable, Literal

from r1nest.errors import InsufficientCredits, PaymentRequired, ReservationClosed, StoreError
from r1nest.gateway import pricing
from r1nest.gateway.metrics import Metrics
from r1nest.gateway.pricing import Price
from r1nest.gateway.settlements import Settlements
from r1nest.gateway.shaping import Shaped
from r1nest.ledger.base import KeyRecord, Reservation, Store, Usage

log = logging.getLogger("r1nest.gateway.metering")

RESERVE_ATTEMPTS = 4  # a concurrent spender can change the balance between read and reserve


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a relay produced, as settlement reads it."""

    basis: Literal["reported", "estimated", "nothing"]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, served from the engine's prefix cache


NOTHING = Outcome("nothing")


@dataclass(frozen=True, slots=True)
class Charge:
    prompt_tokens: int
    completion_tokens: int
    credits: int
    clamped: bool
    cached_tokens: int = 0

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.cached_tokens, self.completion_tokens)


class Grant:
    """A reservation in flight and the `max_tokens` it pays for. `close` (or `settle` / `void`)
    closes it; later calls are no-ops."""

    def __init__(
        self, store: Store, reservation: Reservation, *, price: Price, prompt_tokens_bound: int,
        max_tokens: int, choices: int, clock: Callable[[], float], metrics: Metrics,
        settlements: Settlements | None = None,
    ) -> None:
        self.max_tokens = max_tokens
        completion_tokens_bound = max_tokens * choices
        self.store = store
        self.settlements = settlements or Settlements(store, None, clock=clock)
        self.reservation = reservation
        self.price = price
        self.prompt_tokens_bound = prompt_tokens_bound
        self.completion_tokens_bound = completion_tokens_bound
        self.clock = clock
        self.metrics = metrics
        self.closed = False
        self.charge: Charge | None = None

    @property
    def credits_reserved(self) -> int:
        return self.reservation.credits_reserved

    @property
    def remaining_credits(self) -> int:
        """The key's balance once this reservation was taken."""
        return self.reservation.remaining_credits

    async def close(self, outcome: Outcome) -> int:
        """Settle what the relay produced (void when nothing); the balance afterwards."""
        if outcome.basis == "nothing" or not (outcome.prompt_tokens or outcome.completion_tokens):
            return await self.void()
        return await self.settle(outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens)

    async def settle(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        """Charge actual usage, each part clamped to its bound (prompt to the prompt bound,
        completion to max_tokens x choices, cached to the prompt) and the total to the
        reservation; the balance after. Token counts are recorded with the settlement."""
        clamped = prompt_tokens > self.prompt_tokens_bound or completion_tokens > self.completion_tokens_bound
        prompt_charged = min(prompt_tokens, self.prompt_tokens_bound)
        cached_tokens = min(max(cached_tokens, 0), prompt_charged)
        credits, over = pricing.settle_amount(
            self.price, self.credits_reserved, prompt_charged,
            min(completion_tokens, self.completion_tokens_bound), cached_tokens,
        )
        clamped = clamped or over
        if clamped:
            self.metrics.usage_clamped += 1
            log.warning(
                "engine reported usage beyond the reservation; charged at most the reservation "
                "key_id=%s prompt_tokens=%d completion_tokens=%d credits_reserved=%d credits_charged=%d",
                self.reservation.key_id, prompt_tokens, completion_tokens, self.credits_reserved, credits,
            )
            prompt_tokens = min(prompt_tokens, self.prompt_tokens_bound)
            completion_tokens = min(completion_tokens, self.completion_tokens_bound)
        return await self._close(Charge(prompt_tokens, completion_tokens, credits, clamped, cached_tokens))

    async def void(self) -> int:
        return await self._close(Charge(0, 0, 0, False))

    async def _close(self, charge: Charge) -> int:
        if self.closed:
            return self.reservation.remaining_credits
        self.closed = True
        self.charge = charge
        now = self.clock()
        reservation_id = self.reservation.reservation_id
        try:
            if charge.credits or charge.prompt_tokens or charge.completion_tokens:
                # retried while the ledger is unavailable, then journaled: a delivered answer is paid
                # (and counted in usage, even when its price is zero)
                settled = await asyncio.shield(
                    self.settlements.settle(reservation_id, self.reservation.key_id, charge.credits, charge.usage)
                )
                balance = self.reservation.remaining_credits if settled is None else settled
            else:
                # shielded: a client that goes away mid-write must not leave the ledger half-told
                balance = await asyncio.shield(self.store.void(reservation_id, now=now))
        except ReservationClosed:
            log.error("reservation already closed (swept?) key_id=%s", self.reservation.key_id)
            return await self._balance_or_estimate()
        except StoreError as exc:  # a void that failed: the reservation expires and is swept
            log.error("void failed; the sweeper will void it key_id=%s error=%s", self.reservation.key_id, exc)
            return self.reservation.remaining_credits
        self.metrics.observe_charge(charge.prompt_tokens, charge.completion_tokens, charge.credits, charge.cached_tokens)
        return balance

    async def _balance_or_estimate(self) -> int:
        try:
            return await self.store.balance(self.reservation.key_id)
        except StoreError:
            return self.reservation.remaining_credits


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """The per-key limits a reservation is held to (None: unlimited), enforced by the store."""

    max_concurrency: int | None = None
    rate_limit_rpm: int | None = None

    @classmethod
    def resolve(cls, record: KeyRecord, *, default_concurrency: int, default_rpm: int) -> "KeyLimits":
        """The key's own limits, else the deployment's defaults (0: no limit)."""
        concurrency = record.max_concurrency if record.max_concurrency is not None else default_concurrency
        rpm = record.rate_limit_rpm if record.rate_limit_rpm is not None else default_rpm
        return cls(concurrency or None, rpm or None)


UNLIMITED = KeyLimits()


async def reserve(
    store: Store, key_id: str, balance: int, shaped: Shaped, *, price: Price, cap: int,
    ttl_s: float, clock: Callable[[], float], metrics: Metrics, settlements: Settlements | None = None,
    limits: KeyLimits = UNLIMITED,
) -> Grant:
    """Decide max_tokens (what was asked, or the context left, at most `cap`, lowered to what
    the balance affords) and reserve its worst case, within the key's limits.

    InsufficientCredits (with the current balance) when not even one token is affordable;
    KeyLimitReached when the key has as many requests in flight, or in this minute, as allowed.
    """
    limit = shaped.max_tokens_limit(cap)  # what was asked, or the context left (at most cap)
    for _ in range(RESERVE_ATTEMPTS):
        affordable = pricing.affordable_completion_tokens(
            price, balance, shaped.prompt_tokens_bound, choices=shaped.choices, cap=limit
        )
        if affordable < 1:
            break
        max_tokens = min(limit, affordable)
        credits = pricing.cost(price, shaped.prompt_tokens_bound, max_tokens * shaped.choices)
        try:
            reservation = await store.reserve(
                key_id, credits, ttl_s=ttl_s, now=clock(),
                max_concurrency=limits.max_concurrency, rate_limit_rpm=limits.rate_limit_rpm,
            )
        except InsufficientCredits as exc:
            balance = exc.remaining_credits
            continue
        return Grant(
            store, reservation, price=price, prompt_tokens_bound=shaped.prompt_tokens_bound,
            max_tokens=max_tokens, choices=shaped.choices, clock=clock, metrics=metrics,
            settlements=settlements,
        )
    raise InsufficientCredits(balance, pricing.cost(price, shaped.prompt_tokens_bound, shaped.choices))


def payment_required(exc: InsufficientCredits) -> PaymentRequired:
    return PaymentRequired(
        f"Not enough credits: this request needs at least {exc.needed_credits} credits "
        f"(its prompt and one completion token); the key has {exc.remaining_credits}."
    )
