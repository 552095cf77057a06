"""The gateway on the PostgreSQL ledger: an outage under load, and two gateway processes sharing one
database.

Outage: the server is stopped (`pg_ctl stop -m fast`) while clients keep sending requests to a
real gateway (uvicorn, the fake engine). Every answer is 200 or 503 with Retry-After, never 500;
no request reaches the engine without a reservation, and every answer delivered is paid (its
settle commits, after the journal replay if it fell in the outage). Started again, the server is
used by the same gateway without a restart: the pool reconnects by itself.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from r1nest.gateway import settlements
from r1nest.gateway.app import create_app
from r1nest.gateway.settlements import JOURNAL_FILE
from r1nest.gateway.state import EngineState
from r1nest.gateway.upstream import UpstreamConfig
from r1nest.ledger.postgres import PostgresStore
from r1nest.settings import Settings
from r1nest.testing.asgi_server import ServedApp
from r1nest.testing.fake_engine import FakeEngine
from r1nest.testing.postgres import postgres_server as own_postgres_server

from ..gateway.conftest import ADMIN_KEY, ENGINE_KEY, MODEL, GatewayProcess
PRICES = {"price_prompt_per_mtok": 1_000_000, "price_completion_per_mtok": 2_000_000}


@pytest.fixture
def engine() -> Any:
    with FakeEngine(api_key=ENGINE_KEY, served_model=MODEL) as fake:
        yield fake


def chat(client: httpx.Client, key: str, **body: Any) -> httpx.Response:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 20, **body}
    return client.post("/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {key}"})


def completions(engine: FakeEngine) -> int:
    return sum(1 for r in engine.requests if r.path == "/v1/chat/completions")


async def ledger_facts(url: str, key_id: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        kinds = dict(await conn.fetch("SELECT kind, count(*) FROM postings WHERE key_id = $1 GROUP BY kind", key_id))
        return {
            "kinds": kinds,
            "balance": await conn.fetchval("SELECT remaining_credits FROM keys WHERE key_id = $1", key_id),
            "postings_sum": await conn.fetchval("SELECT sum(credits) FROM postings WHERE key_id = $1", key_id),
            "charges": [r[0] for r in await conn.fetch(
                "SELECT credits_charged FROM postings WHERE key_id = $1 AND kind = 'settle'", key_id)],
            "pending": await conn.fetchval("SELECT count(*) FROM reservations WHERE state = 'pending'"),
        }
    finally:
        await conn.close()


@pytest.fixture
def quick_settle_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settlements, "INLINE_RETRY_S", 0.5)
    monkeypatch.setattr(settlements, "RETRY_INTERVAL_S", 0.2)


async def test_an_outage_under_load_is_503_and_the_gateway_recovers_without_a_restart(
    engine: FakeEngine, tmp_path: Path, quick_settle_retries: None
) -> None:
    import asyncio

    engine.configure(token_delay_s=0.01)
    initial = 10**9
    with own_postgres_server() as server:
        url = server.create_database("gateway")
        store = PostgresStore(url)
        settings = Settings(data_dir=tmp_path, admin_key=ADMIN_KEY, max_tokens_cap=1000, drain_timeout_s=2.0, **PRICES)
        app = create_app(settings=settings, store=store, upstream=UpstreamConfig(engine.url, ENGINE_KEY, MODEL),
                         state=EngineState())
        served = ServedApp(app).start()
        answers: list[tuple[float, int, dict[str, str], str]] = []
        stop = threading.Event()
        try:
            with httpx.Client(base_url=served.url, timeout=60) as admin:
                created = admin.post("/admin/keys", json={"name": "load", "credits": initial},
                                     headers={"Authorization": f"Bearer {ADMIN_KEY}"})
                assert created.status_code == 201, created.text
            key_id, key = created.json()["id"], created.json()["key"]

            def client_loop() -> None:
                with httpx.Client(base_url=served.url, timeout=60) as client:
                    while not stop.is_set():
                        response = chat(client, key, stream=len(answers) % 2 == 1)
                        answers.append((time.monotonic(), response.status_code, dict(response.headers), response.text))

            def count(status: int, since: float = 0.0) -> int:
                return sum(1 for at, code, _, _ in answers if code == status and at >= since)

            with ThreadPoolExecutor(6) as pool:
                loops = [pool.submit(client_loop) for _ in range(6)]
                try:
                    await wait_for(lambda: count(200) >= 20)
                    await asyncio.to_thread(server.stop)  # pg_ctl stop -m fast, mid-load
                    stopped_at = time.monotonic()
                    await wait_for(lambda: count(503, since=stopped_at) >= 20)
                    await asyncio.to_thread(server.start)
                    restarted_at = time.monotonic()
                    await wait_for(lambda: count(200, since=restarted_at) >= 20)  # recovered, same gateway
                finally:
                    stop.set()
                for done in loops:
                    done.result()
            # the settles that fell in the outage were journaled; the gateway replays them
            journal = tmp_path / JOURNAL_FILE
            await wait_for(lambda: not journal.exists())
        finally:
            stop.set()
            served.stop()
        statuses = {code for _, code, _, _ in answers}
        assert statuses <= {200, 503}, [text for _, code, _, text in answers if code not in (200, 503)][:3]
        unavailable = [(headers, text) for _, code, headers, text in answers if code == 503]
        assert all(int(headers["retry-after"]) >= 1 and "ledger_unavailable" in text for headers, text in unavailable)

        # a reservation the server committed but could not confirm before it went down is the
        # sweeper's, as after any crash
        await store.sweep_expired(now=time.time() + 10**6)
        facts = await ledger_facts(url, key_id)
        await store.close()
    served_ok = count(200)
    assert facts["pending"] == 0
    assert facts["kinds"].get("settle", 0) == served_ok == completions(engine)  # each answer paid once
    assert facts["kinds"]["reserve"] == served_ok + facts["kinds"].get("void", 0)  # no call without a reservation
    assert len(set(facts["charges"])) == 1 and facts["charges"][0] > 0  # identical requests, one price
    assert facts["balance"] == initial - sum(facts["charges"]) == facts["postings_sum"]


async def wait_for(condition: Any, timeout_s: float = 30.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_two_gateway_processes_share_one_database_without_overspending(
    engine: FakeEngine, tmp_path: Path, postgres_url: str
) -> None:
    """40 requests at once, half to each gateway, each holding its reservation while the engine
    streams; the balance affords about a third of the worst cases at once."""
    import asyncio

    engine.configure(token_delay_s=0.1)
    gateways = [
        GatewayProcess(engine.url, tmp_path / f"data{i}", log_path=tmp_path / f"gateway{i}.log",
                       R1NEST_STORE="postgres", R1NEST_DATABASE_URL=postgres_url)
        for i in range(2)
    ]
    try:
        with httpx.Client(base_url=gateways[0].url, timeout=60) as admin, \
                httpx.Client(base_url=gateways[1].url, timeout=60) as other:
            probe = admin.post("/admin/keys", json={"name": "probe", "credits": 10**6},
                               headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
            # a stream's x-remaining-credits is the balance right after its reservation
            reserved = 10**6 - int(chat(other, probe["key"], stream=True).headers["x-remaining-credits"])
            initial = reserved * 40 // 3
            created = admin.post("/admin/keys", json={"name": "shared", "credits": initial},
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        key_id, key = created.json()["id"], created.json()["key"]
        engine.clear()

        def one(i: int) -> tuple[int, int | None, str]:
            with httpx.Client(base_url=gateways[i % 2].url, timeout=60) as client:
                response = chat(client, key, stream=True)
                remaining = response.headers.get("x-remaining-credits")
                return response.status_code, int(remaining) if remaining else None, response.text

        results = await asyncio.to_thread(lambda: list(ThreadPoolExecutor(40).map(one, range(40))))
    finally:
        codes = [gateway.stop() for gateway in gateways]
    # uvicorn re-raises the SIGTERM it handled once it has shut down: -15 is a clean stop
    assert set(codes) <= {0, -signal.SIGTERM}, [gateway.log()[-3000:] for gateway in gateways]
    password = postgres_url.split(":")[2].split("@")[0]
    assert all(password not in gateway.log() for gateway in gateways)
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 406}, [text for status, _, text in results if status not in (200, 406)][:3]
    assert statuses.count(200) >= 1 and statuses.count(406) >= 1, statuses  # the balance really ran out
    assert all(remaining is None or remaining >= 0 for _, remaining, _ in results)

    facts = await ledger_facts(postgres_url, key_id)
    served_ok = statuses.count(200)
    assert facts["pending"] == 0
    assert facts["kinds"]["reserve"] == facts["kinds"]["settle"] == served_ok == completions(engine)
    assert facts["balance"] == initial - sum(facts["charges"]) == facts["postings_sum"]
