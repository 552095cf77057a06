"""Gateway test harness: a real fake engine and the gateway on uvicorn, both on loopback."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx
import pytest

from r1nest.gateway.app import create_app
from r1nest.gateway.state import EngineState
from r1nest.gateway.upstream import UpstreamConfig
from r1nest.ledger.memory import MemoryStore
from r1nest.settings import Settings
from r1nest.testing.asgi_server import ServedApp
from r1nest.testing.fake_engine import FakeEngine

ENGINE_KEY = "engine-secret-0123456789abcdef"
MODEL = "deepseek-r1"
ADMIN_KEY = "r1nadmin-0a0a0a0a0a0a-" + "A" * 43


@dataclass
class Harness:
    url: str
    engine: FakeEngine
    served: ServedApp
    store: Any
    settings: Settings
    state: EngineState
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=30)

    @property
    def gateway(self) -> Any:
        return self.served.server.config.app.state.gateway

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def new_key(self, credits: int = 1_000_000, **fields: Any) -> tuple[str, str]:
        """(key id, plaintext) of a fresh key, made through the admin API."""
        response = self.client.post("/admin/keys", json={"name": "test", "credits": credits, **fields}, headers=self.admin)
        assert response.status_code == 201, response.text
        return response.json()["id"], response.json()["key"]

    def balance(self, key_id: str) -> int:
        return self.served.call(self.store.balance(key_id))

    def postings(self, key_id: str) -> list[Any]:
        return self.served.call(self.store.postings(key_id))

    def chat(self, key: str, *, stream: bool = False, **body: Any) -> httpx.Response:
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "stream": stream, **body}
        return self.client.post("/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {key}"})


def make_settings(tmp_path: Any, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        data_dir=tmp_path, admin_key=ADMIN_KEY, price_prompt_per_mtok=1_000_000,
        price_completion_per_mtok=2_000_000, max_tokens_cap=1000, drain_timeout_s=2.0,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    with FakeEngine(api_key=ENGINE_KEY, served_model=MODEL) as fake:
        yield fake


@pytest.fixture
def make_harness(engine: FakeEngine, tmp_path: Any) -> Iterator[Any]:
    made: list[Harness] = []

    def make(*, store: Any = None, state: EngineState | None = None, **settings: Any) -> Harness:
        store = store if store is not None else MemoryStore()
        state = state or EngineState()
        config = make_settings(tmp_path, **settings)
        app = create_app(settings=config, store=store, upstream=UpstreamConfig(engine.url, ENGINE_KEY, MODEL), state=state)
        served = ServedApp(app).start()
        harness = Harness(served.url, engine, served, store, config, state)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.client.close()
        harness.served.stop()


@pytest.fixture
def harness(make_harness: Any) -> Harness:
    return make_harness()


def raw_request(port: int, request_line: str, headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, bytes]:
    """Send one request with the path exactly as written (no client-side normalisation)."""
    lines = [request_line, "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    response = b"".join(chunks)
    status = int(response.split(b" ", 2)[1])
    return status, response


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GatewayProcess:
    """`r1nest gateway` as a child process (its stderr captured to a file)."""

    def __init__(self, engine_url: str, data_dir: Any, *, log_path: Any, **env: str) -> None:
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        child_env = {k: v for k, v in os.environ.items() if not k.upper().startswith("R1NEST_")}
        child_env.update(
            R1NEST_UPSTREAM_KEY=ENGINE_KEY, R1NEST_ADMIN_KEY=ADMIN_KEY, R1NEST_LOG_LEVEL="debug",
            R1NEST_PRICE_PROMPT_PER_MTOK="1000000", R1NEST_PRICE_COMPLETION_PER_MTOK="2000000",
            R1NEST_MAX_TOKENS_CAP="1000", **env,
        )
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "r1nest", "gateway", "--upstream", engine_url, "--served-model", MODEL,
             "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(data_dir)],
            stdout=self._log, stderr=subprocess.STDOUT, env=child_env,
        )
        deadline = time.monotonic() + 60  # a loaded machine, a ledger server to reach first
        while True:
            assert self.process.poll() is None, self.log()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def stop(self, *, kill: bool = False) -> int:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        code = self.process.wait(30)
        if not self._log.closed:
            self._log.close()
        return code
