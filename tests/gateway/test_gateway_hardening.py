"""Money and input hardening, each test a defect an adversarial run found (it fails without its fix).

- the body sent upstream is rebuilt from an allowlist; engine-control fields are refused;
- bad input is 400 with the OpenAI error shape, never 500: NaN, lone surrogates, deep nesting,
  a role that is not a string;
- a whole answer without usage pays its reasoning too;
- usage is clamped per part (prompt to its bound, completion to max_tokens), not only in total;
- a stream that fails before any token reached the client is free, whatever usage came before;
- usage counts that are not plain integers are no usage (the estimate applies), in both paths.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from r1nest.gateway import sse
from r1nest.gateway.pricing import Price, cost
from r1nest.gateway.shaping import ENGINE_CONTROL_FIELDS

from .conftest import MODEL, Harness

PRICE = Price(prompt_per_mtok=1_000_000, completion_per_mtok=2_000_000)  # make_settings' prices
PROMPT_TOKENS = 4  # "hello there" as the fake engine counts it


def completions_sent(harness: Harness) -> list[dict[str, Any]]:
    return [r.json() for r in harness.engine.requests if r.path in ("/v1/chat/completions", "/v1/completions")]


def post_raw(harness: Harness, key: str, raw: bytes) -> Any:
    return harness.client.post("/v1/chat/completions", content=raw,
                               headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


@pytest.mark.parametrize("field", sorted(ENGINE_CONTROL_FIELDS))
def test_engine_control_fields_are_refused(harness: Harness, field: str) -> None:
    _, key = harness.new_key()
    response = harness.chat(key, max_tokens=5, **{field: {"x": 1}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field
    assert completions_sent(harness) == []


def test_the_upstream_body_is_rebuilt_from_the_allowlist(harness: Harness) -> None:
    _, key = harness.new_key()
    kept = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "stop": ["x"], "seed": 7, "logprobs": True,
            "top_logprobs": 2, "response_format": {"type": "text"}, "presence_penalty": 0.5,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": "auto"}
    response = harness.chat(key, max_tokens=5, unknown_field=1, store=True, metadata={"a": "b"}, **kept)
    assert response.status_code == 200, response.text
    sent = completions_sent(harness)[-1]
    for name, value in kept.items():
        assert sent[name] == value, name
    for name in ("unknown_field", "store", "metadata"):
        assert name not in sent


@pytest.mark.parametrize("raw", [
    b'{"model": "deepseek-r1", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": -Infinity}',
    b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
    b'{"messages": [{"role": ["user"], "content": "hi"}]}',
    b'{"messages": [{"role": {"a": 1}, "content": "hi"}]}',
    b'{"model": ["x"], "messages": [{"role": "user", "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 600 + b"]" * 600 + b"}",
    b"[" * 100_000 + b"]" * 100_000,
])
def test_bad_input_is_400_with_a_json_error(harness: Harness, raw: bytes) -> None:
    _, key = harness.new_key()
    response = post_raw(harness, key, raw)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert completions_sent(harness) == []


def test_a_whole_answer_without_usage_pays_its_reasoning(make_harness: Any) -> None:
    harness = make_harness(max_tokens_cap=10_000)
    key_id, key = harness.new_key(credits=10**6)
    harness.engine.configure(omit_usage=True, reasoning_tokens=200, content_tokens=1)
    response = harness.chat(key, max_tokens=4000)
    assert response.status_code == 200
    message = response.json()["choices"][0]["message"]
    generated = len((message["reasoning_content"] + message["content"]).encode())
    assert 1000 < generated < 4000  # reasoning "think0 ".."think199 ": one token each, bytes paid
    assert harness.balance(key_id) == 10**6 - cost(PRICE, 0, generated)


def test_usage_is_clamped_per_part(harness: Harness) -> None:
    """max_tokens 20 and an engine that claims a huge completion: the completion is paid as 20
    tokens and the prompt as reported, not the whole reservation (whose prompt part is the
    byte bound)."""
    key_id, key = harness.new_key(credits=10**6)
    harness.engine.configure(absurd_usage=True)
    response = harness.chat(key, max_tokens=20)
    assert response.status_code == 200
    assert harness.balance(key_id) == 10**6 - cost(PRICE, PROMPT_TOKENS, 20)


def test_a_stream_that_dies_before_its_first_token_is_free(harness: Harness) -> None:
    """The engine reports (absurd) usage in its role chunk, then fails before any token."""
    key_id, key = harness.new_key(credits=10**6)
    harness.engine.configure(absurd_usage=True, fail_after_chunks=0)
    response = harness.chat(key, max_tokens=20, stream=True)
    assert response.status_code == 200
    assert b'"code":"engine_error"' in response.content and response.content.endswith(b"data: [DONE]\n\n")
    assert harness.balance(key_id) == 10**6
    assert [p.kind for p in harness.postings(key_id)][-1] == "void"


@pytest.mark.parametrize("count", [b"1e30", b"1.5", b"-3", b'"7"'])
def test_usage_counts_that_are_not_plain_integers_are_no_usage(count: bytes) -> None:
    chunk = (b'{"id":"c","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}],'
             b'"usage":{"prompt_tokens":9,"total_tokens":12,"completion_tokens":' + count + b"}}")
    fast, slow = sse.rewrite_chunk(chunk, keep_usage=False), sse.rewrite_chunk_json(chunk, keep_usage=False)
    assert fast.usage is None and slow.usage is None
    assert fast.tokens == slow.tokens == 1  # the estimate: one token for the delta
    assert json.loads(fast.payload) == json.loads(slow.payload)
    assert sse.usage_of(json.loads(b'{"usage":{"prompt_tokens":1,"completion_tokens":' + count + b"}}")) is None


def test_model_name_in_errors_is_safe(harness: Harness) -> None:
    _, key = harness.new_key()
    response = harness.chat(key, model="other-\u00e9")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert MODEL in response.json()["error"]["message"]
