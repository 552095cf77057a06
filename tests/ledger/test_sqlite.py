"""SQLite specifics: durability settings (which operations commit with synchronous FULL and which
with NORMAL), crashes (SIGKILL between reserve and settle), reopening, two processes on one file,
the writer thread, and callers that stop waiting."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from r1nest.errors import InvalidLedgerArgument, ReservationClosed, StoreError, StoreUnavailable
from r1nest.ledger import open_store
from r1nest.ledger.sqlite import SYNC_FULL, SYNC_NORMAL, SqliteStore, sync_level
from r1nest.settings import Settings

T0 = 1_700_000_000.0
KEY_ID = "0123456789ab"


async def new_store(path: Path, credits: int = 1000) -> SqliteStore:
    store = SqliteStore(path)
    await store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="t", credits=credits, expires_at=None, now=T0)
    return store


async def assert_consistent(store: SqliteStore, expected: int) -> None:
    assert await store.balance(KEY_ID) == expected
    assert sum(p.credits for p in await store.postings(KEY_ID)) == expected


def run_child(path: Path, body: str) -> subprocess.Popen[str]:
    """A separate Python process that opens the ledger at `path` and runs `body` (async)."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from r1nest.ledger.sqlite import SqliteStore

        async def main(store):
        {body}

        asyncio.run(main(SqliteStore(sys.argv[1])))
        """
    ).format(body=textwrap.indent(textwrap.dedent(body), "    "))
    return subprocess.Popen(
        [sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


async def until(condition: Callable[[], Any], timeout_s: float = 30.0) -> None:
    """Wait for `condition()` (a bool or an awaitable of one), polling; bounded and generous."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"condition not reached in {timeout_s} s"
        await asyncio.sleep(0.01)


def read_line(child: subprocess.Popen[str], timeout_s: float = 30.0) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(child.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not result or not result[0]:
        child.kill()
        raise AssertionError(f"child said nothing; stderr: {child.stderr.read()[-2000:]}")
    return result[0].strip()


async def test_durability_settings_at_startup(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "l.sqlite3")  # the schema is created with FULL commits
    synchronous = await store._submit(lambda c: c.execute("PRAGMA synchronous").fetchone()[0], writes=False)
    mode = await store._submit(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0], writes=False)
    assert (synchronous, mode) == (SYNC_FULL, "wal")  # FULL: a commit is on disk when it returns
    await store.close()


def test_only_reserve_void_and_sweep_may_commit_without_fsync() -> None:
    cases = [
        ((), SYNC_NORMAL),
        (("reserve",), SYNC_NORMAL),
        (("void",), SYNC_NORMAL),
        (("sweep",), SYNC_NORMAL),
        (("reserve", "void", "sweep", "reserve"), SYNC_NORMAL),
        (("settle",), SYNC_FULL),
        (("topup",), SYNC_FULL),
        (("create_key",), SYNC_FULL),
        (("revoke_key",), SYNC_FULL),
        (("other",), SYNC_FULL),  # anything unnamed or new is durable
        (("reserve", "reserve", "settle", "void"), SYNC_FULL),
        (("void", "topup"), SYNC_FULL),
        (("sweep", "revoke_key"), SYNC_FULL),
    ]
    for operations, level in cases:
        assert sync_level(operations) == level, operations


def record_commits(store: SqliteStore) -> list[tuple[tuple[str, ...], int]]:
    """Each commit's write operations and the synchronous level in force, read inside the
    transaction just before COMMIT (the level SQLite applies to that commit)."""
    commits: list[tuple[tuple[str, ...], int]] = []
    store.before_commit = lambda conn, ops: commits.append(
        (ops, conn.execute("PRAGMA synchronous").fetchone()[0])
    )
    return commits


async def test_each_operation_commits_with_the_durability_it_needs(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "l.sqlite3")
    commits = record_commits(store)
    await store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="t", credits=1000, expires_at=None, now=T0)
    first = await store.reserve(KEY_ID, 100, ttl_s=60, now=T0)
    await store.settle(first.reservation_id, 40, now=T0)
    second = await store.reserve(KEY_ID, 100, ttl_s=60, now=T0)
    await store.void(second.reservation_id, now=T0)
    await store.topup(KEY_ID, 5, idempotency_key="a", now=T0)
    await store.reserve(KEY_ID, 100, ttl_s=60, now=T0)
    assert await store.sweep_expired(now=T0 + 61) == 1
    await store.revoke_key(KEY_ID)
    # reads open no transaction and commit nothing
    await store.get_key(KEY_ID)
    await store.balance(KEY_ID)
    await store.postings(KEY_ID)
    await store.list_keys()
    assert commits == [
        (("create_key",), SYNC_FULL),
        (("reserve",), SYNC_NORMAL),
        (("settle",), SYNC_FULL),
        (("reserve",), SYNC_NORMAL),
        (("void",), SYNC_NORMAL),
        (("topup",), SYNC_FULL),
        (("reserve",), SYNC_NORMAL),
        (("sweep",), SYNC_NORMAL),
        (("revoke_key",), SYNC_FULL),
    ]
    await assert_consistent(store, 1000 - 40 + 5)
    await store.close()


async def test_a_reservation_voided_for_a_departed_caller_commits_without_fsync(tmp_path: Path) -> None:
    store = await new_store(tmp_path / "l.sqlite3", credits=100)
    commits = record_commits(store)
    task = asyncio.create_task(store.reserve(KEY_ID, 60, ttl_s=3600, now=T0))
    await asyncio.sleep(0)  # queued to the writer
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: len(commits) >= 2)
    assert commits == [(("reserve",), SYNC_NORMAL), (("void",), SYNC_NORMAL)]
    await assert_consistent(store, 100)
    await store.close()


async def test_a_batch_commits_full_if_any_operation_in_it_needs_it(tmp_path: Path) -> None:
    store = await new_store(tmp_path / "l.sqlite3", credits=1000)
    to_settle = await store.reserve(KEY_ID, 10, ttl_s=60, now=T0)
    to_void = await store.reserve(KEY_ID, 10, ttl_s=60, now=T0)
    commits = record_commits(store)
    started, release = threading.Event(), threading.Event()

    def hold_the_writer(conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(10)

    async def one_batch(*operations: Coroutine[Any, Any, object]) -> None:
        """Run the operations as one group-committed batch: the writer is held until all are queued."""
        started.clear()
        release.clear()
        held = asyncio.create_task(store._submit(hold_the_writer, writes=False))
        assert await asyncio.to_thread(started.wait, 10)
        tasks = [asyncio.create_task(op) for op in operations]
        for _ in range(100):
            await asyncio.sleep(0)  # every task queues its operation
        release.set()
        await held
        await asyncio.gather(*tasks)

    await one_batch(*[store.reserve(KEY_ID, 1, ttl_s=60, now=T0) for _ in range(3)])
    await one_batch(
        store.reserve(KEY_ID, 1, ttl_s=60, now=T0),
        store.settle(to_settle.reservation_id, 4, now=T0),
        store.reserve(KEY_ID, 1, ttl_s=60, now=T0),
    )
    await one_batch(store.void(to_void.reservation_id, now=T0), store.topup(KEY_ID, 1, idempotency_key="x", now=T0))
    assert commits == [
        (("reserve", "reserve", "reserve"), SYNC_NORMAL),
        (("reserve", "settle", "reserve"), SYNC_FULL),
        (("void", "topup"), SYNC_FULL),
    ]
    await assert_consistent(store, 1000 - 4 - 3 * 1 - 2 * 1 + 1)
    await store.close()


async def test_operations_run_off_the_event_loop_thread(tmp_path: Path) -> None:
    store = await new_store(tmp_path / "l.sqlite3")
    thread_id = await store._submit(lambda c: threading.get_ident(), writes=False)
    assert thread_id != threading.get_ident()
    await store.close()


async def test_the_loop_keeps_running_while_the_writer_waits(tmp_path: Path) -> None:
    store = await new_store(tmp_path / "l.sqlite3")
    ticks = 0
    beaten = threading.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            if ticks == 10:
                beaten.set()
            await asyncio.sleep(0.01)

    beating = asyncio.create_task(heartbeat())
    # A slow disk: the write waits until the loop has ticked 10 times, which it can only do if
    # the writer does not hold it (bounded: a blocked loop makes this False after 30 s).
    assert await store._submit(lambda c: beaten.wait(30))
    beating.cancel()
    assert ticks >= 10
    await store.close()


async def test_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    store = await new_store(path, credits=500)
    reservation = await store.reserve(KEY_ID, 100, ttl_s=60, now=T0)
    await store.topup(KEY_ID, 50, idempotency_key="once", now=T0)
    await store.close()

    store = SqliteStore(path)
    await assert_consistent(store, 450)
    assert await store.topup(KEY_ID, 50, idempotency_key="once", now=T0) == 450
    assert await store.settle(reservation.reservation_id, 40, now=T0) == 510
    await store.close()


async def test_kill_between_reserve_and_settle_then_sweep_restores_the_balance(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    store = await new_store(path, credits=1000)
    await store.close()

    child = run_child(path, f"""
        reservation = await store.reserve({KEY_ID!r}, 400, ttl_s=60, now={T0})
        print(reservation.reservation_id, flush=True)
        await asyncio.sleep(60)  # the request would be streaming here
        await store.settle(reservation.reservation_id, 1, now={T0})
    """)
    reservation_id = read_line(child)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL

    store = SqliteStore(path)
    await assert_consistent(store, 600)  # the reservation (a NORMAL commit) survived the kill
    assert await store.sweep_expired(now=T0 + 59) == 0  # not yet expired: a live stream keeps it
    assert await store.sweep_expired(now=T0 + 61) == 1
    await assert_consistent(store, 1000)
    postings = await store.postings(KEY_ID)
    assert [(p.kind, p.credits, p.reservation_id) for p in postings] == [
        ("grant", 1000, None), ("reserve", -400, reservation_id), ("void", 400, reservation_id),
    ]
    with pytest.raises(ReservationClosed):
        await store.settle(reservation_id, 1, now=T0 + 62)
    await store.close()


async def test_kill_after_a_void_keeps_the_void(tmp_path: Path) -> None:
    """Reserve and void commit with synchronous=NORMAL: both survive a killed process."""
    path = tmp_path / "l.sqlite3"
    store = await new_store(path, credits=1000)
    await store.close()

    child = run_child(path, f"""
        kept = await store.reserve({KEY_ID!r}, 300, ttl_s=60, now={T0})
        voided = await store.reserve({KEY_ID!r}, 200, ttl_s=60, now={T0})
        await store.void(voided.reservation_id, now={T0})
        print(kept.reservation_id, voided.reservation_id, flush=True)
        await asyncio.sleep(60)
    """)
    kept, voided = read_line(child).split()
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL

    store = SqliteStore(path)
    await assert_consistent(store, 700)
    assert [(p.kind, p.credits, p.reservation_id) for p in await store.postings(KEY_ID)] == [
        ("grant", 1000, None), ("reserve", -300, kept), ("reserve", -200, voided), ("void", 200, voided),
    ]
    with pytest.raises(ReservationClosed):
        await store.settle(voided, 1, now=T0)
    assert await store.settle(kept, 100, now=T0) == 900
    await store.close()


async def test_kill_in_the_middle_of_busy_traffic_leaves_a_consistent_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    initial = 10**9
    store = await new_store(path, credits=initial)
    await store.close()

    child = run_child(path, f"""
        await store.reserve({KEY_ID!r}, 100, ttl_s=60, now={T0})  # a long stream, open at the kill
        settled = [0]
        async def request(i):
            r = await store.reserve({KEY_ID!r}, 100, ttl_s=60, now={T0})
            await asyncio.sleep(0.001 * (i % 7))  # the engine at work
            await store.settle(r.reservation_id, i % 101, now={T0})
            settled[0] += 1
            if settled[0] == 50:
                print("busy", flush=True)
        async def worker(n):
            for i in range(100000):
                await request(i + n)
        await asyncio.gather(*[worker(n) for n in range(16)])
    """)
    assert read_line(child) == "busy"
    await asyncio.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)

    with sqlite3.connect(path) as db:
        pending = db.execute("SELECT COUNT(*) FROM reservations WHERE state = 'pending'").fetchone()[0]
    assert pending > 0  # killed with requests in flight (at least the long stream)

    store = open_store(Settings(data_dir=tmp_path, store="sqlite"))
    await store.sweep_expired(now=T0 + 61)  # as the gateway's startup
    assert store.path == path  # open_store follows the settings
    balance = await store.balance(KEY_ID)
    await assert_consistent(store, balance)
    await store.close()
    with sqlite3.connect(path) as db:
        states = dict(db.execute("SELECT state, COUNT(*) FROM reservations GROUP BY state").fetchall())
        charged = db.execute("SELECT COALESCE(SUM(credits_charged), 0) FROM reservations").fetchone()[0]
    assert states.get("pending", 0) == 0
    assert states.get("settled", 0) >= 50  # the child really was busy
    assert balance == initial - charged


async def test_startup_sweep_leaves_reservations_before_their_deadline(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    store = await new_store(path, credits=100)
    reservation = await store.reserve(KEY_ID, 100, ttl_s=60, now=T0)
    await store.close()
    store = open_store(Settings(data_dir=tmp_path))
    await store.sweep_expired(now=T0 + 1)
    await assert_consistent(store, 0)
    assert await store.settle(reservation.reservation_id, 30, now=T0 + 2) == 70
    await store.close()


async def test_two_processes_write_one_file(tmp_path: Path) -> None:
    """The gateway and `r1nest keys` may hold the same ledger open at once."""
    path = tmp_path / "l.sqlite3"
    store = await new_store(path, credits=100_000)
    child = run_child(path, f"""
        for i in range(200):
            r = await store.reserve({KEY_ID!r}, 10, ttl_s=60, now={T0})
            await store.settle(r.reservation_id, 3, now={T0})
        print("done", flush=True)
    """)
    for i in range(200):
        await store.topup(KEY_ID, 1, idempotency_key=f"t{i}", now=T0)
    assert read_line(child) == "done"
    assert child.wait(30) == 0
    await assert_consistent(store, 100_000 + 200 - 200 * 3)
    await store.close()


async def test_a_cancelled_reserve_gives_its_credits_back(tmp_path: Path) -> None:
    store = await new_store(tmp_path / "l.sqlite3", credits=100)
    task = asyncio.create_task(store.reserve(KEY_ID, 60, ttl_s=3600, now=T0))
    await asyncio.sleep(0)  # queued to the writer
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def voided() -> bool:
        return await store.balance(KEY_ID) == 100 and len(await store.postings(KEY_ID)) == 3

    await until(voided)
    assert [p.kind for p in await store.postings(KEY_ID)] == ["grant", "reserve", "void"]
    await assert_consistent(store, 100)
    await store.close()


async def test_a_failing_operation_does_not_undo_its_batch_neighbours(tmp_path: Path) -> None:
    store = await new_store(tmp_path / "l.sqlite3", credits=100)
    results = await asyncio.gather(
        store.topup(KEY_ID, 5, idempotency_key="a", now=T0),
        store.reserve(KEY_ID, 10_000, ttl_s=60, now=T0),  # fails inside the same transaction
        store.topup(KEY_ID, 7, idempotency_key="b", now=T0),
        return_exceptions=True,
    )
    assert results[0] == 105 and results[2] == 112
    assert type(results[1]).__name__ == "InsufficientCredits"
    await assert_consistent(store, 112)
    await store.close()


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = await new_store(tmp_path / "l.sqlite3")
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.balance(KEY_ID)


def test_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreUnavailable, match="cannot open the ledger"):
        SqliteStore(blocker / "sub" / "l.sqlite3")


# outages: the file cannot answer -> StoreUnavailable (HTTP 503), never "bad request" ----------

from r1nest.testing.ledger_lock import locked_by_another_process  # noqa: E402


@pytest.fixture
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> int:
    from r1nest.ledger import sqlite

    monkeypatch.setattr(sqlite, "BUSY_TIMEOUT_MS", 200)
    return 200


async def test_a_write_locked_out_past_the_busy_timeout_is_store_unavailable(tmp_path: Path, short_busy_timeout) -> None:
    path = tmp_path / "l.sqlite3"
    store = await new_store(path, credits=100)
    reservation = await store.reserve(KEY_ID, 10, ttl_s=60, now=T0)
    with locked_by_another_process(path):
        started = time.monotonic()
        for call in (
            store.topup(KEY_ID, 5, idempotency_key="t", now=T0),
            store.reserve(KEY_ID, 5, ttl_s=60, now=T0),
            store.settle(reservation.reservation_id, 3, now=T0),
            store.void(reservation.reservation_id, now=T0),
            store.create_key(key_id="ba0ba0ba0ba0", key_hash="f" * 64, name="", credits=1, expires_at=None, now=T0),
            store.revoke_key(KEY_ID),
            store.sweep_expired(now=T0 + 3600),
        ):
            with pytest.raises(StoreUnavailable, match="database is locked"):
                await call
        assert time.monotonic() - started >= 7 * short_busy_timeout / 1000  # each waited its timeout
        assert await store.balance(KEY_ID) == 90  # WAL: readers are not locked out
    # the lock gone, the same calls go through: the refused ones changed nothing
    assert await store.topup(KEY_ID, 5, idempotency_key="t", now=T0) == 95
    assert await store.settle(reservation.reservation_id, 3, now=T0) == 102
    await assert_consistent(store, 102)
    await store.close()


async def test_a_store_opened_while_another_process_holds_the_lock_still_reads(tmp_path: Path, short_busy_timeout) -> None:
    path = tmp_path / "l.sqlite3"
    await (await new_store(path, credits=7)).close()
    with locked_by_another_process(path):
        store = SqliteStore(path)  # `r1nest keys list` next to a long write
        assert [k.remaining_credits for k in await store.list_keys()] == [7]
        with pytest.raises(StoreUnavailable):
            await store.topup(KEY_ID, 1, idempotency_key="x", now=T0)
    await store.close()


def test_a_file_that_is_not_a_database_is_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    path.write_bytes(b"not a database, " * 512)
    with pytest.raises(StoreUnavailable, match="cannot open the ledger"):
        SqliteStore(path)


async def test_a_statement_sqlite_refuses_is_a_bug_not_an_outage(tmp_path: Path) -> None:
    """Only "cannot answer now" errors are StoreUnavailable; a constraint or SQL error from this
    module is a bare StoreError (the gateway answers 500 and logs it)."""
    store = await new_store(tmp_path / "l.sqlite3")
    for statement in ("INSERT INTO keys (key_id) VALUES (NULL)", "SELEKT 1"):
        with pytest.raises(StoreError) as caught:
            await store._submit(lambda c, statement=statement: c.execute(statement))
        assert not isinstance(caught.value, (StoreUnavailable, InvalidLedgerArgument)), caught.value
    await assert_consistent(store, 1000)
    await store.close()


def test_open_store_picks_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    store = open_store(Settings(data_dir=tmp_path))
    assert isinstance(store, SqliteStore) and store.path == tmp_path / "ledger.sqlite3"
    asyncio.run(store.close())


# per-key limits and usage ---------------------------------------------------------------------

from r1nest.errors import KeyLimitReached  # noqa: E402
from r1nest.ledger.base import Usage, UsageBucket  # noqa: E402

# The schema of the release before per-key limits and usage (files users have on disk).
PREVIOUS_RELEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id            TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    key_hash          TEXT NOT NULL,
    created_at        REAL NOT NULL,
    expires_at        REAL,
    revoked           INTEGER NOT NULL DEFAULT 0,
    remaining_credits INTEGER NOT NULL CHECK (remaining_credits >= 0)
);
CREATE TABLE IF NOT EXISTS reservations (
    reservation_id   TEXT PRIMARY KEY,
    key_id           TEXT NOT NULL REFERENCES keys (key_id),
    credits_reserved INTEGER NOT NULL CHECK (credits_reserved >= 0),
    created_at       REAL NOT NULL,
    expires_at       REAL NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'settled', 'voided')),
    credits_charged  INTEGER CHECK (credits_charged BETWEEN 0 AND credits_reserved),
    closed_at        REAL
);
CREATE INDEX IF NOT EXISTS reservations_pending_by_deadline
    ON reservations (expires_at) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS postings (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id         TEXT NOT NULL REFERENCES keys (key_id),
    kind           TEXT NOT NULL CHECK (kind IN ('grant', 'topup', 'reserve', 'settle', 'void')),
    credits        INTEGER NOT NULL,
    at             REAL NOT NULL,
    reservation_id TEXT,
    note           TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS postings_by_key ON postings (key_id, seq);
CREATE TABLE IF NOT EXISTS topups (
    key_id          TEXT NOT NULL REFERENCES keys (key_id),
    idempotency_key TEXT NOT NULL,
    credits         INTEGER NOT NULL,
    at              REAL NOT NULL,
    PRIMARY KEY (key_id, idempotency_key)
);
"""


def previous_release_ledger(path: Path) -> None:
    """A ledger file as the previous release left it: a key with a settled reservation (charged
    30) and one still pending (60 held), every balance change posted."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(PREVIOUS_RELEASE_SCHEMA)
    conn.executescript(f"""
        BEGIN;
        INSERT INTO keys VALUES ('{KEY_ID}', 'old', '{"f" * 64}', {T0}, NULL, 0, 1000 - 100 + 70 - 60);
        INSERT INTO reservations VALUES ('{"a" * 32}', '{KEY_ID}', 100, {T0}, {T0 + 3600}, 'settled', 30, {T0 + 5});
        INSERT INTO reservations VALUES ('{"b" * 32}', '{KEY_ID}', 60, {T0 + 6}, {T0 + 3606}, 'pending', NULL, NULL);
        INSERT INTO postings (key_id, kind, credits, at, reservation_id, note) VALUES
            ('{KEY_ID}', 'grant', 1000, {T0}, NULL, ''),
            ('{KEY_ID}', 'reserve', -100, {T0}, '{"a" * 32}', ''),
            ('{KEY_ID}', 'settle', 70, {T0 + 5}, '{"a" * 32}', 'charged 30'),
            ('{KEY_ID}', 'reserve', -60, {T0 + 6}, '{"b" * 32}', '');
        COMMIT;
    """)
    conn.close()


def columns(path: Path, table: str) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    finally:
        conn.close()


async def test_a_ledger_of_the_previous_release_is_migrated_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    previous_release_ledger(path)
    assert "rpm_count" not in columns(path, "keys")
    store = SqliteStore(path)
    assert {"max_concurrency", "rate_limit_rpm", "rpm_window", "rpm_count"} <= columns(path, "keys")
    assert {"credits_charged", "prompt_tokens", "cached_tokens", "completion_tokens"} <= columns(path, "postings")
    record = await store.get_key(KEY_ID)
    assert (record.name, record.remaining_credits, record.max_concurrency, record.rate_limit_rpm) == ("old", 910, None, None)
    await assert_consistent(store, 910)
    # The old settle is one request with no tokens and its charge (read from its reservation).
    assert await store.usage(key_id=KEY_ID, since=T0, until=T0 + 60, bucket_s=60) == [
        UsageBucket(1_699_999_980.0, 1, 0, 0, 0, 30)
    ]
    # The reservation left pending by the old release holds its slot, and frees it when closed.
    with pytest.raises(KeyLimitReached):
        await store.reserve(KEY_ID, 1, ttl_s=60, now=T0 + 10, max_concurrency=1)
    assert await store.settle("b" * 32, 20, now=T0 + 20, usage=Usage(9, 4, 2)) == 950
    reservation = await store.reserve(KEY_ID, 1, ttl_s=60, now=T0 + 30, max_concurrency=1, rate_limit_rpm=1)
    await store.set_key_limits(KEY_ID, max_concurrency=2, rate_limit_rpm=None)
    await store.close()

    store = SqliteStore(path)  # reopening an up-to-date file changes nothing
    assert (await store.get_key(KEY_ID)).max_concurrency == 2
    with pytest.raises(KeyLimitReached):
        await store.reserve(KEY_ID, 1, ttl_s=60, now=T0 + 31, rate_limit_rpm=1)
    await store.void(reservation.reservation_id, now=T0 + 32)
    assert await store.usage(key_id=None, since=T0, until=T0 + 60, bucket_s=3600) == [
        UsageBucket(1_699_999_200.0, 2, 9, 4, 2, 50)
    ]
    await assert_consistent(store, 950)
    await store.close()


def test_two_processes_opening_an_old_ledger_at_once_both_migrate_it(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    previous_release_ledger(path)
    script = "import asyncio, sys\nfrom r1nest.ledger.sqlite import SqliteStore\nasyncio.run(SqliteStore(sys.argv[1]).close())"
    children = [
        subprocess.Popen([sys.executable, "-c", script, str(path)], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for child in children:
        assert child.wait(60) == 0, child.stderr.read()[-2000:]
    assert "completion_tokens" in columns(path, "postings")


def test_usage_and_limit_queries_use_their_indexes(tmp_path: Path) -> None:
    """usage() reads only the settle postings of its range; the concurrency check only the key's
    pending reservations (no scan of the tables, which grow forever)."""
    from r1nest.ledger import sqlite as ledger_sqlite

    path = tmp_path / "l.sqlite3"
    asyncio.run(SqliteStore(path).close())
    conn = sqlite3.connect(path)
    plans = {}
    for key_id in (None, KEY_ID):
        statement = []
        conn.set_trace_callback(statement.append)
        ledger_sqlite._usage(conn, key_id, T0, T0 + 60, 60)
        conn.set_trace_callback(None)
        select = statement[0]
        plans[key_id] = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {select}"))
    assert "postings_settled_by_time" in plans[None] and "SCAN p" not in plans[None], plans[None]
    assert "postings_settled_by_key" in plans[KEY_ID], plans[KEY_ID]
    plan = " ".join(row[3] for row in conn.execute(
        "EXPLAIN QUERY PLAN " + ledger_sqlite._reserve_statement(True, True),
        {"credits": 1, "key_id": KEY_ID, "now": T0, "window": T0, "max_concurrency": 2, "rate_limit_rpm": 2},
    ))
    assert "reservations_pending_by_key" in plan and "SCAN" not in plan.replace("SCAN (subquery", ""), plan
    conn.close()


async def test_refused_reservations_do_not_undo_their_batch_neighbours(tmp_path: Path) -> None:
    store = await new_store(tmp_path / "l.sqlite3", credits=1000)
    commits = record_commits(store)
    results = await asyncio.gather(
        *[store.reserve(KEY_ID, 10, ttl_s=60, now=T0, max_concurrency=5, rate_limit_rpm=8) for _ in range(12)],
        store.topup(KEY_ID, 5, idempotency_key="a", now=T0),
        return_exceptions=True,
    )
    assert max(len(ops) for ops, _ in commits) > 5  # refused and made ones shared a transaction
    made = [r for r in results[:12] if not isinstance(r, BaseException)]
    assert len(made) == 5 and all(isinstance(r, KeyLimitReached) for r in results[:12] if r not in made)
    assert results[12] == 1005 - 50
    await assert_consistent(store, 955)
    await store.close()


async def test_limits_hold_across_processes_sharing_the_file(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    store = await new_store(path, credits=1000)
    child = run_child(path, f"""
        for _ in range(3):
            await store.reserve({KEY_ID!r}, 10, ttl_s=600, now={T0}, max_concurrency=4, rate_limit_rpm=5)
        print("held", flush=True)
        await store.close()
    """)
    assert read_line(child) == "held"
    assert child.wait(30) == 0
    await store.reserve(KEY_ID, 10, ttl_s=600, now=T0, max_concurrency=4)
    with pytest.raises(KeyLimitReached, match="max_concurrency"):
        await store.reserve(KEY_ID, 10, ttl_s=600, now=T0, max_concurrency=4)
    await store.reserve(KEY_ID, 10, ttl_s=600, now=T0, rate_limit_rpm=5)
    with pytest.raises(KeyLimitReached, match="rate_limit_rpm"):
        await store.reserve(KEY_ID, 10, ttl_s=600, now=T0, rate_limit_rpm=5)
    await assert_consistent(store, 950)
    await store.close()


async def test_usage_reads_while_another_process_holds_the_write_lock(tmp_path: Path, short_busy_timeout) -> None:
    path = tmp_path / "l.sqlite3"
    store = await new_store(path, credits=100)
    reservation = await store.reserve(KEY_ID, 10, ttl_s=60, now=T0)
    await store.settle(reservation.reservation_id, 4, now=T0, usage=Usage(3, 2, 1))
    with locked_by_another_process(path):
        assert await store.usage(key_id=KEY_ID, since=T0, until=T0 + 1, bucket_s=60) == [
            UsageBucket(1_699_999_980.0, 1, 3, 2, 1, 4)
        ]
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.usage(key_id=None, since=T0, until=T0 + 1, bucket_s=60)
