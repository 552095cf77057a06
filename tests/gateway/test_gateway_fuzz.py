"""Fuzz every route of a real gateway (uvicorn on loopback, fake engine behind it) with generated
requests: over 5,000 in all. Whatever comes in, the gateway answers below 500, and every 4xx
carries the OpenAI error shape with a message.

Bodies are built from the fields the routes read (with values of every JSON type, NaN and
Infinity, lone surrogates, deep nesting) and from random bytes; paths from the route table and
its near misses; methods and auth headers mixed.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from .conftest import MODEL, Harness  # noqa: E402

FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# JSON scalars, including what standard JSON cannot hold (json.dumps writes NaN / Infinity and
# lone surrogates as \ud800 escapes, which the gateway must refuse cleanly).
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["\ud800", "x\udfffy", "", "user", "assistant", "system", MODEL, "é中𝄞", "<>&'"]),
)
JSON = st.recursive(SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)), max_leaves=12)

CHAT_FIELDS = ["model", "messages", "stream", "stream_options", "n", "max_tokens", "max_completion_tokens",
               "temperature", "top_p", "top_k", "stop", "seed", "logprobs", "top_logprobs", "tools",
               "tool_choice", "response_format", "min_tokens", "chat_template", "priority", "best_of",
               "use_beam_search", "user", "prompt"]
ROLES = st.one_of(st.sampled_from(["user", "assistant", "system", "developer", "tool", "bogus"]), JSON)
MESSAGE = st.fixed_dictionaries({"role": ROLES}, optional={
    "content": st.one_of(st.text(max_size=60), JSON, st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": st.one_of(st.text(max_size=20), JSON)}), max_size=3)),
    "name": JSON, "reasoning_content": JSON, "tool_calls": JSON,
})
SMALL_INTS = st.integers(min_value=-3, max_value=40)
CHAT_BODY = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(MESSAGE, min_size=0, max_size=4), JSON)},
    optional={
        "model": st.one_of(st.just(MODEL), JSON), "stream": st.one_of(st.booleans(), JSON),
        "max_tokens": st.one_of(SMALL_INTS, JSON), "max_completion_tokens": st.one_of(SMALL_INTS, JSON),
        "n": st.one_of(SMALL_INTS, JSON), "temperature": st.one_of(st.floats(), JSON),
        "stream_options": JSON, "tools": JSON, "stop": JSON, "seed": JSON, "logprobs": JSON,
        "response_format": JSON, "min_tokens": JSON, "chat_template": JSON, "best_of": JSON,
    },
)
COMPLETION_BODY = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(max_size=60), st.lists(st.integers(min_value=-5, max_value=10**6), max_size=8),
                         st.lists(st.text(max_size=10), max_size=4), JSON)},
    optional={"model": st.one_of(st.just(MODEL), JSON), "max_tokens": st.one_of(SMALL_INTS, JSON),
              "stream": st.one_of(st.booleans(), JSON), "n": st.one_of(SMALL_INTS, JSON), "echo": JSON},
)
ADMIN_BODY = st.one_of(
    st.fixed_dictionaries({}, optional={"name": JSON, "credits": st.one_of(SMALL_INTS, JSON),
                                        "expires_at": st.one_of(st.floats(), JSON), "max_concurrency": JSON}),
    JSON,
)
RAW = st.one_of(st.binary(max_size=200), st.sampled_from([
    b"", b"{", b"[" * 5000, b'{"messages": [' * 300, b'{"a": NaN}', b"\xff\xfe", b"null", b"[]", b'"x"',
]))
PATHS = st.one_of(
    st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/credits", "/health",
                     "/metrics", "/admin/keys", "/admin/keys/0123456789ab/topup", "/admin/keys/0123456789ab/usage",
                     "/admin/keys/0123456789ab/revoke", "/overview", "/overview/login", "/overview/logout",
                     "/overview/static/app.css", "/v1/chat/completions/", "//v1/models", "/v1/../admin/keys",
                     "/tokenize", "/V1/models", "/%2e%2e/admin", "/overview/static/..", "/v1/models?x=1"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(lambda p: "/" + p),
)
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])


def encode(body: Any) -> bytes:
    return json.dumps(body).encode("utf-8", "surrogatepass")


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.headers.get("content-type", "").startswith("text/html") and response.request.url.path.startswith("/overview"):
        return  # the overview's login page answers a browser with a page (its own tests cover it)
    if 400 <= response.status_code < 500 and response.request.method != "HEAD":
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], response.text[:500]
        assert "code" in error and "type" in error


@pytest.fixture
def fuzzed(harness: Harness) -> Any:
    _, key = harness.new_key(credits=10**12)
    harness.engine.configure(reasoning_tokens=1, content_tokens=1)
    return harness, key


def test_fuzz_chat_completions(fuzzed: Any) -> None:
    harness, key = fuzzed

    @settings(max_examples=1800, **FUZZ_SETTINGS)
    @given(body=CHAT_BODY)
    def run(body: dict[str, Any]) -> None:
        check(harness.client.post("/v1/chat/completions", content=encode(body),
                                  headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}))

    run()


def test_fuzz_completions(fuzzed: Any) -> None:
    harness, key = fuzzed

    @settings(max_examples=900, **FUZZ_SETTINGS)
    @given(body=COMPLETION_BODY)
    def run(body: dict[str, Any]) -> None:
        check(harness.client.post("/v1/completions", content=encode(body), headers={"x-api-key": key}))

    run()


def test_fuzz_raw_bodies_on_every_route(fuzzed: Any) -> None:
    harness, key = fuzzed

    @settings(max_examples=900, **FUZZ_SETTINGS)
    @given(path=PATHS, method=METHODS, raw=RAW, auth=st.sampled_from(["key", "admin", "bad", "none"]))
    def run(path: str, method: str, raw: bytes, auth: str) -> None:
        headers = {"key": {"Authorization": f"Bearer {key}"}, "admin": harness.admin,
                   "bad": {"Authorization": "Bearer r1n-bogus"}, "none": {}}[auth]
        check(harness.client.request(method, path, content=raw, headers=headers))

    run()


def test_fuzz_admin_api(fuzzed: Any) -> None:
    harness, key = fuzzed
    key_id = harness.new_key()[0]

    @settings(max_examples=900, **FUZZ_SETTINGS)
    @given(body=ADMIN_BODY, action=st.sampled_from(["create", "topup", "revoke-other", "list", "usage"]),
           idempotency=st.one_of(st.none(), st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=80)))
    def run(body: Any, action: str, idempotency: str | None) -> None:
        headers = dict(harness.admin)
        if idempotency is not None:
            headers["Idempotency-Key"] = idempotency
        if action == "create":
            response = harness.client.post("/admin/keys", content=encode(body), headers=headers)
        elif action == "topup":
            response = harness.client.post(f"/admin/keys/{key_id}/topup", content=encode(body), headers=headers)
        elif action == "revoke-other":
            response = harness.client.post("/admin/keys/0123456789ab/revoke", content=encode(body), headers=headers)
        elif action == "list":
            response = harness.client.get("/admin/keys", headers=headers)
            if response.status_code == 200:
                json.loads(response.text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
        else:
            response = harness.client.get(f"/admin/keys/{key_id}/usage", headers=headers)
        check(response)

    run()


BLOCK = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "thinking", "redacted_thinking", "tool_use", "tool_result",
                                                    "image", "document", "bogus"])},
                          optional={"text": JSON, "thinking": JSON, "id": JSON, "name": JSON, "input": JSON,
                                    "tool_use_id": JSON, "content": JSON, "is_error": JSON, "source": JSON}),
    JSON,
)
MESSAGES_BODY = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(st.fixed_dictionaries({"role": ROLES}, optional={
        "content": st.one_of(st.text(max_size=40), st.lists(BLOCK, max_size=3), JSON)}), max_size=4), JSON)},
    optional={
        "model": st.one_of(st.just(MODEL), JSON), "max_tokens": st.one_of(SMALL_INTS, st.just(10**9), JSON),
        "stream": st.one_of(st.booleans(), JSON), "system": st.one_of(st.text(max_size=20), st.lists(BLOCK, max_size=2), JSON),
        "stop_sequences": JSON, "temperature": JSON, "top_k": JSON, "metadata": JSON,
        "tools": st.one_of(st.lists(st.fixed_dictionaries({"name": JSON}, optional={
            "input_schema": JSON, "description": JSON, "type": JSON}), max_size=2), JSON),
        "tool_choice": st.one_of(st.fixed_dictionaries({"type": JSON}, optional={"name": JSON}), JSON),
        "thinking": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["enabled", "disabled", "x"])},
                                                    optional={"budget_tokens": st.one_of(SMALL_INTS, JSON)}), JSON),
    },
)


def test_fuzz_anthropic_messages(fuzzed: Any) -> None:
    """/v1/messages answers below 500 in Anthropic's error shape, and a refused request costs nothing."""
    from r1nest.keys import parse_key_id

    harness, key = fuzzed
    key_id = parse_key_id(key)
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "Content-Type": "application/json"}
    refused = []

    @settings(max_examples=900, **FUZZ_SETTINGS)
    @given(body=MESSAGES_BODY, path=st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]))
    def run(body: dict[str, Any], path: str) -> None:
        before = harness.balance(key_id)
        response = harness.client.post(path, content=encode(body), headers=headers)
        assert response.status_code < 500, (response.status_code, response.text[:500])
        if response.status_code >= 400:
            error = response.json()
            assert error["type"] == "error" and error["error"]["message"] and error["error"]["type"], error
            assert harness.balance(key_id) == before, "a refused request was charged"
            refused.append(response.status_code)

    run()
    assert len(refused) > 100  # the strategies reach the refusals, not only the happy path


def test_fuzz_headers(fuzzed: Any) -> None:
    harness, key = fuzzed
    header_value = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=60)

    @settings(max_examples=600, **FUZZ_SETTINGS)
    @given(authorization=header_value, api_key=st.one_of(st.none(), header_value),
           content_type=header_value, content_length_lie=st.booleans())
    def run(authorization: str, api_key: str | None, content_type: str, content_length_lie: bool) -> None:
        headers = {"Authorization": authorization, "Content-Type": content_type}
        if api_key is not None:
            headers["x-api-key"] = api_key
        body = encode({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        check(harness.client.post("/v1/chat/completions", content=body, headers=headers))
        check(harness.client.get("/v1/credits", headers=headers))

    run()


def test_the_fuzz_generates_what_it_claims() -> None:
    """The strategies reach the nasty values (so a green fuzz run means something)."""
    seen = {"nan": False, "surrogate": False, "nested": False}

    @settings(max_examples=400, **FUZZ_SETTINGS)
    @given(body=CHAT_BODY)
    def run(body: dict[str, Any]) -> None:
        text = encode(body)
        seen["nan"] |= b"NaN" in text or b"Infinity" in text
        seen["surrogate"] |= b"\\ud8" in text or b"\\udf" in text
        seen["nested"] |= text.count(b"[") > 6

    run()
    assert all(seen.values()), seen
    assert math.isnan(float("nan"))
