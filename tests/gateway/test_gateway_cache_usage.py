"""Prompt-cache hits at their own price, token usage recorded with each settlement, and the
usage views (`GET /v1/usage`, `GET /admin/usage`). The real engine's prefix cache is exercised in
tests/e2e/test_anthropic_real.py."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from r1nest.errors import ConfigError
from r1nest.gateway import pricing
from r1nest.gateway.pricing import Price
from r1nest.settings import load_settings

from .conftest import MODEL, Harness

CACHED_PRICE = 250_000
PRICE = Price(1_000_000, 2_000_000, cached_prompt_per_mtok=CACHED_PRICE)


def paid(harness: Harness, key_id: str) -> int:
    return -sum(p.credits for p in harness.postings(key_id) if p.kind in ("reserve", "settle", "void"))


@pytest.fixture
def cached(make_harness: Any) -> Harness:
    harness = make_harness(price_cached_prompt_per_mtok=CACHED_PRICE)
    harness.engine.configure(cached_tokens=2)
    return harness


def test_cached_prompt_tokens_are_charged_at_the_cached_price(cached: Harness, caplog: Any) -> None:
    prompt = [{"role": "user", "content": "a b c d e f g h"}]  # 8 words + 2: 10 prompt tokens
    full = Price(1_000_000, 2_000_000)
    for stream in (False, True):
        key_id, key = cached.new_key(credits=100_000)
        with caplog.at_level(logging.INFO, logger="r1nest.gateway.access"):
            response = cached.chat(key, stream=stream, messages=prompt, stream_options={"include_usage": True} if stream else None)
        assert response.status_code == 200
        # 8 uncached at 1e6/M, 2 cached at 0.25e6/M, 7 completion at 2e6/M: 8 + 0.5 + 14 -> 23 (not 24)
        assert paid(cached, key_id) == pricing.cost(PRICE, 10, 7, cached_tokens=2) == 23
        assert pricing.cost(full, 10, 7) == 24
        usage = (response.json() if not stream else
                 [json.loads(line[6:]) for line in response.text.splitlines() if '"usage"' in line][-1])["usage"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": 2}
        assert any(f"key_id={key_id}" in r.getMessage() and "cached=2" in r.getMessage() for r in caplog.records)
    metrics = cached.client.get("/metrics", headers=cached.admin).text
    assert 'r1nest_tokens_total{kind="cached_prompt"} 4' in metrics


def test_the_anthropic_route_reports_cache_reads_and_pays_them_cheaper(cached: Harness) -> None:
    key_id, key = cached.new_key(credits=100_000)
    response = cached.client.post("/v1/messages", headers={"x-api-key": key}, json={
        "model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "a b c d e f g h"}],
    })
    usage = response.json()["usage"]
    assert usage["input_tokens"] == 8 and usage["cache_read_input_tokens"] == 2
    assert paid(cached, key_id) == 23


def test_a_cached_count_beyond_the_prompt_is_capped_at_the_prompt(make_harness: Any) -> None:
    harness = make_harness(price_cached_prompt_per_mtok=0)
    harness.engine.configure(cached_tokens=10**9)
    key_id, key = harness.new_key(credits=100_000)
    assert harness.chat(key, messages=[{"role": "user", "content": "a b"}]).status_code == 200
    assert paid(harness, key_id) == pricing.cost(Price(1_000_000, 2_000_000, cached_prompt_per_mtok=0), 4, 7, 4) == 14


def test_without_a_cached_price_a_hit_costs_the_prompt_price(make_harness: Any) -> None:
    harness = make_harness()
    harness.engine.configure(cached_tokens=2)
    key_id, key = harness.new_key(credits=100_000)
    assert harness.chat(key, messages=[{"role": "user", "content": "a b c d e f g h"}]).status_code == 200
    assert paid(harness, key_id) == 24


def test_a_cached_price_above_the_prompt_price_is_refused(monkeypatch: Any, tmp_path: Any) -> None:
    monkeypatch.setenv("R1NEST_PRICE_CACHED_PROMPT_PER_MTOK", "2000000")
    monkeypatch.setenv("R1NEST_PRICE_PROMPT_PER_MTOK", "1000000")
    with pytest.raises(ConfigError, match="must not exceed price_prompt_per_mtok"):
        load_settings(data_dir=tmp_path)


def test_each_settlement_records_its_tokens_for_usage(cached: Harness) -> None:
    key_id, key = cached.new_key(credits=100_000)
    other_id, other = cached.new_key(credits=100_000)
    for _ in range(2):
        assert cached.chat(key, messages=[{"role": "user", "content": "a b c d e f g h"}]).status_code == 200
    assert cached.chat(other).status_code == 200
    own = cached.client.get("/v1/usage", params={"bucket": "hour", "from": "24h"}, headers={"Authorization": f"Bearer {key}"})
    assert own.status_code == 200, own.text
    body = own.json()
    assert body["key"] == key_id and body["bucket"] == "hour"
    assert body["totals"] == {"requests": 2, "prompt_tokens": 20, "cached_tokens": 4, "completion_tokens": 14,
                              "credits": 46}
    everyone = cached.client.get("/admin/usage", params={"bucket": "day"}, headers=cached.admin).json()
    assert everyone["key"] is None and everyone["totals"]["requests"] == 3
    one = cached.client.get("/admin/usage", params={"key": other_id}, headers=cached.admin).json()
    assert one["totals"]["requests"] == 1 and one["totals"]["cached_tokens"] == 2


def test_a_request_the_engine_failed_is_not_usage(make_harness: Any) -> None:
    harness = make_harness()
    key_id, key = harness.new_key(credits=100_000)
    harness.engine.configure(fail_before_stream=True)
    assert harness.chat(key).status_code >= 500
    body = harness.client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert body["data"] == [] and body["totals"]["requests"] == 0


def test_usage_views_refuse_bad_input_and_strangers(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=100_000)
    user = {"Authorization": f"Bearer {key}"}
    for params in ({"bucket": "week"}, {"from": "yesterday"}, {"from": "nan"}, {"from": "2026-12-01", "to": "2026-11-01"},
                   {"bucket": "hour", "from": "1970-01-01"}):
        response = harness.client.get("/v1/usage", params=params, headers=user)
        assert response.status_code == 400, (params, response.text)
    assert harness.client.get("/v1/usage").status_code == 401
    assert harness.client.get("/admin/usage", headers=user).status_code == 401  # an API key is no admin key
    assert harness.client.get("/admin/usage", params={"key": "0123456789ab"}, headers=harness.admin).status_code == 404
    assert harness.client.get("/admin/usage?from=%ff", headers=harness.admin).status_code == 400
    # /v1/usage shows the caller's own usage only: a `key` parameter changes nothing
    _, other = harness.new_key(credits=100_000)
    assert harness.chat(other).status_code == 200
    mine = harness.client.get("/v1/usage", params={"key": "anything"}, headers=user).json()
    assert mine["key"] == key_id and mine["totals"]["requests"] == 0


def test_a_free_request_is_still_usage(make_harness: Any) -> None:
    """A deployment that charges nothing still counts requests and tokens."""
    harness = make_harness(price_prompt_per_mtok=0, price_completion_per_mtok=0)
    key_id, key = harness.new_key(credits=100)
    assert harness.chat(key).status_code == 200
    assert harness.balance(key_id) == 100
    totals = harness.client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()["totals"]
    assert totals == {"requests": 1, "prompt_tokens": 4, "cached_tokens": 0, "completion_tokens": 7, "credits": 0}
