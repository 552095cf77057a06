"""The money rules of `r1nest.ledger.base`, held against every backend (see conftest BACKENDS).

Each test states one rule and checks the balance, the postings and `balance == sum(postings)`
after the operation that could break it.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from r1nest.errors import (
    InsufficientCredits,
    InvalidLedgerArgument,
    KeyLimitReached,
    ReservationClosed,
    UnknownKey,
)
from r1nest.ledger.base import Store, Usage, UsageBucket
from r1nest.ledger.rules import MAX_CONCURRENCY_LIMIT, MAX_CREDITS, MAX_RATE_LIMIT_RPM

T0 = 1_700_000_000.0
TTL_S = 3600.0


def concurrency(store: Store) -> int:
    """How many requests race in the concurrency tests. moto copies the whole table on every
    transaction, so its backends race fewer (test_dynamodb_processes races 200 across two
    processes)."""
    return 50 if type(store).__name__ == "DynamoStore" else 200


async def make_key(store: Store, key_id: str = "0123456789ab", credits: int = 1000, **kw) -> str:
    await store.create_key(
        key_id=key_id, key_hash="f" * 64, name=kw.pop("name", "test"), credits=credits,
        expires_at=kw.pop("expires_at", None), now=kw.pop("now", T0), **kw,
    )
    return key_id


async def assert_consistent(store: Store, key_id: str, expected_balance: int) -> None:
    balance = await store.balance(key_id)
    postings = await store.postings(key_id)
    assert balance == expected_balance
    assert sum(p.credits for p in postings) == balance, "balance != sum(postings)"
    assert (await store.get_key(key_id)).remaining_credits == balance


# keys -------------------------------------------------------------------------------------


async def test_create_key_grants_its_credits_once(store: Store) -> None:
    record = await store.create_key(
        key_id="0123456789ab", key_hash="a" * 64, name="alice", credits=500,
        expires_at=T0 + 60, now=T0,
    )
    assert (record.key_id, record.name, record.key_hash) == ("0123456789ab", "alice", "a" * 64)
    assert (record.created_at, record.expires_at, record.revoked) == (T0, T0 + 60, False)
    assert record.remaining_credits == 500
    assert await store.get_key("0123456789ab") == record
    assert [(p.kind, p.credits) for p in await store.postings("0123456789ab")] == [("grant", 500)]
    await assert_consistent(store, "0123456789ab", 500)


async def test_create_key_refuses_a_duplicate_id_and_changes_nothing(store: Store) -> None:
    key_id = await make_key(store, credits=10)
    with pytest.raises(InvalidLedgerArgument):
        await make_key(store, key_id=key_id, credits=99)
    await assert_consistent(store, key_id, 10)


@pytest.mark.parametrize(
    "expires_at",
    [float("nan"), float("inf"), float("-inf"), 10**400, 0, -1.0, 1e13, True, "2030-01-01"],
    ids=["nan", "inf", "-inf", "10**400", "0", "-1", "1e13", "True", "str"],
)
async def test_create_key_refuses_an_expiry_that_is_not_finite_unix_seconds(store: Store, expires_at) -> None:
    """NaN would be a key that never expires (SQLite stores NaN as NULL); Infinity one that no
    JSON can list; 10**400 no float can hold; 1e13 is past the year 9999."""
    with pytest.raises(InvalidLedgerArgument):
        await make_key(store, expires_at=expires_at)
    assert await store.get_key("0123456789ab") is None
    assert await store.list_keys() == []


async def test_create_key_keeps_an_integer_expiry_as_unix_seconds(store: Store) -> None:
    record = await store.create_key(
        key_id="0123456789ab", key_hash="a" * 64, name="", credits=1, expires_at=int(T0) + 60, now=T0,
    )
    assert record.expires_at == T0 + 60 and isinstance(record.expires_at, float)
    assert (await store.get_key("0123456789ab")).expires_at == T0 + 60


async def test_list_keys_returns_every_key_in_creation_order(store: Store) -> None:
    await make_key(store, key_id="bbbbbbbbbbbb", now=T0 + 1)
    await make_key(store, key_id="aaaaaaaaaaaa", now=T0)
    assert [k.key_id for k in await store.list_keys()] == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]


async def test_unknown_key_errors(store: Store) -> None:
    assert await store.get_key("000000000000") is None
    for call in (
        store.balance("000000000000"),
        store.revoke_key("000000000000"),
        store.postings("000000000000"),
        store.topup("000000000000", 5, idempotency_key="k", now=T0),
        store.reserve("000000000000", 5, ttl_s=TTL_S, now=T0),
    ):
        with pytest.raises(UnknownKey):
            await call
    assert await store.list_keys() == []


async def test_unknown_reservation_is_an_error(store: Store) -> None:
    with pytest.raises(InvalidLedgerArgument):
        await store.settle("f" * 32, 0, now=T0)
    with pytest.raises(InvalidLedgerArgument):
        await store.void("f" * 32, now=T0)


async def test_revoked_key_cannot_reserve_but_open_reservations_still_settle(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    reservation = await store.reserve(key_id, 40, ttl_s=TTL_S, now=T0)
    revoked = await store.revoke_key(key_id)
    assert revoked.revoked and not revoked.usable(T0)
    assert (await store.get_key(key_id)).revoked
    with pytest.raises(UnknownKey):
        await store.reserve(key_id, 1, ttl_s=TTL_S, now=T0)
    assert await store.settle(reservation.reservation_id, 10, now=T0) == 90
    await assert_consistent(store, key_id, 90)


async def test_expired_key_cannot_reserve(store: Store) -> None:
    key_id = await make_key(store, credits=100, expires_at=T0 + 10)
    assert (await store.get_key(key_id)).usable(T0 + 9.9)
    await store.reserve(key_id, 1, ttl_s=TTL_S, now=T0 + 9.9)
    assert not (await store.get_key(key_id)).usable(T0 + 10)
    with pytest.raises(UnknownKey):
        await store.reserve(key_id, 1, ttl_s=TTL_S, now=T0 + 10)
    await assert_consistent(store, key_id, 99)


# reserve ----------------------------------------------------------------------------------


async def test_reserve_moves_credits_out_of_the_balance(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    reservation = await store.reserve(key_id, 30, ttl_s=TTL_S, now=T0)
    assert reservation.key_id == key_id
    assert reservation.credits_reserved == 30
    assert reservation.expires_at == T0 + TTL_S
    assert reservation.remaining_credits == 70
    postings = await store.postings(key_id)
    assert [(p.kind, p.credits, p.reservation_id) for p in postings][-1] == (
        "reserve", -30, reservation.reservation_id,
    )
    await assert_consistent(store, key_id, 70)


async def test_reserve_beyond_the_balance_fails_and_changes_nothing(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    await store.reserve(key_id, 60, ttl_s=TTL_S, now=T0)
    postings_before = await store.postings(key_id)
    with pytest.raises(InsufficientCredits) as caught:
        await store.reserve(key_id, 41, ttl_s=TTL_S, now=T0)
    assert (caught.value.remaining_credits, caught.value.needed_credits) == (40, 41)
    assert await store.postings(key_id) == postings_before
    assert await store.sweep_expired(now=T0 + 10 * TTL_S) == 1  # only the first one exists
    await assert_consistent(store, key_id, 100)


async def test_reserve_the_whole_balance_down_to_zero(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    reservation = await store.reserve(key_id, 100, ttl_s=TTL_S, now=T0)
    assert reservation.remaining_credits == 0
    with pytest.raises(InsufficientCredits):
        await store.reserve(key_id, 1, ttl_s=TTL_S, now=T0)
    await assert_consistent(store, key_id, 0)


async def test_reserve_refuses_amounts_that_are_not_credits(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    for credits in [-1, 1.5, True, "5", MAX_CREDITS + 1]:
        with pytest.raises(InvalidLedgerArgument):
            await store.reserve(key_id, credits, ttl_s=TTL_S, now=T0)
    await assert_consistent(store, key_id, 100)


async def test_reserve_refuses_a_bad_ttl(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    for ttl_s in [0, -5, float("inf"), float("nan")]:
        with pytest.raises(InvalidLedgerArgument):
            await store.reserve(key_id, 1, ttl_s=ttl_s, now=T0)
    await assert_consistent(store, key_id, 100)


# settle / void ----------------------------------------------------------------------------


async def test_settle_returns_the_unused_part(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    reservation = await store.reserve(key_id, 50, ttl_s=TTL_S, now=T0)
    assert await store.settle(reservation.reservation_id, 20, now=T0 + 1) == 80
    kinds = [(p.kind, p.credits) for p in await store.postings(key_id)]
    assert kinds == [("grant", 100), ("reserve", -50), ("settle", 30)]
    await assert_consistent(store, key_id, 80)


async def test_settle_at_zero_and_at_the_full_reservation(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    first = await store.reserve(key_id, 50, ttl_s=TTL_S, now=T0)
    second = await store.reserve(key_id, 50, ttl_s=TTL_S, now=T0)
    assert await store.settle(first.reservation_id, 0, now=T0) == 50
    assert await store.settle(second.reservation_id, 50, now=T0) == 50
    await assert_consistent(store, key_id, 50)


async def test_void_returns_everything(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    reservation = await store.reserve(key_id, 70, ttl_s=TTL_S, now=T0)
    assert await store.void(reservation.reservation_id, now=T0) == 100
    assert [p.kind for p in await store.postings(key_id)] == ["grant", "reserve", "void"]
    await assert_consistent(store, key_id, 100)


@pytest.mark.parametrize("first", ["settle", "void"])
@pytest.mark.parametrize("second", ["settle", "void"])
async def test_a_reservation_closes_exactly_once(store: Store, first: str, second: str) -> None:
    key_id = await make_key(store, credits=100)
    reservation = await store.reserve(key_id, 50, ttl_s=TTL_S, now=T0)

    async def close(how: str) -> int:
        if how == "settle":
            return await store.settle(reservation.reservation_id, 10, now=T0)
        return await store.void(reservation.reservation_id, now=T0)

    balance = await close(first)
    postings = await store.postings(key_id)
    with pytest.raises(ReservationClosed):
        await close(second)
    assert await store.postings(key_id) == postings
    await assert_consistent(store, key_id, balance)


async def test_concurrent_closes_of_one_reservation_apply_once(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    reservation = await store.reserve(key_id, 50, ttl_s=TTL_S, now=T0)
    results = await asyncio.gather(
        *[store.settle(reservation.reservation_id, 50, now=T0) for _ in range(5)],
        *[store.void(reservation.reservation_id, now=T0) for _ in range(5)],
        return_exceptions=True,
    )
    succeeded = [r for r in results if isinstance(r, int)]
    assert len(succeeded) == 1
    assert all(isinstance(r, ReservationClosed) for r in results if not isinstance(r, int))
    await assert_consistent(store, key_id, succeeded[0])


async def test_settle_refuses_a_bad_charge_and_leaves_the_reservation_open(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    reservation = await store.reserve(key_id, 50, ttl_s=TTL_S, now=T0)
    for charged in [51, -1, 2.0, None]:
        with pytest.raises(InvalidLedgerArgument) as caught:
            await store.settle(reservation.reservation_id, charged, now=T0)
        assert not isinstance(caught.value, ReservationClosed)
    await assert_consistent(store, key_id, 50)
    assert await store.settle(reservation.reservation_id, 50, now=T0) == 50  # still open


# sweep ------------------------------------------------------------------------------------


async def test_sweep_voids_only_expired_pending_reservations(store: Store) -> None:
    key_id = await make_key(store, credits=1000)
    expired = await store.reserve(key_id, 100, ttl_s=10, now=T0)
    expired_settled = await store.reserve(key_id, 200, ttl_s=10, now=T0)
    live = await store.reserve(key_id, 300, ttl_s=1000, now=T0)
    await store.settle(expired_settled.reservation_id, 150, now=T0 + 1)
    assert await store.sweep_expired(now=T0 + 9) == 0
    await assert_consistent(store, key_id, 1000 - 100 - 150 - 300)

    assert await store.sweep_expired(now=T0 + 11) == 1
    await assert_consistent(store, key_id, 1000 - 150 - 300)
    with pytest.raises(ReservationClosed):
        await store.settle(expired.reservation_id, 1, now=T0 + 12)
    assert await store.sweep_expired(now=T0 + 11) == 0  # nothing twice
    assert await store.settle(live.reservation_id, 300, now=T0 + 12) == 1000 - 150 - 300
    void_postings = [p for p in await store.postings(key_id) if p.kind == "void"]
    assert [(p.reservation_id, p.credits) for p in void_postings] == [(expired.reservation_id, 100)]


async def test_an_expired_reservation_can_still_settle_before_the_sweep(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    reservation = await store.reserve(key_id, 50, ttl_s=10, now=T0)
    assert await store.settle(reservation.reservation_id, 5, now=T0 + 20) == 95
    assert await store.sweep_expired(now=T0 + 30) == 0
    await assert_consistent(store, key_id, 95)


async def test_sweep_covers_every_key(store: Store) -> None:
    keys = [await make_key(store, key_id=f"{i:012x}", credits=10) for i in range(3)]
    for key_id in keys:
        await store.reserve(key_id, 10, ttl_s=5, now=T0)
    assert await store.sweep_expired(now=T0 + 5) == 3
    for key_id in keys:
        await assert_consistent(store, key_id, 10)


# top-up -----------------------------------------------------------------------------------


async def test_topup_adds_credits_once_per_idempotency_key(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    assert await store.topup(key_id, 50, idempotency_key="req-1", now=T0) == 150
    assert await store.topup(key_id, 50, idempotency_key="req-1", now=T0) == 150
    assert await store.topup(key_id, 999, idempotency_key="req-1", now=T0) == 150
    assert await store.topup(key_id, 50, idempotency_key="req-2", now=T0) == 200
    topups = [p.credits for p in await store.postings(key_id) if p.kind == "topup"]
    assert topups == [50, 50]
    await assert_consistent(store, key_id, 200)


async def test_topup_idempotency_is_per_key(store: Store) -> None:
    first = await make_key(store, key_id="aaaaaaaaaaaa", credits=0)
    second = await make_key(store, key_id="bbbbbbbbbbbb", credits=0)
    assert await store.topup(first, 10, idempotency_key="same", now=T0) == 10
    assert await store.topup(second, 10, idempotency_key="same", now=T0) == 10
    await assert_consistent(store, first, 10)
    await assert_consistent(store, second, 10)


async def test_concurrent_retries_of_one_topup_apply_once(store: Store) -> None:
    key_id = await make_key(store, credits=0)
    await asyncio.gather(*[store.topup(key_id, 7, idempotency_key="retry", now=T0) for _ in range(20)])
    await assert_consistent(store, key_id, 7)


async def test_topup_refuses_amounts_that_are_not_positive_credits(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    for credits in [0, -5, 2.5]:
        with pytest.raises(InvalidLedgerArgument):
            await store.topup(key_id, credits, idempotency_key="x", now=T0)
    await assert_consistent(store, key_id, 100)
    assert await store.topup(key_id, 1, idempotency_key="x", now=T0) == 101  # "x" was not used up


async def test_topup_refuses_to_overflow_the_balance(store: Store) -> None:
    key_id = await make_key(store, credits=MAX_CREDITS - 5)
    with pytest.raises(InvalidLedgerArgument):
        await store.topup(key_id, 6, idempotency_key="big", now=T0)
    await assert_consistent(store, key_id, MAX_CREDITS - 5)
    # the refused top-up did not burn its idempotency key
    await store.reserve(key_id, 10, ttl_s=TTL_S, now=T0)
    assert await store.topup(key_id, 6, idempotency_key="big", now=T0) == MAX_CREDITS - 9


# concurrency ------------------------------------------------------------------------------


async def test_concurrent_reservations_never_overspend(store: Store) -> None:
    """Many reservations at once against a balance that affords about a fifth of them."""
    attempts = concurrency(store)
    affordable = attempts // 5 + 3
    key_id = await make_key(store, credits=affordable * 25 + 24)
    results = await asyncio.gather(
        *[store.reserve(key_id, 25, ttl_s=TTL_S, now=T0) for _ in range(attempts)], return_exceptions=True
    )
    made = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, InsufficientCredits) for r in refused), refused[:3]
    assert len(made) == affordable
    assert all(r.remaining_credits >= 0 for r in made)
    assert len({r.reservation_id for r in made}) == affordable
    await assert_consistent(store, key_id, 24)


async def test_concurrent_reserve_and_settle_charge_exactly_what_was_recorded(store: Store) -> None:
    """Like the gateway: reserve, then settle at a charge <= the reservation, many at once,
    on a balance that cannot pay for all of them."""
    attempts = concurrency(store)
    initial = attempts * 15
    key_id = await make_key(store, credits=initial)
    rng = random.Random(7)
    charges = [rng.randint(0, 40) for _ in range(attempts)]

    async def request(charge: int) -> int:
        try:
            reservation = await store.reserve(key_id, 40, ttl_s=TTL_S, now=T0)
        except InsufficientCredits:
            return 0
        assert reservation.remaining_credits >= 0
        await asyncio.sleep(0)
        await store.settle(reservation.reservation_id, charge, now=T0)
        return charge

    charged = await asyncio.gather(*[request(c) for c in charges])
    assert 0 < sum(1 for c in charged if c) < attempts
    await assert_consistent(store, key_id, initial - sum(charged))
    settles = [p for p in await store.postings(key_id) if p.kind == "settle"]
    assert sum(40 - p.credits for p in settles) == sum(charged)


# per-key limits ---------------------------------------------------------------------------

WINDOW = 1_699_999_980.0  # the 60 s rate-limit window holding T0 (a multiple of 60)


async def snapshot(store: Store, key_id: str) -> tuple[int, list]:
    return await store.balance(key_id), await store.postings(key_id)


async def test_keys_carry_their_limits(store: Store) -> None:
    record = await store.create_key(
        key_id="0123456789ab", key_hash="a" * 64, name="limited", credits=5, expires_at=None, now=T0,
        max_concurrency=3, rate_limit_rpm=120,
    )
    assert (record.max_concurrency, record.rate_limit_rpm) == (3, 120)
    assert await store.get_key("0123456789ab") == record
    assert (await store.list_keys())[0] == record
    plain = await store.get_key(await make_key(store, key_id="bbbbbbbbbbbb"))
    assert (plain.max_concurrency, plain.rate_limit_rpm) == (None, None)


async def test_set_key_limits_replaces_both_and_none_clears(store: Store) -> None:
    key_id = await make_key(store, credits=70)
    record = await store.set_key_limits(key_id, max_concurrency=4, rate_limit_rpm=600)
    assert (record.max_concurrency, record.rate_limit_rpm, record.remaining_credits) == (4, 600, 70)
    assert await store.get_key(key_id) == record
    record = await store.set_key_limits(key_id, max_concurrency=None, rate_limit_rpm=9)
    assert (record.max_concurrency, record.rate_limit_rpm) == (None, 9)
    record = await store.set_key_limits(key_id, max_concurrency=None, rate_limit_rpm=None)
    assert (record.max_concurrency, record.rate_limit_rpm) == (None, None)
    assert await store.get_key(key_id) == record
    with pytest.raises(UnknownKey):
        await store.set_key_limits("000000000000", max_concurrency=1, rate_limit_rpm=1)
    await assert_consistent(store, key_id, 70)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_concurrency", 0), ("max_concurrency", -1), ("max_concurrency", 1.5), ("max_concurrency", True),
        ("max_concurrency", "3"), ("max_concurrency", MAX_CONCURRENCY_LIMIT + 1),
        ("rate_limit_rpm", 0), ("rate_limit_rpm", 2.0), ("rate_limit_rpm", MAX_RATE_LIMIT_RPM + 1),
    ],
)
async def test_limits_that_are_not_positive_whole_numbers_are_refused(store: Store, field: str, value) -> None:
    limits = {"max_concurrency": None, "rate_limit_rpm": None, field: value}
    with pytest.raises(InvalidLedgerArgument):
        await make_key(store, key_id="aaaaaaaaaaaa", **limits)
    assert await store.get_key("aaaaaaaaaaaa") is None
    key_id = await make_key(store, credits=100, max_concurrency=2, rate_limit_rpm=5)
    with pytest.raises(InvalidLedgerArgument):
        await store.set_key_limits(key_id, **limits)
    assert ((await store.get_key(key_id)).max_concurrency, (await store.get_key(key_id)).rate_limit_rpm) == (2, 5)
    with pytest.raises(InvalidLedgerArgument):
        await store.reserve(key_id, 1, ttl_s=TTL_S, now=T0, **limits)
    await assert_consistent(store, key_id, 100)
    assert [p.kind for p in await store.postings(key_id)] == ["grant"]


async def test_max_concurrency_refuses_one_more_and_the_refusal_changes_nothing(store: Store) -> None:
    key_id = await make_key(store, credits=1000)
    for _ in range(2):
        await store.reserve(key_id, 10, ttl_s=TTL_S, now=T0, max_concurrency=2)
    before = await snapshot(store, key_id)
    for _ in range(3):
        with pytest.raises(KeyLimitReached) as caught:
            await store.reserve(key_id, 10, ttl_s=TTL_S, now=T0, max_concurrency=2)
        assert (caught.value.limit, caught.value.retry_after_s) == ("max_concurrency", 1.0)
    assert await snapshot(store, key_id) == before
    # The refusals were not counted: a limit of 3 leaves room for exactly one more.
    await store.reserve(key_id, 10, ttl_s=TTL_S, now=T0, max_concurrency=3)
    with pytest.raises(KeyLimitReached):
        await store.reserve(key_id, 10, ttl_s=TTL_S, now=T0, max_concurrency=3)
    # None: no limit at all, whatever is open.
    await store.reserve(key_id, 10, ttl_s=TTL_S, now=T0)
    await assert_consistent(store, key_id, 960)


@pytest.mark.parametrize("close", ["settle", "void", "sweep"])
async def test_closing_a_reservation_frees_its_concurrency_slot_once(store: Store, close: str) -> None:
    key_id = await make_key(store, credits=1000)
    first = await store.reserve(key_id, 10, ttl_s=10, now=T0, max_concurrency=2)
    await store.reserve(key_id, 10, ttl_s=1000, now=T0, max_concurrency=2)
    with pytest.raises(KeyLimitReached):
        await store.reserve(key_id, 10, ttl_s=TTL_S, now=T0, max_concurrency=2)
    if close == "settle":
        await store.settle(first.reservation_id, 4, now=T0 + 11)
    elif close == "void":
        await store.void(first.reservation_id, now=T0 + 11)
    else:
        assert await store.sweep_expired(now=T0 + 11) == 1
    # A second close is refused and frees nothing more.
    with pytest.raises(ReservationClosed):
        await store.void(first.reservation_id, now=T0 + 11)
    assert await store.sweep_expired(now=T0 + 11) == 0
    await store.reserve(key_id, 10, ttl_s=TTL_S, now=T0 + 11, max_concurrency=2)
    with pytest.raises(KeyLimitReached):
        await store.reserve(key_id, 10, ttl_s=TTL_S, now=T0 + 11, max_concurrency=2)
    await assert_consistent(store, key_id, 1000 - 20 - (4 if close == "settle" else 0))


async def test_concurrency_is_per_key(store: Store) -> None:
    first = await make_key(store, key_id="aaaaaaaaaaaa", credits=100)
    second = await make_key(store, key_id="bbbbbbbbbbbb", credits=100)
    await store.reserve(first, 1, ttl_s=TTL_S, now=T0, max_concurrency=1, rate_limit_rpm=1)
    await store.reserve(second, 1, ttl_s=TTL_S, now=T0, max_concurrency=1, rate_limit_rpm=1)
    for key_id in (first, second):
        with pytest.raises(KeyLimitReached):
            await store.reserve(key_id, 1, ttl_s=TTL_S, now=T0, max_concurrency=1)


async def test_rate_limit_counts_reservations_per_fixed_window(store: Store) -> None:
    key_id = await make_key(store, credits=1000)
    first = await store.reserve(key_id, 10, ttl_s=TTL_S, now=WINDOW + 1, rate_limit_rpm=2)
    await store.settle(first.reservation_id, 10, now=WINDOW + 2)  # a settled one still counts
    await store.reserve(key_id, 10, ttl_s=TTL_S, now=WINDOW + 30, rate_limit_rpm=2)
    before = await snapshot(store, key_id)
    with pytest.raises(KeyLimitReached) as caught:
        await store.reserve(key_id, 10, ttl_s=TTL_S, now=WINDOW + 45, rate_limit_rpm=2)
    assert caught.value.limit == "rate_limit_rpm"
    assert caught.value.retry_after_s == pytest.approx(15.0)
    with pytest.raises(KeyLimitReached) as caught:
        await store.reserve(key_id, 10, ttl_s=TTL_S, now=WINDOW + 59.75, rate_limit_rpm=2)
    assert caught.value.retry_after_s == pytest.approx(0.25)
    assert await snapshot(store, key_id) == before
    # The next window starts from zero, at its first instant.
    for _ in range(2):
        await store.reserve(key_id, 10, ttl_s=TTL_S, now=WINDOW + 60, rate_limit_rpm=2)
    with pytest.raises(KeyLimitReached) as caught:
        await store.reserve(key_id, 10, ttl_s=TTL_S, now=WINDOW + 60, rate_limit_rpm=2)
    assert caught.value.retry_after_s == pytest.approx(60.0)
    # A window long after the last one (the key was idle) starts from zero as well.
    await store.reserve(key_id, 10, ttl_s=TTL_S, now=WINDOW + 3600 + 7, rate_limit_rpm=1)
    await assert_consistent(store, key_id, 1000 - 50)


async def test_a_refused_reservation_does_not_count_towards_the_rate_limit(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    await store.reserve(key_id, 10, ttl_s=TTL_S, now=WINDOW, rate_limit_rpm=2)
    with pytest.raises(KeyLimitReached):  # by the other limit
        await store.reserve(key_id, 10, ttl_s=TTL_S, now=WINDOW, rate_limit_rpm=2, max_concurrency=1)
    with pytest.raises(InsufficientCredits):
        await store.reserve(key_id, 1000, ttl_s=TTL_S, now=WINDOW, rate_limit_rpm=2)
    await store.reserve(key_id, 10, ttl_s=TTL_S, now=WINDOW, rate_limit_rpm=2)
    with pytest.raises(KeyLimitReached):
        await store.reserve(key_id, 10, ttl_s=TTL_S, now=WINDOW, rate_limit_rpm=2)
    # Refused by the rate limit: not counted either (a limit of 3 admits exactly one more).
    await store.reserve(key_id, 10, ttl_s=TTL_S, now=WINDOW, rate_limit_rpm=3)
    with pytest.raises(KeyLimitReached):
        await store.reserve(key_id, 10, ttl_s=TTL_S, now=WINDOW, rate_limit_rpm=3)
    await assert_consistent(store, key_id, 70)


async def test_reservations_without_a_limit_still_count_in_the_window(store: Store) -> None:
    """The rate limit is "reservations in this window", whoever made them: a limit applied later
    in the window sees those made without one."""
    key_id = await make_key(store, credits=100)
    for _ in range(3):
        await store.reserve(key_id, 1, ttl_s=TTL_S, now=WINDOW + 5)
    with pytest.raises(KeyLimitReached):
        await store.reserve(key_id, 1, ttl_s=TTL_S, now=WINDOW + 6, rate_limit_rpm=3)
    await store.reserve(key_id, 1, ttl_s=TTL_S, now=WINDOW + 6, rate_limit_rpm=4)


async def test_a_window_opened_by_a_later_clock_stays_current(store: Store) -> None:
    """Gateways' clocks differ a little: a reservation stamped before the key's current window
    counts in that window (a counter never moves back), and waits for its end."""
    key_id = await make_key(store, credits=100)
    await store.reserve(key_id, 1, ttl_s=TTL_S, now=WINDOW + 61, rate_limit_rpm=2)
    await store.reserve(key_id, 1, ttl_s=TTL_S, now=WINDOW + 59, rate_limit_rpm=2)
    with pytest.raises(KeyLimitReached) as caught:
        await store.reserve(key_id, 1, ttl_s=TTL_S, now=WINDOW + 59, rate_limit_rpm=2)
    assert caught.value.retry_after_s == pytest.approx(61.0)
    await store.reserve(key_id, 1, ttl_s=TTL_S, now=WINDOW + 120, rate_limit_rpm=2)


async def test_an_unaffordable_reservation_at_its_limit_is_insufficient_credits(store: Store) -> None:
    """Every store reports the same reason when several apply: a revoked or expired key first,
    then the balance, then max_concurrency, then rate_limit_rpm."""
    key_id = await make_key(store, credits=10)
    await store.reserve(key_id, 10, ttl_s=TTL_S, now=T0, max_concurrency=1, rate_limit_rpm=1)
    with pytest.raises(InsufficientCredits):
        await store.reserve(key_id, 1, ttl_s=TTL_S, now=T0, max_concurrency=1, rate_limit_rpm=1)
    await store.topup(key_id, 5, idempotency_key="more", now=T0)
    with pytest.raises(KeyLimitReached) as caught:
        await store.reserve(key_id, 1, ttl_s=TTL_S, now=T0, max_concurrency=1, rate_limit_rpm=1)
    assert caught.value.limit == "max_concurrency"
    with pytest.raises(KeyLimitReached) as caught:
        await store.reserve(key_id, 1, ttl_s=TTL_S, now=T0, max_concurrency=2, rate_limit_rpm=1)
    assert caught.value.limit == "rate_limit_rpm"
    await store.revoke_key(key_id)
    with pytest.raises(UnknownKey):
        await store.reserve(key_id, 1, ttl_s=TTL_S, now=T0, max_concurrency=1, rate_limit_rpm=1)


async def test_concurrent_reservations_never_pass_max_concurrency(store: Store) -> None:
    attempts = concurrency(store)
    key_id = await make_key(store, credits=attempts * 10)
    results = await asyncio.gather(
        *[store.reserve(key_id, 10, ttl_s=TTL_S, now=T0, max_concurrency=7) for _ in range(attempts)],
        return_exceptions=True,
    )
    made = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, KeyLimitReached) and r.limit == "max_concurrency" for r in refused), refused[:3]
    assert len(made) == 7
    await assert_consistent(store, key_id, attempts * 10 - 70)


async def test_concurrent_requests_hold_at_most_max_concurrency_at_once(store: Store) -> None:
    """Reserve, yield, settle, many at once: what the caller holds between its reserve and its
    settle never passes the limit, and every slot comes back."""
    attempts = concurrency(store)
    key_id = await make_key(store, credits=attempts * 10)
    holding, most = 0, 0

    async def request() -> bool:
        nonlocal holding, most
        try:
            reservation = await store.reserve(key_id, 10, ttl_s=TTL_S, now=T0, max_concurrency=3)
        except KeyLimitReached:
            return False
        holding += 1
        most = max(most, holding)
        await asyncio.sleep(0)
        holding -= 1
        await store.settle(reservation.reservation_id, 1, now=T0)
        return True

    made = sum(await asyncio.gather(*[request() for _ in range(attempts)]))
    assert 3 <= made and most <= 3
    for _ in range(3):  # all slots free again
        await store.reserve(key_id, 1, ttl_s=TTL_S, now=T0, max_concurrency=3)
    await assert_consistent(store, key_id, attempts * 10 - made - 3)


async def test_concurrent_reservations_never_pass_the_rate_limit(store: Store) -> None:
    attempts = concurrency(store)
    key_id = await make_key(store, credits=attempts)
    results = await asyncio.gather(
        *[store.reserve(key_id, 1, ttl_s=TTL_S, now=WINDOW + 10, rate_limit_rpm=9) for _ in range(attempts)],
        return_exceptions=True,
    )
    made = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, KeyLimitReached) and r.limit == "rate_limit_rpm" for r in refused), refused[:3]
    assert {r.retry_after_s for r in refused} == {50.0}
    assert len(made) == 9
    await assert_consistent(store, key_id, attempts - 9)


# usage ------------------------------------------------------------------------------------

HOUR = 1_699_999_200.0  # the hour holding T0 (a multiple of 3600)
DAY = 1_699_920_000.0  # the UTC day holding T0 (a multiple of 86400: 2023-11-14)


async def request(
    store: Store, key_id: str, *, at: float, reserved: int = 100, charged: int, usage: Usage | None = None
) -> None:
    reservation = await store.reserve(key_id, reserved, ttl_s=TTL_S, now=at - 1)
    await store.settle(reservation.reservation_id, charged, now=at, usage=usage)


async def test_usage_sums_settled_requests_into_hour_buckets(store: Store) -> None:
    key_id = await make_key(store, credits=10_000)
    await request(store, key_id, at=HOUR + 5, charged=30, usage=Usage(100, 40, 20))
    await request(store, key_id, at=HOUR + 3599.5, charged=12, usage=Usage(7, 0, 3))
    await request(store, key_id, at=HOUR + 3600, charged=1, usage=Usage(1, 1, 1))
    await request(store, key_id, at=HOUR + 3 * 3600 + 9, charged=0)  # settled without usage
    voided = await store.reserve(key_id, 100, ttl_s=TTL_S, now=HOUR + 10)
    await store.void(voided.reservation_id, now=HOUR + 11)  # not a request
    await store.reserve(key_id, 100, ttl_s=5, now=HOUR + 20)
    assert await store.sweep_expired(now=HOUR + 30) == 1  # nor is a swept one

    buckets = await store.usage(key_id=key_id, since=HOUR - 86_400, until=HOUR + 86_400, bucket_s=3600)
    assert buckets == [
        UsageBucket(HOUR, requests=2, prompt_tokens=107, cached_tokens=40, completion_tokens=23, credits=42),
        UsageBucket(HOUR + 3600, 1, 1, 1, 1, 1),
        UsageBucket(HOUR + 3 * 3600, 1, 0, 0, 0, 0),
    ]
    assert all(isinstance(b.start, float) for b in buckets)
    await assert_consistent(store, key_id, 10_000 - 43)


async def test_usage_buckets_are_utc_days_and_minutes(store: Store) -> None:
    key_id = await make_key(store, credits=10_000)
    await request(store, key_id, at=DAY + 1, charged=5, usage=Usage(10, 0, 1))
    await request(store, key_id, at=DAY + 86_399, charged=6, usage=Usage(20, 5, 2))
    await request(store, key_id, at=DAY + 86_400, charged=7, usage=Usage(30, 0, 3))
    days = await store.usage(key_id=key_id, since=DAY - 86_400, until=DAY + 2 * 86_400, bucket_s=86_400)
    assert days == [UsageBucket(DAY, 2, 30, 5, 3, 11), UsageBucket(DAY + 86_400, 1, 30, 0, 3, 7)]
    minutes = await store.usage(key_id=key_id, since=DAY, until=DAY + 2 * 86_400, bucket_s=60)
    assert [(b.start, b.requests, b.credits) for b in minutes] == [
        (DAY, 1, 5), (DAY + 86_340, 1, 6), (DAY + 86_400, 1, 7),
    ]
    whole = await store.usage(key_id=key_id, since=0, until=DAY * 2, bucket_s=10 * 365 * 86_400)
    assert [(b.requests, b.prompt_tokens, b.credits) for b in whole] == [(3, 60, 18)]
    assert whole[0].start % (10 * 365 * 86_400) == 0 and whole[0].start <= DAY


async def test_usage_since_is_inclusive_and_until_exclusive(store: Store) -> None:
    key_id = await make_key(store, credits=10_000)
    for offset in (99.5, 100, 150, 200, 200.25):
        await request(store, key_id, at=HOUR + offset, charged=1, usage=Usage(1, 0, 0))
    buckets = await store.usage(key_id=key_id, since=HOUR + 100, until=HOUR + 200, bucket_s=3600)
    assert [(b.start, b.requests) for b in buckets] == [(HOUR, 2)]
    assert await store.usage(key_id=key_id, since=HOUR + 201, until=HOUR + 3600, bucket_s=60) == []


async def test_usage_for_one_key_or_for_all(store: Store) -> None:
    first = await make_key(store, key_id="aaaaaaaaaaaa", credits=10_000)
    second = await make_key(store, key_id="bbbbbbbbbbbb", credits=10_000)
    idle = await make_key(store, key_id="cccccccccccc", credits=10_000)
    await request(store, first, at=HOUR + 1, charged=10, usage=Usage(100, 50, 10))
    await request(store, second, at=HOUR + 2, charged=20, usage=Usage(200, 0, 20))
    await request(store, second, at=HOUR + 7200, charged=30, usage=Usage(300, 300, 30))
    window = {"since": HOUR, "until": HOUR + 86_400, "bucket_s": 3600}
    assert await store.usage(key_id=first, **window) == [UsageBucket(HOUR, 1, 100, 50, 10, 10)]
    assert await store.usage(key_id=second, **window) == [
        UsageBucket(HOUR, 1, 200, 0, 20, 20), UsageBucket(HOUR + 7200, 1, 300, 300, 30, 30),
    ]
    assert await store.usage(key_id=idle, **window) == []
    assert await store.usage(key_id=None, **window) == [
        UsageBucket(HOUR, 2, 300, 50, 30, 30), UsageBucket(HOUR + 7200, 1, 300, 300, 30, 30),
    ]
    with pytest.raises(UnknownKey):
        await store.usage(key_id="000000000000", **window)


@pytest.mark.parametrize(
    "since, until, bucket_s",
    [
        (T0, T0, 60), (T0 + 1, T0, 60), (float("nan"), T0, 60), (T0, float("inf"), 60), ("0", T0, 60),
        (T0, T0 + 60, 0), (T0, T0 + 60, -60), (T0, T0 + 60, 1.5), (T0, T0 + 60, True), (T0, T0 + 60, None),
    ],
)
async def test_usage_refuses_bad_ranges(store: Store, since, until, bucket_s) -> None:
    await make_key(store)
    with pytest.raises(InvalidLedgerArgument):
        await store.usage(key_id=None, since=since, until=until, bucket_s=bucket_s)


async def test_settle_refuses_bad_usage_and_leaves_the_reservation_open(store: Store) -> None:
    key_id = await make_key(store, credits=100)
    reservation = await store.reserve(key_id, 50, ttl_s=TTL_S, now=T0)
    for usage in [Usage(-1, 0, 0), Usage(1, 0, 1.5), Usage(True, 0, 0), {"prompt_tokens": 1}]:
        with pytest.raises(InvalidLedgerArgument):
            await store.settle(reservation.reservation_id, 10, now=T0, usage=usage)
    await assert_consistent(store, key_id, 50)
    assert await store.usage(key_id=key_id, since=0, until=T0 + 1, bucket_s=60) == []
    assert await store.settle(reservation.reservation_id, 10, now=T0, usage=Usage(5, 5, 5)) == 90
    assert await store.usage(key_id=key_id, since=0, until=T0 + 1, bucket_s=60) == [
        UsageBucket(1_699_999_980.0, 1, 5, 5, 5, 10)
    ]


async def test_concurrent_settles_each_count_once_in_usage(store: Store) -> None:
    attempts = concurrency(store)
    key_id = await make_key(store, credits=attempts * 10)
    reservations = await asyncio.gather(*[store.reserve(key_id, 10, ttl_s=TTL_S, now=T0) for _ in range(attempts)])
    await asyncio.gather(*[
        store.settle(r.reservation_id, i % 11, now=T0 + i % 120, usage=Usage(i, i // 2, 1))
        for i, r in enumerate(reservations)
    ])
    total = await store.usage(key_id=key_id, since=T0, until=T0 + 3600, bucket_s=3600)
    assert sum(b.requests for b in total) == attempts
    assert sum(b.prompt_tokens for b in total) == sum(range(attempts))
    assert sum(b.cached_tokens for b in total) == sum(i // 2 for i in range(attempts))
    assert sum(b.completion_tokens for b in total) == attempts
    charged = sum(i % 11 for i in range(attempts))
    assert sum(b.credits for b in total) == charged
    await assert_consistent(store, key_id, attempts * 10 - charged)
