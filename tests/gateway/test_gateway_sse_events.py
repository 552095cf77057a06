"""Engine SSE events with empty data: skipped, neither forwarded nor read as a broken stream."""

from __future__ import annotations

import pytest

from r1nest.gateway import sse
from r1nest.gateway.proxy import StreamTracker

TOKEN = (b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
         b'"delta":{"content":"hi"},"logprobs":null,"finish_reason":null}],'
         b'"usage":{"prompt_tokens":3,"total_tokens":%d,"completion_tokens":%d}}')
FINAL = b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}}'


@pytest.mark.parametrize("empty", [
    b"data:\n\n", b"data: \n\n", b"data:  \n\n", b"data:\r\n\r\n", b"data: \ndata:\n\n", b"data:\n: comment\n\n",
    b"event: ping\ndata:\n\n",
])
def test_an_event_with_empty_data_is_skipped(empty: bytes) -> None:
    splitter = sse.EventSplitter()
    assert splitter.feed(empty) == []
    assert splitter.feed(b"data: {\"a\":1}\n\n" + empty + b"data: [DONE]\n\n") == [b'{"a":1}', b"[DONE]"]
    assert splitter.pending == b""


def test_an_empty_event_split_across_reads_is_skipped() -> None:
    splitter = sse.EventSplitter()
    assert splitter.feed(b"data: {\"a\":1}\n\ndata:") == [b'{"a":1}']
    assert splitter.feed(b" ") == []
    assert splitter.feed(b"\n") == []
    assert splitter.feed(b"\ndata: {\"b\":2}\n\n") == [b'{"b":2}']


def test_a_stream_with_empty_events_between_tokens_completes_and_is_paid() -> None:
    stream = (b"data: " + TOKEN % (4, 1) + b"\n\ndata:\n\ndata: \n\n"
              + b"data: " + TOKEN % (5, 2) + b"\n\ndata: " + FINAL + b"\n\ndata:\n\ndata: [DONE]\n\n")
    splitter, tracker = sse.EventSplitter(), StreamTracker(keep_usage=False)
    forwarded = [event for payload in splitter.feed(stream) if (event := tracker.take(payload)) is not None]
    assert len(forwarded) == 2 and all(event.startswith(b"data: {") for event in forwarded)
    assert tracker.complete and not tracker.error and not tracker.broken
    assert tracker.usage() == sse.Usage(3, 2)
