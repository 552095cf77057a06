"""Beyond the OpenAI API, on the real vLLM CPU build behind `r1nest serve`: the official
`anthropic` SDK (thinking and text blocks, streamed and not, count_tokens, a thinking budget),
prompt-cache hits charged at their own price, and keep-alive comments on a quiet stream that
both SDKs read through.

The prefix cache runs on the tiny Qwen2 model: vLLM's CPU build turns prefix caching off for MLA
models (its log: "MLA is enabled on a non-GPU platform; forcing chunked prefill and prefix
caching to be disabled"), so the DeepSeek-V3 model never reports cached tokens on CPU.
"""

from __future__ import annotations

import httpx
import pytest

from r1nest.gateway.pricing import Price, cost
from r1nest.testing.serve_process import Served
from r1nest.tinymodel import SCRIPT_CONTENT, SCRIPT_REASONING

pytestmark = pytest.mark.engine

anthropic = pytest.importorskip("anthropic")

QUESTION = [{"role": "user", "content": "Hi there!"}]
# Long enough to fill whole KV-cache blocks, so that a second send is served from the prefix cache.
LONG_PROMPT = " ".join(f"word{i}" for i in range(600))


def _anthropic(served: Served) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.url, api_key=served.key, max_retries=0, timeout=120)


def _paid(price: Price, usage: anthropic.types.Usage) -> int:
    cached = usage.cache_read_input_tokens or 0
    return cost(price, usage.input_tokens + cached, usage.output_tokens, cached)


def test_anthropic_sdk_message_has_r1s_thinking_and_answer(serve_v3: Served, price: Price) -> None:
    client = _anthropic(serve_v3)
    before = serve_v3.credits()
    raw = client.messages.with_raw_response.create(model=serve_v3.state["served_model"], max_tokens=40, messages=QUESTION)
    message = raw.parse()
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == SCRIPT_REASONING  # vLLM's reasoning parser, as a thinking block
    assert message.content[1].text.startswith("\n\n" + SCRIPT_CONTENT)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 40
    assert int(raw.headers["x-remaining-credits"]) == serve_v3.credits() == before - _paid(price, message.usage)


def test_anthropic_sdk_stream_thinking_deltas_then_text_deltas(serve_v3: Served, price: Price) -> None:
    client = _anthropic(serve_v3)
    before = serve_v3.credits()
    thinking, text, order = [], [], []
    with client.messages.stream(model=serve_v3.state["served_model"], max_tokens=30, messages=QUESTION) as stream:
        for item in stream:
            if item.type == "content_block_delta":
                kind = item.delta.type
                order.append(kind)
                if kind == "thinking_delta":
                    thinking.append(item.delta.thinking)
                elif kind == "text_delta":
                    text.append(item.delta.text)
        final = stream.get_final_message()
    assert "".join(thinking) == SCRIPT_REASONING
    assert "".join(text).startswith("\n\n" + SCRIPT_CONTENT)
    assert order.index("text_delta") > max(i for i, k in enumerate(order) if k == "thinking_delta")
    assert final.usage.output_tokens == 30 and final.stop_reason == "max_tokens"
    assert serve_v3.credits() == before - _paid(price, final.usage)


def test_count_tokens_matches_the_prompt_the_engine_ran(serve_v3: Served) -> None:
    client = _anthropic(serve_v3)
    model = serve_v3.state["served_model"]
    before = serve_v3.credits()
    counted = client.messages.count_tokens(model=model, messages=QUESTION).input_tokens
    assert serve_v3.credits() == before  # counting is free
    ran = client.messages.create(model=model, max_tokens=1, messages=QUESTION).usage
    assert counted == ran.input_tokens + (ran.cache_read_input_tokens or 0)


def test_thinking_budget_cuts_the_reasoning_short(serve_v3: Served) -> None:
    """vLLM's thinking_token_budget (with --reasoning-config): the reasoning stops after the
    budget and the answer follows."""
    client = _anthropic(serve_v3)
    message = client.messages.create(
        model=serve_v3.state["served_model"], max_tokens=60, messages=QUESTION,
        thinking={"type": "enabled", "budget_tokens": 3},
    )
    thinking = message.content[0]
    assert thinking.type == "thinking" and 0 < len(thinking.thinking) < len(SCRIPT_REASONING)
    assert SCRIPT_REASONING.startswith(thinking.thinking.strip()[:4])
    assert message.content[-1].type == "text" and SCRIPT_CONTENT in message.content[-1].text


def test_a_prefix_cache_hit_is_charged_less_by_exactly_the_cached_tokens(serve_qwen2: Served, cached_price: Price) -> None:
    """The same long prompt twice: the second time vLLM serves most of it from its prefix cache,
    and the charge drops by exactly cached_tokens x (prompt price - cached price)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{serve_qwen2.url}/v1", api_key=serve_qwen2.key, max_retries=0, timeout=120)
    model = serve_qwen2.state["served_model"]
    charges, usages = [], []
    for _ in range(2):
        before = serve_qwen2.credits()
        completion = client.chat.completions.create(
            model=model, max_tokens=4, messages=[{"role": "user", "content": LONG_PROMPT}]
        )
        charges.append(before - serve_qwen2.credits())
        usages.append(completion.usage)
    first, second = usages
    assert first.prompt_tokens == second.prompt_tokens and first.completion_tokens == second.completion_tokens == 4
    cached = second.prompt_tokens_details.cached_tokens
    assert cached > first.prompt_tokens // 2, "the second send was not served from the prefix cache"
    assert charges[0] == cost(cached_price, first.prompt_tokens, 4, first.prompt_tokens_details.cached_tokens or 0)
    per_token = (cached_price.prompt_per_mtok - cached_price.cached_per_mtok) // 1_000_000
    assert charges[0] - charges[1] == cached * per_token
    usage = httpx.get(f"{serve_qwen2.url}/v1/usage", params={"from": "1h", "bucket": "hour"},
                      headers={"Authorization": f"Bearer {serve_qwen2.key}"}, timeout=10).json()
    assert usage["totals"]["cached_tokens"] >= cached


def test_keep_alive_comments_while_the_engine_is_quiet_and_both_sdks_read_through(serve_qwen2: Served) -> None:
    """The qwen2 server sends a keep-alive after R1NEST_KEEPALIVE_S of quiet (set low in
    conftest): a long prompt's prefill is such a quiet time. The raw stream carries the comments;
    the openai and anthropic SDKs read the same streams as if they were not there."""
    model = serve_qwen2.state["served_model"]
    prompt = [{"role": "user", "content": LONG_PROMPT + " unique " + "x " * 800}]
    headers = {"Authorization": f"Bearer {serve_qwen2.key}"}
    with httpx.stream("POST", f"{serve_qwen2.url}/v1/chat/completions", headers=headers, timeout=120,
                      json={"model": model, "max_tokens": 8, "stream": True, "messages": prompt}) as response:
        raw = b"".join(response.iter_bytes())
    assert raw.count(b": keep-alive\n\n") >= 1, raw[:400]
    assert raw.rstrip().endswith(b"data: [DONE]")
    from openai import OpenAI

    chat = OpenAI(base_url=f"{serve_qwen2.url}/v1", api_key=serve_qwen2.key, max_retries=0, timeout=120)
    stream = chat.chat.completions.create(model=model, max_tokens=8, stream=True,
                                          messages=[{"role": "user", "content": LONG_PROMPT + " again " + "y " * 800}])
    pieces = [(getattr(c.choices[0].delta, "reasoning_content", None) or "") + (c.choices[0].delta.content or "")
              for c in stream if c.choices]
    assert "".join(pieces)
    with _anthropic(serve_qwen2).messages.stream(
        model=model, max_tokens=8, messages=[{"role": "user", "content": LONG_PROMPT + " once more " + "z " * 800}]
    ) as messages:
        final = messages.get_final_message()
    assert final.usage.output_tokens == 8 and final.content
