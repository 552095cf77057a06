"""Anthropic's Messages API through the official `anthropic` SDK: thinking and text blocks,
metering exactly as chat completions (prices, 406, partial streams), errors in Anthropic's shape.
The real engine's side is in tests/e2e/test_anthropic_real.py."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest

from r1nest.gateway import anthropic as translate
from r1nest.gateway import pricing
from r1nest.gateway.pricing import Price
from r1nest.gateway.proxy import StreamEnd
from r1nest.errors import BadRequest

from .conftest import MODEL, Harness

anthropic = pytest.importorskip("anthropic")

PRICE = Price(1_000_000, 2_000_000)  # conftest.make_settings


def client(harness: Harness, key: str, **options: Any) -> Any:
    return anthropic.Anthropic(base_url=harness.url, api_key=key, max_retries=0, **options)


def paid(harness: Harness, key_id: str) -> int:
    return -sum(p.credits for p in harness.postings(key_id) if p.kind in ("reserve", "settle", "void"))


def test_sdk_message_has_thinking_then_text_and_is_paid_like_chat(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=100_000)
    raw = client(harness, key).messages.with_raw_response.create(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "What is 2+2?"}]
    )
    message = raw.parse()
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "think0 think1 think2 "
    assert message.content[1].text == "word0 word1 word2 word3 "
    assert message.stop_reason == "end_turn" and message.role == "assistant" and message.model == MODEL
    assert message.usage.output_tokens == 7 and message.usage.input_tokens == 5  # 3 words + 2 per message
    assert paid(harness, key_id) == pricing.cost(PRICE, 5, 7)
    assert int(raw.headers["x-remaining-credits"]) == harness.balance(key_id)
    # what the engine got: a chat completion with the deployment's conventions
    sent = harness.engine.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json()["messages"] == [{"role": "user", "content": "What is 2+2?"}]
    assert sent.json()["max_tokens"] == 100
    # the same question as a chat completion costs the same
    chat_key_id, chat_key = harness.new_key(credits=100_000)
    assert harness.chat(chat_key, max_tokens=100, messages=[{"role": "user", "content": "What is 2+2?"}]).status_code == 200
    assert paid(harness, chat_key_id) == paid(harness, key_id)


def test_sdk_stream_has_thinking_deltas_text_deltas_and_final_usage(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=100_000)
    thinking, text, kinds = [], [], []
    with client(harness, key).messages.stream(
        model=MODEL, max_tokens=100, system="Be brief.", messages=[{"role": "user", "content": "What is 2+2?"}]
    ) as stream:
        for item in stream:
            kinds.append(item.type)
            if item.type == "content_block_delta" and item.delta.type == "thinking_delta":
                thinking.append(item.delta.thinking)
            elif item.type == "content_block_delta" and item.delta.type == "text_delta":
                text.append(item.delta.text)
        final = stream.get_final_message()
    assert "".join(thinking) == "think0 think1 think2 " and "".join(text) == "word0 word1 word2 word3 "
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.usage.output_tokens == 7 and final.stop_reason == "end_turn"
    # the system prompt is folded into the first user turn, as on the chat route
    assert harness.engine.requests[-1].json()["messages"] == [{"role": "user", "content": "Be brief.\n\nWhat is 2+2?"}]
    assert paid(harness, key_id) == pricing.cost(PRICE, 2 + 5, 7)


def test_stream_message_delta_carries_the_balance_after_settlement(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=100_000)
    response = harness.client.post(
        "/v1/messages", headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [block for block in response.text.split("\n\n") if block]
    names = [block.split("\n")[0].removeprefix("event: ") for block in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert "data: [DONE]" not in response.text
    delta = json.loads(events[-2].split("\n", 1)[1].removeprefix("data: "))
    assert delta["remaining_credits"] == harness.balance(key_id)
    assert delta["usage"]["output_tokens"] == 7


def test_bearer_and_x_api_key_both_authenticate(harness: Harness) -> None:
    _, key = harness.new_key(credits=100_000)
    by_header = client(harness, key).messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "a"}])
    by_bearer = anthropic.Anthropic(base_url=harness.url, auth_token=key, max_retries=0).messages.create(
        model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "a"}]
    )
    assert by_header.content and by_bearer.content


def test_errors_come_in_anthropics_shape(harness: Harness) -> None:
    _, poor = harness.new_key(credits=1)
    with pytest.raises(anthropic.APIStatusError) as info:
        client(harness, poor).messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 406
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["code"] == "insufficient_credits"
    assert info.value.response.headers["x-remaining-credits"] == "1"
    with pytest.raises(anthropic.AuthenticationError) as auth:
        client(harness, "r1n-000000000000-" + "x" * 43).messages.create(
            model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )
    assert auth.value.body["error"]["type"] == "authentication_error"
    _, key = harness.new_key(credits=100_000)
    with pytest.raises(anthropic.NotFoundError):
        client(harness, key).messages.create(model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    # max_tokens is required by the Messages API (the SDK checks it too: ask over plain HTTP)
    missing = harness.client.post("/v1/messages", headers={"x-api-key": key},
                                  json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert missing.status_code == 400
    assert missing.json()["error"] == {"type": "invalid_request_error", "message": "max_tokens: Field required",
                                       "code": "invalid_request"}
    image = harness.client.post("/v1/messages", headers={"x-api-key": key}, json={
        "model": MODEL, "max_tokens": 10,
        "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}],
    })
    assert image.status_code == 400 and "text only" in image.json()["error"]["message"]
    assert harness.engine.requests == [] or all(r.path != "/v1/chat/completions" for r in harness.engine.requests)


def test_a_stream_cut_by_the_engine_ends_with_an_error_event_and_pays_what_streamed(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=100_000)
    harness.engine.configure(fail_after_chunks=2)
    response = harness.client.post("/v1/messages", headers={"x-api-key": key}, json={
        "model": MODEL, "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "hi"}],
    })
    assert response.text.rstrip().split("\n\n")[-1].startswith("event: error\ndata: ")
    error = json.loads(response.text.rstrip().split("\n\n")[-1].split("data: ", 1)[1])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "message_stop" not in response.text
    assert paid(harness, key_id) == pricing.cost(PRICE, 3, 2)
    with pytest.raises(anthropic.APIError):
        with client(harness, key).messages.stream(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            for _ in stream:
                pass


def test_client_disconnect_aborts_the_engine_and_pays_tokens_sent(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=100_000)
    harness.engine.configure(hold_after_chunks=2, reasoning_tokens=20)
    payload = json.dumps({"model": MODEL, "max_tokens": 100, "stream": True,
                          "messages": [{"role": "user", "content": "hello there"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", harness.served.port), timeout=30)
    sock.sendall((f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {key}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload)
    data, deadline = b"", time.monotonic() + 30
    while data.count(b"thinking_delta") < 2:
        assert time.monotonic() < deadline, data
        data += sock.recv(65536)
    sock.close()
    aborts = harness.engine.wait_for_aborts(1, timeout_s=30)
    assert aborts[0].completion_tokens_sent == 2
    deadline = time.monotonic() + 30
    while harness.gateway.open_requests:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert paid(harness, key_id) == pricing.cost(PRICE, 4, 2)


def test_count_tokens_is_the_engines_count_and_free(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=100_000)
    count = client(harness, key).messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "one two three"}]
    )
    assert count.input_tokens == 5  # the fake tokenizer: 3 words + 2 per message
    assert harness.balance(key_id) == 100_000 and harness.engine.requests[-1].path == "/tokenize"


def test_keep_alive_comments_on_a_quiet_stream_are_ignored_by_both_sdks(make_harness: Any) -> None:
    harness = make_harness(keepalive_s=0.2)
    _, key = harness.new_key(credits=100_000)
    harness.engine.configure(hold_after_chunks=0, hold_s=1.2)  # quiet before the first token
    raw = harness.client.post("/v1/messages", headers={"x-api-key": key}, json={
        "model": MODEL, "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "hi"}],
    })
    assert raw.text.count(": keep-alive\n\n") >= 2
    with client(harness, key).messages.stream(
        model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "word0 word1 word2 word3 " and final.content[0].thinking == "think0 think1 think2 "
    openai = pytest.importorskip("openai")
    chat = openai.OpenAI(base_url=harness.url + "/v1", api_key=key, max_retries=0).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == "word0 word1 word2 word3 "
    metrics = harness.client.get("/metrics", headers=harness.admin).text
    kept = [line for line in metrics.splitlines() if line.startswith("r1nest_keepalives_total ")]
    assert int(kept[0].split()[1]) >= 6  # about 6 per stream of 1.2 s quiet, at 0.2 s


def test_no_keep_alive_when_the_stream_is_never_quiet_that_long(make_harness: Any) -> None:
    harness = make_harness(keepalive_s=30)
    _, key = harness.new_key(credits=100_000)
    response = harness.chat(key, stream=True)
    assert response.status_code == 200 and b": keep-alive" not in response.content


# translation units ---------------------------------------------------------------------------


def test_tools_and_tool_results_translate_to_chat() -> None:
    chat = translate.to_chat({
        "model": MODEL, "max_tokens": 64, "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
        "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should call it", "signature": ""},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C"}]},
                {"type": "text", "text": "Thanks"},
            ]},
        ],
    }, thinking_budget=True)
    assert chat["stop"] == ["END"] and chat["user"] == "u1" and chat["max_tokens"] == 64
    assert chat["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}, "description": "Weather"}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
        {"role": "user", "content": "Thanks"},
    ]


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages.0"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": 5}]}, "messages.0"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stop_sequences": "END"}, "stop_sequences"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "w"}]}, "tools.0"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled", "budget_tokens": 5}}, "thinking"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "system": [{"type": "image"}]}, "system"),
])
def test_requests_the_endpoint_cannot_serve_are_400(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        translate.to_chat(body, thinking_budget=True)
    assert info.value.param == param


def test_thinking_budget_becomes_the_engines_and_is_refused_without_one() -> None:
    body = {"max_tokens": 100, "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled", "budget_tokens": 40}}
    assert translate.to_chat(body, thinking_budget=True)["thinking_token_budget"] == 40
    with pytest.raises(BadRequest):
        translate.to_chat(body, thinking_budget=False)
    disabled = {**body, "thinking": {"type": "disabled"}}
    assert "thinking_token_budget" not in translate.to_chat(disabled, thinking_budget=False)


def test_whole_answer_with_tool_calls_and_a_stop_sequence() -> None:
    answer = {
        "id": "chatcmpl-abc", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "", "reasoning_content": "hmm",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}},
    }
    out = json.loads(translate.message(json.dumps(answer).encode(), stop_sequences=[], model=MODEL))
    assert out["id"] == "msg_abc" and out["stop_reason"] == "tool_use"
    assert out["content"] == [{"type": "thinking", "thinking": "hmm", "signature": ""},
                              {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}]
    assert out["usage"] == {"input_tokens": 6, "output_tokens": 5, "cache_read_input_tokens": 4,
                            "cache_creation_input_tokens": 0}
    answer["choices"][0].update(finish_reason="stop", stop_reason="END")
    out = json.loads(translate.message(json.dumps(answer).encode(), stop_sequences=["END"], model=MODEL))
    assert out["stop_reason"] == "stop_sequence" and out["stop_sequence"] == "END"


def test_streamed_tool_call_becomes_a_tool_use_block_with_json_deltas() -> None:
    stream = translate.MessageStream(model=MODEL, stop_sequences=[])
    chunks = [
        {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"reasoning": "plan"}}],
         "usage": {"prompt_tokens": 9, "completion_tokens": 1}},
        {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}]}}],
         "usage": {"prompt_tokens": 9, "completion_tokens": 2}},
        {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": ': 1}'}}]}, "finish_reason": "tool_calls"}],
         "usage": {"prompt_tokens": 9, "completion_tokens": 3}},
    ]
    out = b"".join(stream.take(json.dumps(c).encode()) or b"" for c in chunks)
    stream.take(b"[DONE]")
    out += stream.tail(StreamEnd("complete", True, stream), balance=77)
    events = [(b.split("\n")[0][7:], json.loads(b.split("\n")[1][6:])) for b in out.decode().strip().split("\n\n")]
    names = [name for name, _ in events]
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    assert events[0][1]["message"]["usage"]["input_tokens"] == 9
    assert events[4][1]["content_block"] == {"type": "tool_use", "id": "call_9", "name": "f", "input": {}}
    assert "".join(e["delta"]["partial_json"] for n, e in events if n == "content_block_delta" and e["index"] == 1) == '{"a": 1}'
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use" and events[-2][1]["remaining_credits"] == 77
    assert events[-2][1]["usage"]["output_tokens"] == 3


def test_no_route_reaches_the_engine_unmetered(harness: Harness) -> None:
    """Every route that makes the engine generate reserves first: with no credits, nothing
    reaches the engine's generation endpoints."""
    _, key = harness.new_key(credits=0)
    headers = {"x-api-key": key, "Authorization": f"Bearer {key}"}
    for path, body in [
        ("/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/messages", {"model": MODEL, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/completions", {"model": MODEL, "prompt": "x"}),
    ]:
        assert httpx.post(harness.url + path, json=body, headers=headers).status_code == 406
    assert not [r for r in harness.engine.requests if r.path.startswith("/v1/") and "completions" in r.path]


def test_max_tokens_is_a_ceiling_lowered_to_what_the_deployment_allows(make_harness: Any) -> None:
    """Messages API clients must send max_tokens and cannot know the deployment's limits
    (Claude Code sends 32000): over the cap or the context it is lowered, not refused."""
    harness = make_harness(max_tokens_cap=1000)
    harness.engine.configure(context_length=600)
    _, key = harness.new_key(credits=100_000)
    with client(harness, key).messages.stream(
        model=MODEL, max_tokens=32_000, messages=[{"role": "user", "content": "one two three"}]
    ) as stream:
        message = stream.get_final_message()
    assert message.content and message.stop_reason == "end_turn"
    sent = harness.engine.requests[-1].json()
    assert sent["max_tokens"] == 600 - 5  # the context less the prompt (engine's count), under the cap
    # the OpenAI route keeps refusing an explicit max_tokens it cannot honour
    assert harness.chat(key, max_tokens=32_000).status_code == 400


def test_a_claude_code_shaped_request_is_served(harness: Harness) -> None:
    """What Claude Code-style clients send: `?beta=true`, beta headers, system blocks and tools with
    `cache_control`, a thinking block with a signature in the history, a tool round trip, and a
    large max_tokens, streamed."""
    key_id, key = harness.new_key(credits=1_000_000)
    body = {
        "model": MODEL, "max_tokens": 32_000, "stream": True, "temperature": 1,
        "system": [{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "Read", "description": "Read a file",
                   "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
                   "cache_control": {"type": "ephemeral"}}],
        "metadata": {"user_id": "user_abc"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Open main.py", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I will read it.", "signature": "c2lnbmF0dXJl"},
                {"type": "tool_use", "id": "toolu_01", "name": "Read", "input": {"path": "main.py"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "print(1)"}]},
        ],
    }
    response = harness.client.post(
        "/v1/messages?beta=true", json=body,
        headers={"x-api-key": key, "anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14"},
    )
    assert response.status_code == 200, response.text
    assert "event: message_stop" in response.text
    sent = harness.engine.requests[-1].json()
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][0]["content"].startswith("You are a coding agent.")  # folded system prompt
    assert sent["messages"][1]["tool_calls"][0]["function"]["name"] == "Read"
    assert sent["tools"][0]["function"]["parameters"]["properties"] == {"path": {"type": "string"}}
    assert sent["user"] == "user_abc" and sent["max_tokens"] <= 1000  # the deployment's cap
    assert harness.balance(key_id) < 1_000_000
