"""The money rules of `r1nest.ledger.base`, held against every backend (see conftest BACKENDS).

Each test states one rule and checks the balance, the postings and `balance == sum(postings)`
after the operation that could break it.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from r1nest.errors import InsufficientCredits, InvalidLedgerArgument, ReservationClosed, UnknownKey
from r1nest.ledger.base import Store
from r1nest.ledger.rules import MAX_CREDITS

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
        expires_at=kw.pop("expires_at", None), now=kw.pop("now", T0),
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
