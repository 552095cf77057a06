"""No key ever appears in a log: in-process (caplog) and from a `r1nest gateway` child process."""

from __future__ import annotations

import logging
import socket
from typing import Any

import httpx

from .conftest import ADMIN_KEY, ENGINE_KEY, MODEL, GatewayProcess, Harness

CLIENT_LOGGERS = ("httpx", "httpcore", "openai")  # the test's own client may log its URLs


def _exercise(url: str, key: str, admin: dict[str, str]) -> None:
    """Authenticated traffic of every kind, including keys in places they do not belong."""
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=url, timeout=30) as client:
        client.post("/v1/chat/completions", json=body, headers=auth)
        client.post("/v1/chat/completions", json={**body, "stream": True}, headers={"x-api-key": key})
        client.post("/v1/chat/completions", json={**body, "model": key}, headers=auth)  # key as model name
        client.post("/v1/chat/completions", content=key.encode(), headers=auth)  # key as body
        client.get(f"/{key}", headers=auth)  # key in the path
        client.get("/v1/models", params={"api_key": key}, headers=auth)  # key in the query
        client.get("/v1/credits", headers={"Authorization": f"Bearer {key}x"})  # wrong key
        client.get("/v1/credits", headers={"Authorization": f"Bearer {key}", "x-api-key": key + "y"})
        client.get("/metrics", headers=admin)
        client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}z"})
        client.get("/admin/keys", headers=admin)
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:  # a stream cut short
        payload = b'{"messages":[{"role":"user","content":"hi"}],"stream":true}'
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
            + b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        sock.recv(100)


def _secrets(key: str) -> list[str]:
    secret = key.split("-", 2)[2]
    return [key, secret, secret[:16], secret[-16:], ADMIN_KEY.split("-", 2)[2][:16], ENGINE_KEY]


def test_in_process_logs_never_hold_a_key(harness: Harness, caplog: Any) -> None:
    key_id, key = harness.new_key(credits=100_000)
    harness.engine.configure(token_delay_s=0.05)
    with caplog.at_level(logging.DEBUG):
        _exercise(harness.url, key, harness.admin)
        harness.engine.wait_for_aborts(1)
    server_side = "\n".join(
        record.getMessage() + (record.exc_text or "")
        for record in caplog.records if not record.name.startswith(CLIENT_LOGGERS)
    )
    assert f"key_id={key_id}" in server_side  # the access log does log the id
    for secret in _secrets(key):
        assert secret not in server_side


def test_gateway_process_logs_never_hold_a_key(engine: Any, tmp_path: Any) -> None:
    gateway = GatewayProcess(engine.url, tmp_path / "data", log_path=tmp_path / "gateway.log")
    try:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        created = httpx.post(gateway.url + "/admin/keys", json={"name": "t", "credits": 100_000}, headers=admin, timeout=10)
        key_id, key = created.json()["id"], created.json()["key"]
        engine.configure(token_delay_s=0.05)
        _exercise(gateway.url, key, admin)
        engine.wait_for_aborts(1)
    finally:
        gateway.stop()
    log = gateway.log()
    assert f"key_id={key_id}" in log and "chat_completions 200" in log
    for secret in _secrets(key):
        assert secret not in log


def test_gateway_process_takes_the_served_model_from_the_engine(engine: Any) -> None:
    from r1nest.gateway.cli import engine_model

    from .conftest import ENGINE_KEY

    assert engine_model(engine.url, ENGINE_KEY) == MODEL
    assert engine_model(engine.url, "wrong-key") is None
    assert engine_model("http://127.0.0.1:1", None, timeout_s=1) is None
