"""Streams: forwarding, usage, partial work (failures, disconnects, drain) and its price."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import httpx

from r1nest.testing.fake_engine import ABSURD_TOKENS

from .conftest import MODEL, Harness


def events(response: httpx.Response) -> list[Any]:
    """The data payloads of an SSE body, JSON-decoded except [DONE]."""
    out: list[Any] = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def paid(harness: Harness, key_id: str) -> int:
    """Credits taken by settled reservations of this key."""
    return -sum(p.credits for p in harness.postings(key_id) if p.kind in ("reserve", "settle", "void"))


def test_stream_renames_reasoning_and_hides_unasked_usage(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=10_000)
    response = harness.chat(key, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response)
    assert chunks[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "think0 think1 think2 "
    assert "".join(d.get("content", "") for d in deltas) == "word0 word1 word2 word3 "
    assert not any("reasoning" in d for d in deltas)
    assert not any("usage" in c for c in chunks[:-1])  # forced upstream, stripped for the client
    # the header holds the balance right after the reservation
    assert int(response.headers["x-remaining-credits"]) < 10_000 - paid(harness, key_id)


def test_stream_usage_chunk_carries_remaining_credits_after_settlement(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=10_000)
    response = harness.chat(key, stream=True, stream_options={"include_usage": True})
    chunks = events(response)
    final = chunks[-2]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 7
    assert final["remaining_credits"] == harness.balance(key_id)
    assert paid(harness, key_id) == final["usage"]["prompt_tokens"] + 2 * 7
    assert sum("usage" in c for c in chunks[:-1]) == 1  # only the final one


def test_engine_failure_mid_stream_ends_with_error_event_and_pays_what_streamed(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=10_000)
    harness.engine.configure(fail_after_chunks=2)
    chunks = events(harness.chat(key, stream=True))
    assert chunks[-1] == "[DONE]" and chunks[-2]["error"]["code"] == "engine_error"
    streamed = sum(1 for c in chunks if isinstance(c, dict) and c.get("choices") and c["choices"][0]["delta"].get("reasoning_content"))
    assert streamed == 2
    prompt_tokens = 4  # "hello there": 2 words + 2 per message (the fake engine's tokenizer)
    assert paid(harness, key_id) == prompt_tokens + 2 * 2


def test_dropped_connection_mid_stream_ends_with_error_event(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=10_000)
    harness.engine.configure(drop_after_chunks=3)
    chunks = events(harness.chat(key, stream=True))
    assert chunks[-1] == "[DONE]" and "error" in chunks[-2]
    assert paid(harness, key_id) == 4 + 2 * 3


def test_failure_before_the_first_token_costs_nothing(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=10_000)
    harness.engine.configure(drop_after_chunks=0)
    chunks = events(harness.chat(key, stream=True))
    assert chunks[-1] == "[DONE]" and "error" in chunks[-2]
    assert harness.balance(key_id) == 10_000 and paid(harness, key_id) == 0


def test_missing_usage_is_paid_by_counting_deltas(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=10_000)
    harness.engine.configure(omit_usage=True)
    chunks = events(harness.chat(key, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1] == "[DONE]" and not any("error" in c for c in chunks[:-1])
    assert paid(harness, key_id) == 2 * 7  # 7 deltas, no prompt tokens known
    final = chunks[-2]  # the client asked for usage: it gets what was charged
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 7
    assert final["remaining_credits"] == harness.balance(key_id) and final["id"] == chunks[0]["id"]


def test_absurd_usage_is_clamped_to_the_reservation(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=10_000)
    harness.engine.configure(absurd_usage=True)
    for stream in (False, True):
        before = harness.balance(key_id)
        response = harness.chat(key, stream=stream, max_tokens=50)
        assert response.status_code == 200
        sent = harness.engine.requests[-1].json()
        assert sent["max_tokens"] == 50
        charged = before - harness.balance(key_id)
        assert 0 < charged <= 1 * 1000 + 2 * 50  # never more than the reservation
        assert harness.balance(key_id) >= 0
    metrics = harness.client.get("/metrics", headers=harness.admin).text
    assert "r1nest_usage_clamped_total 2" in metrics
    assert ABSURD_TOKENS > 10**9


def _open_stream(port: int, key: str, body: dict[str, Any]) -> socket.socket:
    payload = json.dumps(body).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(request)
    return sock


def _read_until(sock: socket.socket, marker_count: int) -> bytes:
    """Read until `marker_count` reasoning/content deltas have arrived."""
    data = b""
    deadline = time.monotonic() + 30
    while data.count(b'"reasoning_content"') + data.count(b'"delta":{"content":"word') < marker_count:
        assert time.monotonic() < deadline, data
        data += sock.recv(65536)
    return data


def _until(predicate: Any, what: str, timeout_s: float = 30.0) -> None:
    """Wait for `predicate()` to hold (bounded, generous: a loaded CI box is slow, never wrong)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not reached in {timeout_s} s: {what}"
        time.sleep(0.02)


def test_client_disconnect_aborts_the_engine_and_pays_tokens_sent(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=10_000)
    # The engine stalls after 2 tokens, so however slowly the disconnect travels, it has sent
    # exactly 2 when it is aborted (a slow token delay here raced the abort against token 3).
    harness.engine.configure(hold_after_chunks=2, reasoning_tokens=20)
    sock = _open_stream(harness.served.port, key, {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "stream": True})
    head = _read_until(sock, 2)
    assert b"x-remaining-credits" in head
    sock.close()
    aborts = harness.engine.wait_for_aborts(1, timeout_s=30)  # within the engine's 30 s stall
    assert len(aborts) == 1 and aborts[0].completion_tokens_sent == 2
    _until(lambda: harness.gateway.open_requests == 0, "the aborted request settled and closed")
    assert paid(harness, key_id) == 4 + 2 * aborts[0].completion_tokens_sent
    assert [p.kind for p in harness.postings(key_id)].count("settle") == 1
    assert "r1nest_aborted_streams_total 1" in harness.client.get("/metrics", headers=harness.admin).text


def test_drain_waits_then_cuts_streams_and_settles(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=10_000)
    # One token, then the engine stalls (30 s, then 49 more tokens): the stream cannot end by
    # itself during the drain, so only the drain's cut ends it, whatever the scheduler does.
    harness.engine.configure(hold_after_chunks=1, token_delay_s=0.2, reasoning_tokens=50)
    sock = _open_stream(harness.served.port, key, {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "stream": True})
    _read_until(sock, 1)
    started = time.monotonic()
    harness.served.call(harness.gateway.drain(0.5))
    # waited for the drain timeout (0.5 s), then cut: far less than the stream's 40 s
    assert 0.4 < time.monotonic() - started < 25
    assert harness.chat(key).status_code == 503
    tail = b""
    sock.settimeout(30)
    while b"data: [DONE]" not in tail:
        chunk = sock.recv(65536)
        if not chunk:
            break
        tail += chunk
    sock.close()
    assert b"shutting down" in tail and b"data: [DONE]" in tail
    assert harness.engine.wait_for_aborts(1, timeout_s=30)
    tokens = harness.engine.aborts[0].completion_tokens_sent
    assert tokens == 1 and paid(harness, key_id) == 4 + 2 * tokens
    assert harness.gateway.open_requests == 0


def test_completions_route_streams_and_is_metered(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=10_000)
    response = harness.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "one two three", "max_tokens": 5, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    )
    chunks = events(response)
    assert chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"]) == "think0 think1 think2 word0 word1 "
    assert paid(harness, key_id) == 3 + 2 * 5
    whole = harness.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "one two", "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert whole.status_code == 200 and whole.json()["choices"][0]["text"] == "think0 think1 "
    assert int(whole.headers["x-remaining-credits"]) == harness.balance(key_id)


async def test_upstream_is_never_buffered(harness: Harness) -> None:
    """The first delta reaches the client while the engine has not finished: the engine sends
    one token and then stalls for 30 s, so a gateway that held anything back until more came
    (or until the end) would leave the client with nothing before its 20 s read timeout."""
    _, key = harness.new_key(credits=10_000)
    harness.engine.configure(hold_after_chunks=1, reasoning_tokens=6, content_tokens=0)
    first = None
    async with httpx.AsyncClient(base_url=harness.url, timeout=20) as client:
        async with client.stream(
            "POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True},
        ) as response:
            async for line in response.aiter_lines():
                if "reasoning_content" in line:
                    first = line
                    break
    assert first is not None and "think0" in first
    await asyncio.sleep(0)


def test_a_fault_mid_stream_still_ends_the_stream(make_harness: Any) -> None:
    from r1nest.ledger.memory import MemoryStore

    class FailingSettle(MemoryStore):
        async def settle(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("disk on fire")

    harness = make_harness(store=FailingSettle())
    _, key = harness.new_key(credits=10_000)
    response = harness.chat(key, stream=True)
    chunks = events(response)
    assert chunks[-1] == "[DONE]" and chunks[-2]["error"]["code"] == "internal_error"
    assert "disk on fire" not in response.text
