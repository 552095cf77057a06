"""PostgreSQL money properties across OS processes: two processes share one database, as two
gateway replicas do. Reservations race on a balance that affords a third of them, closes of the
same reservations race (settle in one process, void in the other), one top-up is sent from both,
and a process is killed with reservations open."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from typing import Any

import asyncpg
import pytest
from r1nest.errors import ReservationClosed
from r1nest.ledger import open_store
from r1nest.ledger.postgres import PostgresStore
from r1nest.settings import Settings

T0 = 1_700_000_000.0
KEY_ID = "0123456789ab"
PRICE = 25  # credits reserved per request

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from r1nest.errors import InsufficientCredits, ReservationClosed
    from r1nest.ledger.postgres import PostgresStore

    url, key_id, role, attempts, t0 = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])

    def say(value):
        print(json.dumps(value), flush=True)

    def charge(reservation_id):
        return int(reservation_id[:6], 16) % 26  # 0..25, the same in both processes

    async def main():
        store = PostgresStore(url, pool_size=16)
        await store.balance(key_id)  # connected and migrated before the start
        say("ready")
        sys.stdin.readline()  # both processes start together

        async def reserve():
            try:
                return await store.reserve(key_id, 25, ttl_s=600, now=t0)
            except InsufficientCredits:
                return None

        started = time.time()
        made = [r for r in await asyncio.gather(*[reserve() for _ in range(attempts)]) if r]
        say({"made": [r.reservation_id for r in made], "span": [started, time.time()],
             "lowest_remaining": min((r.remaining_credits for r in made), default=0)})

        # every reservation of both processes: settle them here (role "settle") or void them
        # (role "void"), both processes at once; each must close exactly once
        everything = json.loads(sys.stdin.readline())

        async def close(reservation_id):
            try:
                if role == "settle":
                    await store.settle(reservation_id, charge(reservation_id), now=t0)
                else:
                    await store.void(reservation_id, now=t0)
                return reservation_id
            except ReservationClosed:
                return None

        closed = [r for r in await asyncio.gather(*[close(r) for r in everything]) if r]
        say({"closed": closed})

        sys.stdin.readline()
        # the same top-up, retried, from both processes at once; and one of this process's own
        balances = await asyncio.gather(
            *[store.topup(key_id, 1000, idempotency_key="order-42", now=t0) for _ in range(5)],
            store.topup(key_id, 7, idempotency_key=f"own-{role}", now=t0),
        )
        say({"balances": balances})
        await store.close()

    asyncio.run(main())
    """
)


class Child:
    def __init__(self, url: str, role: str, attempts: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, url, KEY_ID, role, str(attempts), str(T0)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def read(self, timeout_s: float = 120.0) -> Any:
        return json.loads(read_line(self.process, timeout_s))


def read_line(process: subprocess.Popen[str], timeout_s: float = 60.0) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not result or not result[0]:
        process.kill()
        raise AssertionError(f"child said nothing; stderr: {process.stderr.read()[-3000:]}")
    return result[0].strip()


async def new_store(url: str, credits: int) -> PostgresStore:
    store = PostgresStore(url)
    await store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="t", credits=credits, expires_at=None, now=T0)
    return store


async def assert_consistent(store: PostgresStore, expected: int) -> None:
    assert await store.balance(KEY_ID) == expected
    assert sum(p.credits for p in await store.postings(KEY_ID)) == expected


def charge(reservation_id: str) -> int:
    return int(reservation_id[:6], 16) % 26


async def test_two_processes_race_reservations_closes_and_one_topup(postgres_url: str) -> None:
    """200 reservations at once from two processes, a third affordable; then both processes close
    every reservation at once (one settles, the other voids); then one top-up from both."""
    affordable = 66
    initial = affordable * PRICE + 13
    store = await new_store(postgres_url, initial)

    def race() -> list[dict[str, Any]]:
        children = [Child(postgres_url, role, 100) for role in ("settle", "void")]
        try:
            for child in children:
                assert child.read() == "ready"
            for child in children:
                child.send("go")
            reserved = [child.read() for child in children]
            everything = [r for result in reserved for r in result["made"]]
            for child in children:
                child.send(json.dumps(everything))
            closed = [child.read() for child in children]
            for child in children:
                child.send("topup")
            topped = [child.read() for child in children]
            for child in children:
                assert child.process.wait(60) == 0, child.process.stderr.read()[-3000:]
        finally:
            for child in children:
                if child.process.poll() is None:
                    child.process.kill()
        return [{**r, **c, **t} for r, c, t in zip(reserved, closed, topped)]

    settler, voider = await asyncio.to_thread(race)

    # reservations: exactly the affordable number, never below zero, and really concurrent
    made = settler["made"] + voider["made"]
    assert len(made) == len(set(made)) == affordable
    assert settler["made"] and voider["made"]
    (first_start, first_end), (second_start, second_end) = settler["span"], voider["span"]
    assert first_start < second_end and second_start < first_end, "the processes did not overlap"
    assert min(settler["lowest_remaining"], voider["lowest_remaining"]) >= 0

    # closes: each reservation closed exactly once, by one process or the other
    assert set(settler["closed"]).isdisjoint(voider["closed"])
    assert sorted(settler["closed"] + voider["closed"]) == sorted(made)
    charged = sum(charge(r) for r in settler["closed"])

    # the top-up applied once, though sent ten times from two processes; the own ones once each
    final = initial - charged + 1000 + 7 + 7
    assert all(balance <= final for balance in settler["balances"] + voider["balances"])
    await assert_consistent(store, final)
    postings = await store.postings(KEY_ID)
    assert [p.credits for p in postings if p.kind == "topup"].count(1000) == 1
    closes: dict[str, int] = {}
    for posting in postings:
        if posting.kind in ("settle", "void"):
            closes[posting.reservation_id] = closes.get(posting.reservation_id, 0) + 1
    assert closes == {r: 1 for r in made}
    assert sum(1 for p in postings if p.kind == "reserve") == affordable
    assert await store.sweep_expired(now=T0 + 10**6) == 0  # nothing left open
    await store.close()


async def test_kill_between_reserve_and_settle_then_sweep_restores_the_balance(postgres_url: str) -> None:
    store = await new_store(postgres_url, 1000)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import asyncio, sys
            from r1nest.ledger.postgres import PostgresStore
            async def main():
                store = PostgresStore(sys.argv[1])
                reservation = await store.reserve({KEY_ID!r}, 400, ttl_s=60, now={T0})
                print(reservation.reservation_id, flush=True)
                await asyncio.sleep(600)  # the request would be streaming here
                await store.settle(reservation.reservation_id, 1, now={T0})
            asyncio.run(main())
        """), postgres_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    reservation_id = read_line(child)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL

    await assert_consistent(store, 600)  # the reservation was committed before it was answered
    assert await store.sweep_expired(now=T0 + 59) == 0  # before its deadline: a live stream keeps it
    assert await store.sweep_expired(now=T0 + 61) == 1
    await assert_consistent(store, 1000)
    assert [(p.kind, p.credits, p.reservation_id) for p in await store.postings(KEY_ID)] == [
        ("grant", 1000, None), ("reserve", -400, reservation_id), ("void", 400, reservation_id),
    ]
    with pytest.raises(ReservationClosed):
        await store.settle(reservation_id, 1, now=T0 + 62)
    await store.close()


async def test_kill_in_the_middle_of_busy_traffic_leaves_a_consistent_ledger(postgres_url: str) -> None:
    """SIGKILL while 16 request loops reserve and settle; the next start's sweep
    (open_store, then sweep_expired, as the gateway's startup) returns everything that was open."""
    initial = 10**9
    store = await new_store(postgres_url, initial)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import asyncio, sys
            from r1nest.ledger.postgres import PostgresStore
            async def main():
                store = PostgresStore(sys.argv[1])
                await store.reserve({KEY_ID!r}, 100, ttl_s=60, now={T0})  # a long stream, open at the kill
                settled = [0]
                async def worker(n):
                    for i in range(100000):
                        r = await store.reserve({KEY_ID!r}, 100, ttl_s=60, now={T0})
                        await asyncio.sleep(0.001 * ((i + n) % 7))  # the engine at work
                        await store.settle(r.reservation_id, (i + n) % 101, now={T0})
                        settled[0] += 1
                        if settled[0] == 50:
                            print("busy", flush=True)
                await asyncio.gather(*[worker(n) for n in range(16)])
            asyncio.run(main())
        """), postgres_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert read_line(child) == "busy"
    await asyncio.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)

    conn = await asyncpg.connect(postgres_url)
    try:
        pending = await conn.fetchval("SELECT count(*) FROM reservations WHERE state = 'pending'")
        assert pending > 0  # killed with requests in flight (at least the long stream)
        settings = Settings(store="postgres", database_url=postgres_url)
        swept = open_store(settings)
        await swept.sweep_expired(now=T0 + 61)
        assert isinstance(swept, PostgresStore)
        balance = await swept.balance(KEY_ID)
        await assert_consistent(swept, balance)
        await swept.close()
        states = dict(await conn.fetch("SELECT state, count(*) FROM reservations GROUP BY state"))
        charged = await conn.fetchval("SELECT coalesce(sum(credits_charged), 0) FROM reservations")
        open_count = await conn.fetchval("SELECT open_reservations FROM keys WHERE key_id = $1", KEY_ID)
    finally:
        await conn.close()
    assert states.get("pending", 0) == 0 and open_count == 0
    assert states.get("settled", 0) >= 50  # the child really was busy
    assert balance == initial - charged
    await store.close()


LIMITS_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from r1nest.errors import KeyLimitReached
    from r1nest.ledger.postgres import PostgresStore

    url, key_id, attempts, t0 = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    limits = json.loads(sys.argv[5])

    async def main():
        store = PostgresStore(url, pool_size=16)
        await store.balance(key_id)
        print(json.dumps("ready"), flush=True)
        sys.stdin.readline()

        async def reserve():
            try:
                return (await store.reserve(key_id, 1, ttl_s=600, now=t0, **limits)).reservation_id
            except KeyLimitReached as exc:
                return exc.limit

        print(json.dumps(await asyncio.gather(*[reserve() for _ in range(attempts)])), flush=True)
        await store.close()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize(
    ("limits", "allowed"),
    [({"max_concurrency": 10}, 10), ({"rate_limit_rpm": 15}, 15), ({"max_concurrency": 12, "rate_limit_rpm": 30}, 12)],
)
async def test_per_key_limits_hold_across_processes(postgres_url: str, limits: dict[str, int], allowed: int) -> None:
    """Two processes, 60 reservations each at once, on one key with a limit: exactly `allowed` in
    all (the limit is counted on the key row, under its lock); the rest are KeyLimitReached."""
    store = await new_store(postgres_url, 10**6)

    def race() -> list[list[str]]:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", LIMITS_CHILD, postgres_url, KEY_ID, "60", str(T0), json.dumps(limits)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for _ in range(2)
        ]
        try:
            for child in children:
                assert json.loads(read_line(child)) == "ready"
            for child in children:
                child.stdin.write("go\n")
                child.stdin.flush()
            return [json.loads(read_line(child, 120)) for child in children]
        finally:
            for child in children:
                if child.wait(60) != 0:
                    raise AssertionError(child.stderr.read()[-3000:])

    outcomes = [outcome for child in await asyncio.to_thread(race) for outcome in child]
    made = [o for o in outcomes if o not in ("max_concurrency", "rate_limit_rpm")]
    assert len(made) == allowed
    assert len(outcomes) - allowed == sum(1 for o in outcomes if o in limits)  # refused by the limits set
    await assert_consistent(store, 10**6 - allowed)
    assert sum(1 for p in await store.postings(KEY_ID) if p.kind == "reserve") == allowed  # refusals wrote nothing
    await store.close()
