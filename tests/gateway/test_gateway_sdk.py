"""The official OpenAI Python SDK as the client: streaming and not, reasoning_content included."""

from __future__ import annotations

import pytest

from .conftest import MODEL, Harness

openai = pytest.importorskip("openai")


def test_sdk_non_streaming_reads_reasoning_content(harness: Harness) -> None:
    _, key = harness.new_key(credits=100_000)
    client = openai.OpenAI(base_url=harness.url + "/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}]
    )
    completion = raw.parse()
    message = completion.choices[0].message
    assert message.reasoning_content == "think0 think1 think2 "  # an extra field of the SDK's model
    assert message.content == "word0 word1 word2 word3 "
    assert int(raw.headers["x-remaining-credits"]) < 100_000
    assert [m.id for m in client.models.list()] == [MODEL]


def test_sdk_streaming_reads_reasoning_and_content_separately(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=100_000)
    client = openai.OpenAI(base_url=harness.url + "/v1", api_key=key, max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], stream=True,
        stream_options={"include_usage": True},
    )
    reasoning, content, usage_chunks = [], [], []
    for chunk in stream:
        if chunk.usage is not None:
            usage_chunks.append(chunk)
        for choice in chunk.choices:
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            content.append(choice.delta.content or "")
    assert "".join(reasoning) == "think0 think1 think2 "
    assert "".join(content) == "word0 word1 word2 word3 "
    assert len(usage_chunks) == 1 and usage_chunks[0].usage.completion_tokens == 7
    assert usage_chunks[0].model_extra["remaining_credits"] == harness.balance(key_id)


def test_sdk_errors_map_to_sdk_exceptions(harness: Harness) -> None:
    _, key = harness.new_key(credits=1)
    client = openai.OpenAI(base_url=harness.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 406 and info.value.code == "insufficient_credits"
    bad = openai.OpenAI(base_url=harness.url + "/v1", api_key="r1n-000000000000-" + "x" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
