"""Per-key limits hold for the deployment, not per process: two `r1nest gateway` processes on
one ledger (the SQLite file in a shared data dir) enforce one `max_concurrency` and one
`rate_limit_rpm` together."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest

from r1nest.testing.fake_engine import FakeEngine

from .conftest import ADMIN_KEY, ENGINE_KEY, MODEL, GatewayProcess

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def two_gateways(tmp_path: Any) -> Any:
    with FakeEngine(api_key=ENGINE_KEY, served_model=MODEL) as engine:
        gateways = [GatewayProcess(engine.url, tmp_path / "data", log_path=tmp_path / f"gateway-{i}.log")
                    for i in range(2)]
        try:
            yield engine, gateways
        finally:
            for gateway in gateways:
                gateway.stop()


def _chat(url: str, key: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10})


def _open_stream(port: int, key: str) -> socket.socket:
    payload = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload)
    data, deadline = b"", time.monotonic() + 30
    while b"reasoning_content" not in data:
        assert time.monotonic() < deadline, data
        data += sock.recv(65536)
    return sock


def test_max_concurrency_counts_requests_in_flight_on_every_process(two_gateways: Any) -> None:
    engine, (a, b) = two_gateways
    created = httpx.post(f"{a.url}/admin/keys", headers=ADMIN, json={"name": "shared", "credits": 100_000,
                                                                     "max_concurrency": 2}).json()
    engine.configure(hold_after_chunks=1, hold_s=30)
    held = [_open_stream(a.port, created["key"]), _open_stream(b.port, created["key"])]
    refused = [_chat(url, created["key"]) for url in (a.url, b.url)]
    assert [r.status_code for r in refused] == [429, 429]
    assert all(r.json()["error"]["code"] == "rate_limited" for r in refused)
    held[0].close()  # one ends (client gone): its slot frees for either process
    engine.configure(hold_after_chunks=None)
    deadline = time.monotonic() + 30
    while (response := _chat(b.url, created["key"])).status_code == 429:
        assert time.monotonic() < deadline, "the slot never freed"
        time.sleep(0.1)
    assert response.status_code == 200
    held[1].close()


def test_rate_limit_rpm_is_one_budget_across_processes(two_gateways: Any) -> None:
    _, (a, b) = two_gateways
    # the limit is per fixed minute of unix time: start well inside one
    if time.time() % 60 > 40:
        time.sleep(61 - time.time() % 60)
    created = httpx.post(f"{a.url}/admin/keys", headers=ADMIN, json={"name": "shared", "credits": 100_000,
                                                                     "rate_limit_rpm": 5}).json()
    statuses = [_chat((a.url, b.url)[i % 2], created["key"]).status_code for i in range(10)]
    assert statuses.count(200) == 5 and statuses.count(429) == 5
    assert statuses[:5] == [200] * 5
    retry = _chat(b.url, created["key"])
    assert retry.status_code == 429 and 1 <= int(retry.headers["retry-after"]) <= 60
