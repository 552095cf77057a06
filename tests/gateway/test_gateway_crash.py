"""kill -9 between reserve and settle: on restart the sweeper voids the reservation."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

from r1nest.ledger.sqlite import SqliteStore

from .conftest import ADMIN_KEY, MODEL, GatewayProcess


def _ledger(path: Any) -> tuple[int, list[Any]]:
    async def read() -> tuple[int, list[Any]]:
        store = SqliteStore(path)
        try:
            key_id = (await store.list_keys())[0].key_id
            return await store.balance(key_id), await store.postings(key_id)
        finally:
            await store.close()

    return asyncio.run(read())


def test_kill_9_mid_stream_then_restart_voids_the_reservation(engine: Any, tmp_path: Any) -> None:
    data_dir = tmp_path / "data"
    # The kill must land while the stream is open (before the gateway's stream timeout settles
    # it): 5 s leaves a loaded machine plenty of room; the reservation outlives it (the settings
    # require a TTL over the stream timeout) and the test waits past it below.
    ttl_s = 5.5
    ttl = {"R1NEST_STREAM_TIMEOUT_S": "5", "R1NEST_RESERVATION_TTL_S": str(ttl_s)}
    engine.configure(token_delay_s=0.5, reasoning_tokens=50)
    first = GatewayProcess(engine.url, data_dir, log_path=tmp_path / "first.log", **ttl)
    try:
        import httpx

        created = httpx.post(
            first.url + "/admin/keys", json={"name": "t", "credits": 10_000},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10,
        ).json()
        payload = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", first.port), timeout=10)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + created["key"].encode()
            + b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        head = sock.recv(65536)
        assert b" 200 " in head and b"x-remaining-credits" in head  # reserved, streaming
        first.stop(kill=True)  # SIGKILL: no settlement, no drain
        killed_at = time.time()  # after the reservation was made
        sock.close()
    finally:
        first.stop(kill=True)

    balance, postings = _ledger(data_dir / "ledger.sqlite3")
    assert balance < 10_000 and [p.kind for p in postings] == ["grant", "reserve"]

    time.sleep(max(0.0, killed_at + ttl_s + 0.1 - time.time()))  # past the reservation's deadline
    second = GatewayProcess(engine.url, data_dir, log_path=tmp_path / "second.log", **ttl)
    second.stop()
    assert "voided 1 expired reservation" in second.log()
    balance, postings = _ledger(data_dir / "ledger.sqlite3")
    assert balance == 10_000 == sum(p.credits for p in postings)
    assert [p.kind for p in postings] == ["grant", "reserve", "void"]
