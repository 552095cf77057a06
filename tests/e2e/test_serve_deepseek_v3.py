"""The whole path on the tiny DeepSeek-V3-architecture model (MLA + MoE), real vLLM CPU build:
OpenAI SDK -> r1nest gateway -> vLLM with --reasoning-parser deepseek_r1."""

from __future__ import annotations

import time

import httpx
import pytest

from r1nest.gateway.pricing import Price, cost
from r1nest.tinymodel import SCRIPT_CONTENT, SCRIPT_REASONING

from r1nest.testing.serve_process import Served, generated_tokens, running_requests

pytestmark = pytest.mark.engine

MESSAGES = [{"role": "user", "content": "Hi there!"}]


def _client(served: Served):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=f"{served.url}/v1", api_key=served.key, max_retries=0, timeout=120)


def test_503_with_retry_after_while_warming(serve_v3: Served) -> None:
    health, chat = serve_v3.warming_health, serve_v3.warming_chat
    assert health is not None and chat is not None, "the gateway was never seen warming"
    assert health.status_code == 503 and health.json()["status"] == "warming"
    assert health.json()["eta_s"] > 0
    assert chat.status_code == 503 and int(chat.headers["retry-after"]) >= 1
    assert chat.json()["error"]["code"] == "engine_unavailable"
    # nothing was charged: the balance then was the key's whole grant (other tests spend since)
    assert chat.headers["x-remaining-credits"] == str(_granted_credits(serve_v3))


def _granted_credits(served: Served) -> int:
    """The credits the deployment's key was created with, read from its ledger."""
    import asyncio

    from r1nest.keys import parse_key_id
    from r1nest.ledger.sqlite import SqliteStore

    async def grant() -> int:
        store = SqliteStore(served.data_dir / "ledger.sqlite3")
        try:
            key_id = parse_key_id(served.key)
            assert key_id is not None
            postings = await store.postings(key_id)
        finally:
            await store.close()
        assert postings[0].kind == "grant"
        return postings[0].credits

    return asyncio.run(grant())


def test_sdk_non_streaming_reasoning_content_and_exact_charge(serve_v3: Served, price: Price) -> None:
    client = _client(serve_v3)
    before = serve_v3.credits()
    raw = client.chat.completions.with_raw_response.create(
        model=serve_v3.state["served_model"], messages=MESSAGES, max_tokens=40,
    )
    completion = raw.parse()
    message = completion.choices[0].message
    assert message.reasoning_content == SCRIPT_REASONING  # parsed by vLLM, renamed by the gateway
    assert message.content.startswith("\n\n" + SCRIPT_CONTENT)
    assert not hasattr(message, "reasoning") or getattr(message, "reasoning", None) is None
    usage = completion.usage
    assert usage.completion_tokens == 40 and completion.choices[0].finish_reason == "length"
    charged = cost(price, usage.prompt_tokens, usage.completion_tokens)
    assert int(raw.headers["x-remaining-credits"]) == before - charged
    assert serve_v3.credits() == before - charged


def test_sdk_streaming_reasoning_then_content_and_exact_charge(serve_v3: Served, price: Price) -> None:
    client = _client(serve_v3)
    before = serve_v3.credits()
    stream = client.chat.completions.create(
        model=serve_v3.state["served_model"], messages=MESSAGES, max_tokens=30, stream=True,
        stream_options={"include_usage": True},
    )
    reasoning, content, usage, remaining = [], [], None, None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            if getattr(delta, "reasoning_content", None):
                assert not content, "reasoning after content"
                reasoning.append(delta.reasoning_content)
            if delta.content:
                content.append(delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
            remaining = (chunk.model_extra or {}).get("remaining_credits")
    assert "".join(reasoning) == SCRIPT_REASONING
    assert "".join(content).startswith("\n\n" + SCRIPT_CONTENT)
    assert usage is not None and usage.completion_tokens == 30
    charged = cost(price, usage.prompt_tokens, usage.completion_tokens)
    assert serve_v3.credits() == before - charged
    assert remaining == before - charged


def test_client_disconnect_frees_the_engine(serve_v3: Served, price: Price) -> None:
    """A client that leaves mid-stream: the gateway closes the engine connection and vLLM stops
    generating (its token counter settles far below max_tokens; a live gauge is not used, a
    starved 2-core box may never show it), and the charge is for what was produced."""
    before = serve_v3.credits()
    generated_before = generated_tokens(serve_v3.engine_url)
    max_tokens = 12_000  # minutes of CPU generation: far more than runs before the client leaves
    body = {"model": serve_v3.state["served_model"], "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
    headers = {"Authorization": f"Bearer {serve_v3.key}"}
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", f"{serve_v3.url}/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            reserved_balance = int(response.headers["x-remaining-credits"])
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data: {")
                if events >= 3:
                    break
            assert events >= 3
        # leaving the block closed the connection mid-stream
    deadline = time.monotonic() + 90
    last, stable_since = -1.0, time.monotonic()
    while True:  # wait until vLLM has generated nothing more for 3 s, and nothing is running
        now_generated = generated_tokens(serve_v3.engine_url)
        if now_generated != last:
            last, stable_since = now_generated, time.monotonic()
        elif time.monotonic() - stable_since > 3 and running_requests(serve_v3.engine_url) == 0:
            break
        assert time.monotonic() < deadline, "vLLM kept generating for the abandoned request"
        time.sleep(0.3)
    assert last - generated_before < max_tokens / 2, "vLLM generated the whole answer: it was not aborted"
    deadline = time.monotonic() + 30
    while (after := serve_v3.credits()) <= reserved_balance:  # the settle returns the unused part
        assert time.monotonic() < deadline, "the abandoned stream's reservation was never settled"
        time.sleep(0.1)
    spent = before - after
    assert 0 < spent < cost(price, 10, max_tokens) // 2


def test_engine_is_on_loopback_behind_its_own_key_which_never_leaks(serve_v3: Served) -> None:
    from pathlib import Path

    assert serve_v3.engine_url.startswith("http://127.0.0.1:")
    response = httpx.post(f"{serve_v3.engine_url}/v1/chat/completions", timeout=10,
                          headers={"Authorization": f"Bearer {serve_v3.key}"},
                          json={"model": serve_v3.state["served_model"], "messages": MESSAGES, "max_tokens": 1})
    assert response.status_code == 401  # the user's key is not the engine's key
    pid = serve_v3.engine_pid
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    engine_key = environ["VLLM_API_KEY"]
    assert len(engine_key) >= 32
    assert engine_key not in Path(f"/proc/{pid}/cmdline").read_text()
    log = serve_v3.log_tail(10**8)
    assert engine_key not in log
    assert log.count(serve_v3.key) == 1  # the demo key: shown once, in the banner, never logged


def test_max_tokens_and_the_context_on_the_real_engine(serve_v3: Served) -> None:
    """vLLM's own context (16,384 tokens for the tiny model): an explicit max_tokens beyond what
    the prompt leaves, and a prompt that fills the context, are 400 context_length_exceeded from
    the gateway, nothing charged; max_tokens that exactly fits the engine's own count is taken."""
    from openai import BadRequestError

    client = _client(serve_v3)
    model = serve_v3.state["served_model"]
    before = serve_v3.credits()
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16_384)
    error = refused.value.body
    assert refused.value.code == "context_length_exceeded" and "16384 tokens" in error["message"]
    room = int(error["message"].rsplit("at most ", 1)[1].split(" ")[0])  # the largest that fits
    assert 16_300 < room < 16_384
    with pytest.raises(BadRequestError) as too_long:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 17_000}], max_tokens=5)
    assert too_long.value.code == "context_length_exceeded"
    assert serve_v3.credits() == before  # refusals cost nothing
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=room, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:  # the engine accepts it: leave after the first tokens
        if chunk.choices and (chunk.choices[0].delta.content or getattr(chunk.choices[0].delta, "reasoning_content", None)):
            break
    stream.close()
