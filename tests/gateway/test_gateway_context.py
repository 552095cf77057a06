"""The `max_tokens` rules against an engine that holds requests to its context as vLLM does
(the fake engine refuses max_tokens over the context, a prompt that fills it, and prompt +
max_tokens over it; /v1/models reports max_model_len; /tokenize counts the prompt).

- absent: the context left after the engine's own prompt count (at most the cap), lowered to
  what the balance affords; the reservation is bounded by the context, not the balance;
- explicit and over what the context leaves: 400 context_length_exceeded, the engine not called;
- a prompt that alone fills the context: 400 context_length_exceeded.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import httpx
import pytest

from r1nest.gateway.pricing import Price, cost
from r1nest.gateway.shaping import TEMPLATE_OVERHEAD_TOKENS

from .conftest import MODEL, Harness

CONTEXT = 4096
PROMPT_TOKENS = 4  # "hello there" as the fake engine counts it: 2 words + 2 for the message
PRICE = Price(prompt_per_mtok=1_000_000, completion_per_mtok=2_000_000)  # make_settings' prices


def completions_sent(harness: Harness) -> list[dict[str, Any]]:
    return [r.json() for r in harness.engine.requests if r.path == "/v1/chat/completions"]


def test_absent_max_tokens_is_the_context_left_after_the_engine_counted_the_prompt(make_harness: Any) -> None:
    harness = make_harness(max_tokens_cap=100_000)
    _, key = harness.new_key(credits=10**9)
    response = harness.chat(key)
    assert response.status_code == 200, response.text
    assert completions_sent(harness)[-1]["max_tokens"] == CONTEXT - PROMPT_TOKENS
    assert [r.path for r in harness.engine.requests].count("/tokenize") == 1


def test_absent_max_tokens_never_exceeds_the_cap(harness: Harness) -> None:
    _, key = harness.new_key(credits=10**9)
    assert harness.chat(key).status_code == 200
    assert completions_sent(harness)[-1]["max_tokens"] == harness.settings.max_tokens_cap  # 1000 < 4092


def test_absent_max_tokens_is_lowered_to_the_balance(make_harness: Any) -> None:
    harness = make_harness(max_tokens_cap=100_000)
    key_id, key = harness.new_key(credits=504)  # 4 for the prompt + 2 x 250 tokens
    response = harness.chat(key)
    assert response.status_code == 200, response.text
    assert completions_sent(harness)[-1]["max_tokens"] == 250
    assert harness.balance(key_id) == 504 - cost(PRICE, PROMPT_TOKENS, 7)  # the fake answers 7 tokens


def test_requests_without_max_tokens_reserve_the_context_not_the_balance(make_harness: Any) -> None:
    """Each holds at most one context's worth, so a balance of N contexts serves N at once."""
    harness = make_harness(max_tokens_cap=100_000)
    harness.engine.configure(token_delay_s=0.05)
    one = cost(PRICE, PROMPT_TOKENS, CONTEXT - PROMPT_TOKENS)
    parallel = 12
    key_id, key = harness.new_key(credits=one * parallel)

    def call(_: int) -> int:
        with httpx.Client(base_url=harness.url, timeout=60) as client:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]}
            return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}).status_code

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        statuses = list(pool.map(call, range(parallel)))
    assert statuses == [200] * parallel
    assert harness.balance(key_id) == one * parallel - parallel * cost(PRICE, PROMPT_TOKENS, 7)


def test_explicit_max_tokens_over_what_the_context_leaves_is_400(make_harness: Any) -> None:
    harness = make_harness(max_tokens_cap=100_000)
    key_id, key = harness.new_key(credits=10**9)
    response = harness.chat(key, max_tokens=CONTEXT - PROMPT_TOKENS + 1)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert f"maximum context length is {CONTEXT} tokens" in error["message"]
    assert f"at most {CONTEXT - PROMPT_TOKENS}" in error["message"]
    assert completions_sent(harness) == []
    assert harness.balance(key_id) == 10**9
    assert harness.chat(key, max_tokens=CONTEXT - PROMPT_TOKENS).status_code == 200  # exactly fits


def test_a_prompt_that_fills_the_context_is_400(harness: Harness) -> None:
    _, key = harness.new_key(credits=10**9)
    words = " ".join(["word"] * (CONTEXT - 2))  # + 2 for the message: exactly the context
    for body in ({}, {"max_tokens": 5}, {"stream": True}):
        response = harness.chat(key, messages=[{"role": "user", "content": words}], **body)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert f"resulted in {CONTEXT} tokens" in error["message"]
    assert completions_sent(harness) == []


def test_a_short_prompt_with_max_tokens_that_fits_the_byte_bound_asks_no_count(harness: Harness) -> None:
    _, key = harness.new_key(credits=10**9)
    assert harness.chat(key, max_tokens=50).status_code == 200
    assert "/tokenize" not in [r.path for r in harness.engine.requests]  # the fast path stays fast


def test_tools_always_get_the_engines_own_count(harness: Harness) -> None:
    _, key = harness.new_key(credits=10**9)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert harness.chat(key, max_tokens=50, tools=tools).status_code == 200
    counted = [r.json() for r in harness.engine.requests if r.path == "/tokenize"]
    assert len(counted) == 1 and counted[0]["tools"] == tools
    assert counted[0]["messages"] == completions_sent(harness)[-1]["messages"]


def test_without_tokenize_the_byte_bound_decides(make_harness: Any) -> None:
    harness = make_harness(max_tokens_cap=100_000)
    harness.engine.configure(tokenize=False)
    _, key = harness.new_key(credits=10**9)
    response = harness.chat(key)
    assert response.status_code == 200, response.text
    sent = completions_sent(harness)[-1]["max_tokens"]
    assert CONTEXT - 200 < sent < CONTEXT - TEMPLATE_OVERHEAD_TOKENS  # the context less the byte bound
    response = harness.chat(key, max_tokens=CONTEXT)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert harness.chat(key).status_code == 200
    assert [r.path for r in harness.engine.requests].count("/tokenize") == 1  # asked once, then not again


def test_the_engines_own_context_refusal_keeps_openais_code(make_harness: Any) -> None:
    """Without an exact count a long prompt goes to the engine, whose refusal is relayed as
    context_length_exceeded (not a bare invalid_request)."""
    harness = make_harness(max_tokens_cap=100_000)
    harness.engine.configure(tokenize=False)
    _, key = harness.new_key(credits=10**9)
    words = " ".join(["word"] * CONTEXT)
    response = harness.chat(key, messages=[{"role": "user", "content": words}])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length" in response.json()["error"]["message"]


def test_earlier_reasoning_sent_back_is_dropped(harness: Harness) -> None:
    """A DeepSeek-style second turn: the first answer sent back with its reasoning_content."""
    _, key = harness.new_key(credits=10**9)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets me."},
        {"role": "user", "content": "and again"},
    ]
    assert harness.chat(key, messages=messages, max_tokens=20).status_code == 200
    sent = completions_sent(harness)[-1]["messages"]
    assert sent[1] == {"role": "assistant", "content": "Hello!"}


@pytest.mark.parametrize("stream", [False, True])
def test_context_known_from_the_launch_is_not_asked(make_harness: Any, stream: bool) -> None:
    from r1nest.gateway.upstream import Upstream, UpstreamConfig

    harness = make_harness(max_tokens_cap=100_000)
    upstream = harness.gateway.upstream
    assert isinstance(upstream, Upstream)
    harness.gateway.upstream_config = UpstreamConfig(harness.engine.url, upstream.config.api_key, MODEL, max_model_len=64)
    upstream._context_tokens = 64  # as serve passes the planner's value
    _, key = harness.new_key(credits=10**9)
    response = harness.chat(key, stream=stream)
    assert response.status_code == 200
    assert completions_sent(harness)[-1]["max_tokens"] == 64 - PROMPT_TOKENS
    assert "/v1/models" not in [r.path for r in harness.engine.requests]
