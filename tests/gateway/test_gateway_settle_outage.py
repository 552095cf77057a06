"""A delivered answer is paid even when the ledger is unavailable at settle time.

The outage is real: another process holds SQLite's write lock (BEGIN EXCLUSIVE) longer than the
store's busy timeout (shortened here so the test is quick). The settle is retried, journaled in
the data dir, and committed once the lock is gone; the sweeper never voids it. A request that
cannot reserve during the outage gets 503 with Retry-After, not 500.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from r1nest.gateway import settlements
from r1nest.gateway.pricing import Price, cost
from r1nest.gateway.settlements import JOURNAL_FILE, PendingSettle, Settlements
from r1nest.ledger import sqlite as sqlite_ledger

from .conftest import MODEL

PRICE = Price(prompt_per_mtok=1_000_000, completion_per_mtok=2_000_000)  # make_settings' prices
PROMPT_TOKENS, COMPLETION_TOKENS = 4, 7  # the fake engine's answer to "hello there"
LOCK_S = 3.0


@pytest.fixture
def quick_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_ledger, "BUSY_TIMEOUT_MS", 200)
    monkeypatch.setattr(settlements, "INLINE_RETRY_S", 0.5)
    monkeypatch.setattr(settlements, "RETRY_INTERVAL_S", 0.2)


@pytest.fixture
def sqlite_harness(make_harness: Any, tmp_path: Path, quick_outage: None) -> Any:
    store = sqlite_ledger.SqliteStore(tmp_path / "ledger.sqlite3")
    return make_harness(store=store)


class Lock:
    """Another process holding the ledger's write lock for `seconds`."""

    def __init__(self, path: Path, seconds: float) -> None:
        code = ("import sqlite3, sys, time\n"
                "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "c.execute('BEGIN EXCLUSIVE')\n"
                "print('locked', flush=True)\n"
                f"time.sleep({seconds})\n"
                "c.execute('COMMIT')\n")
        self.process = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "locked"

    def wait(self) -> None:
        self.process.wait(timeout=30)


def wait_until(condition: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def locked_later(sqlite_harness: Any) -> Iterator[Any]:
    """Start a request, lock the ledger once the engine has it (reserved), let it finish."""
    locks: list[Lock] = []

    def run(**body: Any) -> tuple[httpx.Response, Lock]:
        harness = sqlite_harness
        harness.engine.configure(token_delay_s=0.15)
        result: dict[str, httpx.Response] = {}

        def call() -> None:
            with httpx.Client(base_url=harness.url, timeout=60) as client:
                payload = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], **body}
                result["response"] = client.post("/v1/chat/completions", json=payload,
                                                 headers={"Authorization": f"Bearer {run.key}"})

        thread = threading.Thread(target=call)
        thread.start()
        wait_until(lambda: any(r.path == "/v1/chat/completions" for r in harness.engine.requests))
        lock = Lock(harness.store.path, LOCK_S)
        locks.append(lock)
        thread.join(timeout=60)
        return result["response"], lock

    run.key = ""  # type: ignore[attr-defined]
    yield run
    for lock in locks:
        lock.wait()


@pytest.mark.parametrize("stream", [False, True])
def test_a_settle_during_an_outage_is_journaled_then_paid(sqlite_harness: Any, locked_later: Any, stream: bool) -> None:
    harness = sqlite_harness
    key_id, key = harness.new_key(credits=100_000)
    locked_later.key = key
    response, lock = locked_later(max_tokens=50, stream=stream)
    assert response.status_code == 200
    journal = Path(harness.settings.data_dir) / JOURNAL_FILE
    assert lock.process.poll() is None, "the answer came after the lock: the outage was not tested"
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [(e["key_id"], e["credits"]) for e in entries] == [(key_id, cost(PRICE, PROMPT_TOKENS, COMPLETION_TOKENS))]
    lock.wait()
    wait_until(lambda: harness.balance(key_id) == 100_000 - cost(PRICE, PROMPT_TOKENS, COMPLETION_TOKENS))
    wait_until(lambda: not journal.exists())
    # the sweeper, even long after every deadline, finds nothing to void
    assert harness.served.call(harness.store.sweep_expired(now=time.time() + 10**6)) == 0
    assert [p.kind for p in harness.postings(key_id)][-2:] == ["reserve", "settle"]


def test_reserve_during_an_outage_is_503_with_retry_after(sqlite_harness: Any) -> None:
    harness = sqlite_harness
    key_id, key = harness.new_key(credits=100_000)
    lock = Lock(harness.store.path, LOCK_S)
    try:
        response = harness.chat(key, max_tokens=5)
    finally:
        lock.wait()
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "ledger_unavailable"
    assert int(response.headers["retry-after"]) >= 1
    assert not [r for r in harness.engine.requests if r.path == "/v1/chat/completions"]
    assert harness.balance(key_id) == 100_000


async def test_the_journal_is_replayed_before_the_sweep(tmp_path: Path) -> None:
    """A gateway that died with a journaled settle: the next one commits it at startup, even
    though the reservation's deadline has passed (the sweep would void it)."""
    from r1nest.accounts import create_api_key
    from r1nest.gateway.app import create_app
    from r1nest.gateway.upstream import UpstreamConfig

    from .conftest import ADMIN_KEY, make_settings

    store = sqlite_ledger.SqliteStore(tmp_path / "ledger.sqlite3")
    try:
        record, _ = await create_api_key(store, name="t", credits=1000, now=time.time())
        reservation = await store.reserve(record.key_id, 300, ttl_s=10, now=time.time() - 3600)
        earlier_run = Settlements(store, tmp_path / JOURNAL_FILE, clock=time.time)
        await earlier_run._journal(PendingSettle(reservation.reservation_id, record.key_id, 120), RuntimeError("outage"))
        app = create_app(settings=make_settings(tmp_path), store=store, admin_key=ADMIN_KEY,
                         upstream=UpstreamConfig("http://127.0.0.1:9"))
        gateway = app.state.gateway
        await gateway.startup()
        try:
            assert await store.balance(record.key_id) == 1000 - 120
            assert [p.kind for p in await store.postings(record.key_id)][-1] == "settle"
            assert not (tmp_path / JOURNAL_FILE).exists()
        finally:
            await gateway.shutdown()
    finally:
        await store.close()
