"""The distills' architecture (Qwen2) through `r1nest serve`, and a graceful stop: SIGTERM lets an
open stream finish (and pays for it), then the engine is stopped and serve exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from r1nest.gateway.pricing import Price, cost
from r1nest.tinymodel import SCRIPT_REASONING

from r1nest.testing.serve_process import Served, pid_alive

pytestmark = pytest.mark.engine



def test_chat_with_the_openai_sdk(serve_qwen2: Served, cached_price: Price) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{serve_qwen2.url}/v1", api_key=serve_qwen2.key, max_retries=0, timeout=120)
    before = serve_qwen2.credits()
    completion = client.chat.completions.create(
        model=serve_qwen2.state["served_model"], messages=[{"role": "user", "content": "Hello"}], max_tokens=24,
    )
    message = completion.choices[0].message
    assert message.reasoning_content == SCRIPT_REASONING
    assert message.content.strip().startswith("Hello from")
    details = completion.usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details else 0
    assert serve_qwen2.credits() == before - cost(
        cached_price, completion.usage.prompt_tokens, completion.usage.completion_tokens, cached)


# Long enough that the stream is still running when SIGTERM comes, even when a loaded machine lets
# the reader thread take many events before the main thread sends the signal.
STREAM_TOKENS = 5000


def test_sigterm_drains_open_streams_then_stops_the_engine(serve_qwen2: Served, cached_price: Price) -> None:
    """Runs last in this module: it stops the shared server."""
    before = serve_qwen2.credits()
    engine_pid = serve_qwen2.engine_pid
    body = {"model": serve_qwen2.state["served_model"], "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": STREAM_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {serve_qwen2.key}"}
    events: list[str] = []
    first_token = threading.Event()
    failure: list[BaseException] = []

    def read_stream() -> None:
        try:
            with httpx.stream("POST", f"{serve_qwen2.url}/v1/chat/completions", json=body, headers=headers,
                              timeout=120) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
                        if len(events) >= 3:
                            first_token.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)
        finally:
            first_token.set()

    reader = threading.Thread(target=read_stream)
    reader.start()
    assert first_token.wait(60) and not failure
    serve_qwen2.process.send_signal(signal.SIGTERM)
    events_at_sigterm = len(events)
    time.sleep(0.2)
    # draining: new work is refused (503 + Retry-After; tests/serve/test_serve_lifecycle.py holds the
    # gateway to the 503) while the open stream goes on
    try:
        refused = httpx.post(f"{serve_qwen2.url}/v1/chat/completions", headers=headers, timeout=10,
                             json={"messages": [{"role": "user", "content": "late"}], "max_tokens": 4})
        assert refused.status_code == 503 and "retry-after" in refused.headers
    except httpx.ConnectError:
        pass  # seen under heavy load: the listener already closed; the open stream must still finish
    reader.join(120)
    assert not reader.is_alive() and not failure, failure
    assert events[-1] == "[DONE]"
    assert len(events) > events_at_sigterm + 20, "the stream was not open when SIGTERM came"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), "the stream was cut instead of drained"
    usage = next(c["usage"] for c in reversed(chunks) if c.get("usage"))
    assert usage["completion_tokens"] == STREAM_TOKENS  # it ran to the end
    assert serve_qwen2.process.wait(60) == 0
    assert not pid_alive(engine_pid)
    assert not (serve_qwen2.data_dir / "serve.json").exists()

    # the stream was paid for: read the ledger the server left behind
    import asyncio

    from r1nest.keys import parse_key_id
    from r1nest.ledger.sqlite import SqliteStore

    async def balance() -> int:
        store = SqliteStore(serve_qwen2.data_dir / "ledger.sqlite3")
        try:
            return await store.balance(parse_key_id(serve_qwen2.key))
        finally:
            await store.close()

    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    assert asyncio.run(balance()) == before - cost(cached_price, usage["prompt_tokens"], usage["completion_tokens"], cached)
