"""Credits as integers: what a request may cost and what it did cost. Pure functions.

A deployment prices tokens in credits per 1,000,000 prompt tokens and per 1,000,000 completion
tokens (reasoning tokens are completion tokens), rounded up per request, with an optional
minimum per request. A request that used no tokens costs nothing.

Prompt tokens the engine served from its prefix cache (`prompt_tokens_details.cached_tokens`)
cost `cached_prompt_per_mtok` instead, which is at most the prompt price (settings refuse more),
so a reservation that prices every prompt token as a miss is always enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from r1nest.settings import Settings

TOKENS_PER_MTOK = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    prompt_per_mtok: int
    completion_per_mtok: int
    min_per_request: int = 0
    cached_prompt_per_mtok: int | None = None  # None: the prompt price

    def __post_init__(self) -> None:
        for name in ("prompt_per_mtok", "completion_per_mtok", "min_per_request"):
            value = getattr(self, name)
            assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, name
        cached = self.cached_prompt_per_mtok
        assert cached is None or (isinstance(cached, int) and 0 <= cached <= self.prompt_per_mtok)

    @property
    def cached_per_mtok(self) -> int:
        return self.prompt_per_mtok if self.cached_prompt_per_mtok is None else self.cached_prompt_per_mtok

    @classmethod
    def from_settings(cls, settings: Settings) -> "Price":
        pricing = settings.pricing
        return cls(
            prompt_per_mtok=pricing.prompt_per_mtok,
            completion_per_mtok=pricing.completion_per_mtok,
            min_per_request=pricing.min_per_request,
            cached_prompt_per_mtok=pricing.cached_prompt_per_mtok,
        )


def cost(price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
    """Credits for a request that used these tokens (`cached_tokens` of the prompt tokens came
    from the prefix cache): ceil of the exact price, at least the minimum."""
    assert prompt_tokens >= 0 and completion_tokens >= 0 and 0 <= cached_tokens <= prompt_tokens
    if prompt_tokens == 0 and completion_tokens == 0:
        return 0
    micro_credits = (
        (prompt_tokens - cached_tokens) * price.prompt_per_mtok
        + cached_tokens * price.cached_per_mtok
        + completion_tokens * price.completion_per_mtok
    )
    return max(price.min_per_request, -(-micro_credits // TOKENS_PER_MTOK))


def affordable_completion_tokens(
    price: Price, balance: int, prompt_tokens: int, *, choices: int = 1, cap: int
) -> int:
    """The largest `max_tokens` (per choice, <= cap) whose worst case the balance can pay.

    0 means not even one token per choice is affordable on top of the prompt.
    """
    assert choices >= 1 and cap >= 1 and balance >= 0
    if cost(price, prompt_tokens, choices) > balance:
        return 0
    if price.completion_per_mtok == 0:
        return cap
    budget = balance * TOKENS_PER_MTOK - prompt_tokens * price.prompt_per_mtok
    return min(cap, budget // (price.completion_per_mtok * choices))


def settle_amount(
    price: Price, credits_reserved: int, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> tuple[int, bool]:
    """(credits to charge, clamped): the cost of actual usage, never more than was reserved."""
    amount = cost(price, prompt_tokens, completion_tokens, cached_tokens)
    if amount > credits_reserved:
        return credits_reserved, True
    return amount, False
