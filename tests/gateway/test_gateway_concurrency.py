"""200 concurrent requests against a balance that pays for only part of them (SQLite ledger)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from r1nest.gateway.pricing import Price, cost
from r1nest.ledger.sqlite import SqliteStore

from .conftest import MODEL

PRICE = Price(prompt_per_mtok=1_000_000, completion_per_mtok=2_000_000)  # as in conftest
INITIAL_CREDITS = 6_000
REQUESTS = 200


async def _one(client: httpx.AsyncClient, key: str, index: int) -> tuple[int, int | None, int | None, list[int]]:
    """(status, charge computed from the engine's usage, x-remaining-credits, balances seen)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"request {index}"}], "max_tokens": 40}
    headers = {"Authorization": f"Bearer {key}"}
    if index % 2:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            text = (await response.aread()).decode()
        header = response.headers.get("x-remaining-credits")
        if response.status_code != 200:
            return response.status_code, None, int(header) if header else None, []
        chunks = [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: {")]
        final = chunks[-1]
        usage = final["usage"]
        seen = [int(header), final["remaining_credits"]]
        return 200, cost(PRICE, usage["prompt_tokens"], usage["completion_tokens"]), int(header), seen
    response = await client.post("/v1/chat/completions", json=body, headers=headers)
    header = response.headers.get("x-remaining-credits")
    if response.status_code != 200:
        return response.status_code, None, int(header) if header else None, []
    usage = response.json()["usage"]
    return 200, cost(PRICE, usage["prompt_tokens"], usage["completion_tokens"]), int(header), [int(header)]


async def test_concurrent_spending_never_overdraws_and_adds_up(make_harness: Any, tmp_path: Any) -> None:
    store = SqliteStore(tmp_path / "ledger.sqlite3")
    harness = make_harness(store=store)
    harness.engine.configure(token_delay_s=0.002, reasoning_tokens=10, content_tokens=10)
    key_id, key = await asyncio.to_thread(harness.new_key, INITIAL_CREDITS)
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    async with httpx.AsyncClient(base_url=harness.url, timeout=60, limits=limits) as client:
        results = await asyncio.gather(*(_one(client, key, i) for i in range(REQUESTS)))

    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 406}, statuses
    served, refused = statuses.count(200), statuses.count(406)
    assert served > 10 and refused > 10  # the balance paid for part of the load, not all of it
    for _, _, header, seen in results:
        assert header is not None and header >= 0
        assert all(balance >= 0 for balance in seen)

    charges = sum(r[1] for r in results if r[1] is not None)
    final = await asyncio.to_thread(harness.balance, key_id)
    postings = await asyncio.to_thread(harness.postings, key_id)
    assert final >= 0
    assert final == INITIAL_CREDITS - charges
    assert final == sum(p.credits for p in postings)
    kinds = [p.kind for p in postings]
    assert kinds.count("reserve") == kinds.count("settle") + kinds.count("void") == served
