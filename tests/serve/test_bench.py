"""`r1nest bench`: statistics (pure) and a real load against the fake engine and the gateway."""

from __future__ import annotations

import json
import time

import pytest

from r1nest.bench import (
    RequestRecord,
    api_root,
    bench_async,
    percentile,
    summarize,
    synthetic_prompt,
)
from r1nest.errors import ConfigError
from r1nest.testing.fake_engine import Behavior, FakeEngine


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(list(reversed(values)), 0) == 1.0 and percentile(values, 100) == 100.0
    with pytest.raises(ValueError):
        percentile(values, 101)


def _record(start: float, first: float, gaps: list[float], tokens: int, status: int = 200,
            error: str | None = None) -> RequestRecord:
    times = [first]
    for gap in gaps:
        times.append(times[-1] + gap)
    return RequestRecord(status=status, started_s=start, first_token_s=first, ended_s=times[-1],
                         token_times_s=times, completion_tokens=tokens, prompt_tokens=10, error=error)


def test_summary_separates_latencies_throughput_and_errors() -> None:
    records = [
        _record(0.0, 0.1, [0.01, 0.01, 0.03], 4),
        _record(0.0, 0.3, [0.02, 0.02, 0.02], 4),
        RequestRecord(status=503, started_s=0.0, ended_s=0.01, error="http 503"),
        RequestRecord(status=503, started_s=0.0, ended_s=0.01, error="http 503"),
        RequestRecord(status=None, started_s=0.0, ended_s=0.5, error="connection"),
        _record(0.0, 0.2, [0.5], 2, error="stream cut"),  # produced tokens, but failed
    ]
    report = summarize(records, wall_s=2.0, url="http://x", model="m", concurrency=2,
                       credits_before=1000, credits_after=958)
    assert report.requests == 6 and report.ok == 2
    assert report.errors == {"connection": 1, "http 503": 2, "stream cut": 1}
    assert report.ttft_s.p50 == pytest.approx(0.2) and report.ttft_s.count == 2
    assert report.itl_s.count == 6 and report.itl_s.p50 == pytest.approx(0.02)  # failed stream's gap excluded
    assert report.output_tokens == 10 and report.output_tokens_per_s == pytest.approx(5.0)
    assert report.request_output_tokens_per_s.p50 == pytest.approx((4 / 0.05 + 4 / 0.06) / 2)
    assert report.credits_spent == 42
    doc = report.to_json()
    assert json.loads(json.dumps(doc))["credits_spent"] == 42


def test_no_credits_against_a_bare_engine() -> None:
    report = summarize([], wall_s=1.0, url="u", model="m", concurrency=1)
    assert report.credits_spent is None and report.ttft_s.p50 is None and report.output_tokens_per_s == 0


def test_inputs() -> None:
    assert api_root("http://h:8000/v1/") == "http://h:8000" == api_root("http://h:8000")
    with pytest.raises(ConfigError):
        api_root("h:8000")
    assert len(synthetic_prompt(50).split()) == 50


async def test_load_against_the_fake_engine_directly() -> None:
    with FakeEngine(Behavior(reasoning_tokens=3, content_tokens=5, token_delay_s=0.002, api_key="ek")) as engine:
        report = await bench_async(engine.url, "ek", model=None, concurrency=4, prompt_tokens=16, max_tokens=64,
                                   duration_s=None, requests=12)
    assert report.model == "fake-r1" and report.requests == 12 and report.ok == 12
    assert report.output_tokens == 12 * 8
    assert report.ttft_s.count == 12 and report.itl_s.count == 12 * 7
    assert report.credits_before is None and report.credits_spent is None


async def test_errors_are_counted_by_status() -> None:
    with FakeEngine(Behavior(fail_before_stream=True)) as engine:
        report = await bench_async(engine.url, None, model="fake-r1", concurrency=2, prompt_tokens=4, max_tokens=8,
                                   duration_s=None, requests=4)
    assert report.ok == 0 and report.errors == {"http 500": 4}
    with FakeEngine(Behavior(fail_after_chunks=2)) as engine:
        report = await bench_async(engine.url, None, model="fake-r1", concurrency=1, prompt_tokens=4, max_tokens=8,
                                   duration_s=None, requests=2)
    assert report.errors == {"stream error": 2}


async def test_credits_spent_through_the_gateway(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Through a real gateway (uvicorn on loopback): credits spent == sum of what the ledger charged."""
    import asyncio
    import socket

    from r1nest.accounts import create_api_key
    from r1nest.gateway.app import create_app
    from r1nest.gateway.cli import uvicorn_server
    from r1nest.gateway.pricing import Price, cost
    from r1nest.gateway.upstream import UpstreamConfig
    from r1nest.ledger.memory import MemoryStore
    from r1nest.settings import Settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(data_dir=tmp_path, host="127.0.0.1", port=port)
    store = MemoryStore()
    _, key = await create_api_key(store, name="bench", credits=10_000_000, now=time.time())
    with FakeEngine(Behavior(reasoning_tokens=2, content_tokens=3)) as engine:
        app = create_app(settings=settings, store=store, admin_key="r1a-x",
                         upstream=UpstreamConfig(url=engine.url, served_model="fake-r1"))
        server = uvicorn_server(app, settings, loop="asyncio", http="h11")
        serve_task = asyncio.create_task(server.serve())
        try:
            deadline = time.monotonic() + 30
            while not server.started:
                assert time.monotonic() < deadline and not serve_task.done(), "the gateway did not start"
                await asyncio.sleep(0.02)
            report = await bench_async(f"http://127.0.0.1:{port}/v1", key, model=None, concurrency=3,
                                       prompt_tokens=8, max_tokens=16, duration_s=None, requests=6)
        finally:
            server.should_exit = True
            await asyncio.wait_for(serve_task, 10)
    assert report.ok == 6 and report.output_tokens == 30
    per_request = cost(Price.from_settings(settings), report.prompt_tokens // 6, 5)
    assert report.credits_spent == 6 * per_request > 0
