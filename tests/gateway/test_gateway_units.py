"""Pure parts of the gateway: pricing, request shaping, SSE rewriting, routing."""

from __future__ import annotations

import json

import pytest

from r1nest.errors import BadRequest, NotFound
from r1nest.gateway import pricing, routing, shaping, sse
from r1nest.gateway.pricing import Price
from r1nest.gateway.routing import Kind, Match, NoMatch
from r1nest.gateway.shaping import Policy

POLICY = Policy(served_model="deepseek-r1", max_messages=4, max_tokens_cap=100)


# pricing ------------------------------------------------------------------------------------

def test_cost_rounds_up_and_applies_minimum() -> None:
    price = Price(prompt_per_mtok=1_000_000, completion_per_mtok=2_000_000)
    assert pricing.cost(price, 10, 5) == 20
    assert pricing.cost(Price(1, 1), 1, 0) == 1  # one micro-credit rounds up to one credit
    assert pricing.cost(Price(1, 1, min_per_request=7), 1, 1) == 7
    assert pricing.cost(Price(1, 1, min_per_request=7), 0, 0) == 0  # no tokens, no charge


def test_affordable_completion_tokens_is_the_largest_that_fits() -> None:
    price = Price(prompt_per_mtok=1_000_000, completion_per_mtok=3_000_000)
    for balance in range(0, 200):
        for prompt in (0, 1, 17):
            tokens = pricing.affordable_completion_tokens(price, balance, prompt, cap=10_000)
            if tokens:
                assert pricing.cost(price, prompt, tokens) <= balance
                assert tokens == 10_000 or pricing.cost(price, prompt, tokens + 1) > balance
            else:
                assert pricing.cost(price, prompt, 1) > balance


def test_affordable_respects_cap_choices_and_free_completions() -> None:
    price = Price(1_000_000, 1_000_000)
    assert pricing.affordable_completion_tokens(price, 10**9, 10, cap=50) == 50
    assert pricing.affordable_completion_tokens(price, 110, 10, choices=4, cap=1000) == 25
    assert pricing.affordable_completion_tokens(Price(1_000_000, 0), 10, 10, cap=77) == 77
    assert pricing.affordable_completion_tokens(Price(1_000_000, 0), 9, 10, cap=77) == 0


def test_settle_amount_never_exceeds_the_reservation() -> None:
    price = Price(1_000_000, 1_000_000)
    assert pricing.settle_amount(price, 100, 10, 20) == (30, False)
    assert pricing.settle_amount(price, 100, 10, 10**12) == (100, True)


# shaping ------------------------------------------------------------------------------------

def test_deepseek_defaults_fill_only_what_is_absent() -> None:
    shaped = shaping.shape({"messages": [{"role": "user", "content": "hi"}]}, chat=True, policy=POLICY)
    assert shaped.body["temperature"] == 0.6 and shaped.body["top_p"] == 0.95
    shaped = shaping.shape({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.1}, chat=True, policy=POLICY)
    assert shaped.body["temperature"] == 0.1
    off = Policy(served_model="deepseek-r1", max_messages=4, max_tokens_cap=100, deepseek_defaults=False, fold_system_prompt=False)
    shaped = shaping.shape({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}, chat=True, policy=off)
    assert "temperature" not in shaped.body and shaped.body["messages"][0]["role"] == "system"


def test_system_prompt_is_folded_into_the_first_user_turn() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    folded = shaping.fold_system_prompt(messages)
    assert [m["role"] for m in folded] == ["user", "assistant", "user"]
    assert folded[0]["content"] == "Be brief.\n\nWhat is 2+2?"
    assert folded[2]["content"] == "And 3+3?"
    assert shaping.fold_system_prompt([{"role": "system", "content": "x"}]) == [{"role": "user", "content": "x"}]


def test_streams_force_usage_and_remember_what_the_client_asked() -> None:
    shaped = shaping.shape({"messages": [{"role": "user", "content": "hi"}], "stream": True}, chat=True, policy=POLICY)
    assert shaped.body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert not shaped.client_usage
    shaped = shaping.shape(
        {"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}},
        chat=True, policy=POLICY,
    )
    assert shaped.client_usage and not shaped.client_continuous_usage


@pytest.mark.parametrize(
    "body, message",
    [
        ([], "JSON object"),
        ({"messages": []}, "non-empty"),
        ({"messages": [{"role": "user", "content": "x"}] * 5}, "too many messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text parts"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 101}, "at most 100"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "positive"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "positive"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 17}, "`n`"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(body: object, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        shaping.shape(body, chat=True, policy=POLICY)


def test_another_model_name_is_404_model_not_found() -> None:
    with pytest.raises(NotFound) as info:
        shaping.shape({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, chat=True, policy=POLICY)
    assert info.value.code == "model_not_found"


def test_prompt_bound_covers_every_byte_of_text() -> None:
    text = "héllo wörld 你好 " * 50
    messages = [{"role": "user", "content": text}]
    bound = shaping.chat_prompt_bound(messages)
    assert bound >= len(text.encode("utf-8")) + shaping.TEMPLATE_OVERHEAD_TOKENS
    assert shaping.completion_prompt_bound([1, 2, 3])[0] == 3 + shaping.TEMPLATE_OVERHEAD_TOKENS
    assert shaping.completion_prompt_bound(["ab", "cde"]) == (5 + 2 * shaping.TEMPLATE_OVERHEAD_TOKENS, 2, 3 + shaping.TEMPLATE_OVERHEAD_TOKENS)


def test_prompt_bound_holds_for_a_real_byte_level_bpe_tokenizer() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox", "DeepSeek-R1 reasons step by step", "你好，世界", "emoji 🦊🦊"] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    for text in corpus[:4] + ["unseen ✓ text ÿ", "x" * 300]:
        tokens = len(tokenizer.encode(text).ids)
        assert tokens <= shaping.chat_prompt_bound([{"role": "user", "content": text}])
        assert tokens <= len(text.encode("utf-8"))


# SSE ----------------------------------------------------------------------------------------

VLLM_REASONING_CHUNK = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    b'[{"index":0,"delta":{"reasoning":"Let me think"},"logprobs":null,"finish_reason":null}],'
    b'"usage":{"prompt_tokens":9,"total_tokens":12,"completion_tokens":3}}'
)


def test_reasoning_is_renamed_and_unasked_usage_dropped_byte_exact() -> None:
    info = sse.rewrite_chunk(VLLM_REASONING_CHUNK, keep_usage=False)
    assert info.payload == (
        b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
        b'[{"index":0,"delta":{"content":"","reasoning_content":"Let me think"},"logprobs":null,"finish_reason":null}]}'
    )
    assert info.usage == sse.Usage(9, 3) and not info.is_usage_chunk
    assert info.tokens == 0  # the engine counted them: usage says 3 so far
    without_usage = VLLM_REASONING_CHUNK.replace(b',"usage":{"prompt_tokens":9,"total_tokens":12,"completion_tokens":3}', b"")
    assert sse.rewrite_chunk(without_usage, keep_usage=False).tokens == 1
    kept = json.loads(sse.rewrite_chunk(VLLM_REASONING_CHUNK, keep_usage=True).payload)
    assert kept["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("delta", [
    b'{"reasoning":"x"}', b'{"content":"y"}', b'{"reasoning":"x","content":"y"}', b'{"content":null,"reasoning":"x"}',
    b'{}', b'{"tool_calls":[{"index":0,"id":"t","function":{"name":"f","arguments":""}}]}',
    b'{"role":"assistant","content":""}', b'{"role":"assistant","reasoning":"x"}',
    b'{"reasoning":"say \\"content\\": hi"}',
])
@pytest.mark.parametrize("usage", [b"", b',"usage":{"prompt_tokens":9,"total_tokens":12,"completion_tokens":3}'])
def test_every_streamed_delta_carries_string_content(delta: bytes, usage: bytes) -> None:
    """So `print(chunk.choices[0].delta.content, end="")` prints text, never None; the fast
    byte path and the JSON path give the same chunk."""
    chunk = b'{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":' + delta + b',"finish_reason":null}]' + usage + b"}"
    fast = sse.rewrite_chunk(chunk, keep_usage=True)
    slow = sse.rewrite_chunk_json(chunk, keep_usage=True)
    assert fast.payload is not None and slow.payload is not None
    out = json.loads(fast.payload)
    assert out == json.loads(slow.payload) and fast.tokens == slow.tokens and fast.usage == slow.usage
    got = out["choices"][0]["delta"]
    want = json.loads(delta)
    assert isinstance(got["content"], str)
    assert got["content"] == (want.get("content") or "")
    assert got.get("reasoning_content") == want.get("reasoning") and "reasoning" not in got


def test_untouched_chunks_are_forwarded_as_the_same_bytes() -> None:
    chunk = b'{"id":"c","choices":[{"index":0,"delta":{"content":"hi \\u00e9"},"finish_reason":null}]}'
    assert sse.rewrite_chunk(chunk, keep_usage=False).payload is chunk


def test_message_shape_keeps_other_fields_and_existing_reasoning_content() -> None:
    message = {"role": "assistant", "content": "4", "reasoning": "2+2", "tool_calls": []}
    sse.rename_reasoning(message)
    assert message == {"role": "assistant", "content": "4", "reasoning_content": "2+2", "tool_calls": []}
    both = {"reasoning_content": "a", "reasoning": "a"}
    sse.rename_reasoning(both)
    assert both == {"reasoning_content": "a"}
    placeholder = {"reasoning_content": None, "reasoning": "b"}
    sse.rename_reasoning(placeholder)
    assert placeholder == {"reasoning_content": "b"}


def test_usage_chunk_and_error_event_are_recognised() -> None:
    usage = b'{"id":"c","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":5,"total_tokens":7}}'
    info = sse.rewrite_chunk(usage, keep_usage=False)
    assert info.is_usage_chunk and info.usage == sse.Usage(2, 5)
    assert json.loads(sse.with_remaining_credits(usage, 42))["remaining_credits"] == 42
    assert sse.rewrite_chunk(b'{"error":{"message":"boom"}}', keep_usage=False).is_error


def test_event_splitter_handles_split_and_joined_events() -> None:
    splitter = sse.EventSplitter()
    assert splitter.feed(b"data: {\"a\":1}\n\nda") == [b'{"a":1}']
    assert splitter.feed(b"ta: [DONE]\n\n: comment\n\ndata: x\r\n\r\n") == [b"[DONE]", b"x"]
    assert splitter.pending == b""


# routing ------------------------------------------------------------------------------------

def test_routes_are_an_exact_allowlist() -> None:
    assert routing.match("POST", b"/v1/chat/completions") == Match(Kind.CHAT, frozenset({"POST"}))
    assert routing.match("GET", b"/v1/chat/completions") == NoMatch(405, frozenset({"POST"}))
    action = routing.match("POST", b"/admin/keys/0123456789ab/topup")
    assert isinstance(action, Match) and action.key_id == "0123456789ab" and action.action == "topup"
    assert routing.match("GET", b"/admin/keys/0123456789ab/topup").status == 405  # type: ignore[union-attr]
    for path in [b"/tokenize", b"/v1/chat/completions/", b"/V1/models", b"/admin/keys/../../pause", b"/overview/static/../x"]:
        assert routing.match("GET", path) == NoMatch(404), path


FAST_PATH_CASES = [
    VLLM_REASONING_CHUNK,
    b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":3,"total_tokens":3,"completion_tokens":0}}',
    b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"say \\"reasoning\\": {\\"usage\\":1} \\u00e9 \xc3\xa9"},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2,"completion_tokens_details":{"reasoning_tokens":1}}}',
    b'{"id":"c","choices":[{"index":0,"delta":{"reasoning":"a","content":"b"},"finish_reason":null},{"index":1,"delta":{"reasoning":"c"},"finish_reason":null}],"usage":null}',
    b'{"id":"c","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"x\\": 1}"}}]},"finish_reason":null}]}',
    b'{"id":"c","choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop","stop_reason":null}],"usage":{"prompt_tokens":3,"total_tokens":9,"completion_tokens":6},"system_fingerprint":"fp"}',
    b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":3,"total_tokens":9,"completion_tokens":6}}',
    b'{"id":"c","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"hello","logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":{"prompt_tokens":1,"total_tokens":2,"completion_tokens":1}}',
    b'{"id":"c","choices":[{"index":0,"delta":{"reasoning_content":null,"reasoning":"x"}}]}',
]


@pytest.mark.parametrize("payload", FAST_PATH_CASES)
@pytest.mark.parametrize("keep_usage", [False, True])
def test_fast_path_agrees_with_the_json_path(payload: bytes, keep_usage: bool) -> None:
    fast = sse.rewrite_chunk(payload, keep_usage=keep_usage)
    slow = sse.rewrite_chunk_json(payload, keep_usage=keep_usage)
    assert json.loads(fast.payload) == json.loads(slow.payload)
    assert (fast.usage, fast.tokens, fast.is_usage_chunk, fast.is_error) == (
        slow.usage, slow.tokens, slow.is_usage_chunk, slow.is_error
    )


def test_partial_stream_pays_last_usage_plus_deltas_counted_after_it() -> None:
    from r1nest.gateway.proxy import StreamTracker

    tracker = StreamTracker(keep_usage=False)
    head = b'{"id":"c","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]'
    tracker.take(head + b',"usage":{"prompt_tokens":5,"total_tokens":7,"completion_tokens":2}}')
    tracker.take(head + b"}")
    tracker.take(head + b"}")
    assert tracker.usage() == sse.Usage(5, 4) and not tracker.complete
    silent = StreamTracker(keep_usage=False)
    for _ in range(3):
        silent.take(head + b"}")
    assert silent.usage() == sse.Usage(0, 3)


# metering -----------------------------------------------------------------------------------

async def _store_with_key(credits: int):  # -> (store, key_id)
    from r1nest.ledger.memory import MemoryStore

    store = MemoryStore()
    await store.create_key(key_id="0123456789ab", key_hash="0" * 64, name="t", credits=credits, expires_at=None, now=0.0)
    return store, "0123456789ab"


async def test_reservation_covers_every_choice_and_closes_exactly_once() -> None:
    from r1nest.errors import InsufficientCredits
    from r1nest.gateway import metering
    from r1nest.gateway.metrics import Metrics

    price = Price(prompt_per_mtok=1_000_000, completion_per_mtok=1_000_000)
    store, key_id = await _store_with_key(1_000)
    shaped = shaping.shape(
        {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 100}, chat=True, policy=POLICY
    )
    ticket = await metering.reserve(
        store, key_id, 1_000, shaped, price=price, cap=100, ttl_s=60, clock=lambda: 1.0, metrics=Metrics()
    )
    assert ticket.max_tokens == 100
    assert ticket.credits_reserved == shaped.prompt_tokens_bound + 2 * 100
    assert await ticket.settle(10, 20) == 1_000 - 30
    assert await ticket.settle(10, 20) == ticket.reservation.remaining_credits  # a no-op
    assert await ticket.void() == ticket.reservation.remaining_credits
    assert [p.kind for p in await store.postings(key_id)] == ["grant", "reserve", "settle"]
    assert await store.balance(key_id) == 970

    poor, poor_id = await _store_with_key(shaped.prompt_tokens_bound + 1)  # the prompt and 1 token, not 2
    with pytest.raises(InsufficientCredits):
        await metering.reserve(poor, poor_id, shaped.prompt_tokens_bound + 1, shaped, price=price, cap=100,
                               ttl_s=60, clock=lambda: 1.0, metrics=Metrics())
    assert await poor.balance(poor_id) == shaped.prompt_tokens_bound + 1


async def test_a_stale_balance_is_retried_against_the_store() -> None:
    from r1nest.gateway import metering
    from r1nest.gateway.metrics import Metrics

    price = Price(prompt_per_mtok=1_000_000, completion_per_mtok=1_000_000)
    store, key_id = await _store_with_key(300)
    shaped = shaping.shape({"messages": [{"role": "user", "content": "hi"}]}, chat=True, policy=POLICY)
    # the caller believes the balance is 10,000; the store knows 300
    ticket = await metering.reserve(
        store, key_id, 10_000, shaped, price=price, cap=1_000, ttl_s=60, clock=lambda: 1.0, metrics=Metrics()
    )
    assert ticket.credits_reserved == 300 and ticket.max_tokens == 300 - shaped.prompt_tokens_bound
