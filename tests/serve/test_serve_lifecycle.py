"""`r1nest serve`'s lifecycle with a fake engine (fast, no vLLM): warming, a crashed engine
restarted, SIGTERM draining an open stream, exit 0, engine gone. The same properties are checked
on the real vLLM CPU build in tests/e2e."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from r1nest.testing.serve_process import pid_alive

DRIVER = Path(__file__).with_name("serve_with_fake_engine.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Running:
    def __init__(self, tmp_path: Path, token_delay_s: float) -> None:
        self.data_dir = tmp_path / "data"
        self.url = f"http://127.0.0.1:{_free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("R1NEST_")}
        self.log = tmp_path / "serve.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(DRIVER), str(self.data_dir), self.url.rsplit(":", 1)[1], str(token_delay_s)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )

    @property
    def key(self) -> str:
        return (self.data_dir / "api_key").read_text().strip()

    def state(self) -> dict:
        return json.loads((self.data_dir / "serve.json").read_text())

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    if self.state().get("engine_pid"):
                        return
            except (httpx.TransportError, FileNotFoundError, ValueError):
                pass
            time.sleep(0.1)
        raise AssertionError("not ready:\n" + self.log.read_text())

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def running(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = Running(tmp_path, token_delay_s=0.05)
    yield server
    server.close()


def _chat(server: Running, **extra: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {server.key}"},
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra})


def test_crashed_engine_is_restarted_and_serving_resumes(running: Running) -> None:
    running.wait_ready()
    assert _chat(running).status_code == 200
    first_pid = running.state()["engine_pid"]
    os.kill(first_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    saw_unavailable = False
    while True:
        assert time.monotonic() < deadline, running.log.read_text()
        response = _chat(running)
        if response.status_code == 503:
            saw_unavailable = True
            assert int(response.headers["retry-after"]) >= 1
        elif response.status_code == 200 and running.state()["engine_pid"] not in (None, first_pid):
            break
        time.sleep(0.1)
    assert saw_unavailable  # clients were told to come back, not sent to a dead engine
    assert "restart 1/5" in running.log.read_text()


def test_sigterm_drains_an_open_stream_then_exits_0(running: Running) -> None:
    running.wait_ready()
    engine_pid = running.state()["engine_pid"]
    events: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {running.key}"},
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True,
                                "stream_options": {"include_usage": True}}) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    if len(events) == 3:
                        started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(20)
    running.process.send_signal(signal.SIGTERM)
    at_signal = len(events)
    # wait until serve has taken the signal (it says so as it starts draining), not a fixed pause
    deadline = time.monotonic() + 30
    while "refusing new requests" not in running.log.read_text():
        assert time.monotonic() < deadline and running.process.poll() is None, running.log.read_text()
        time.sleep(0.02)
    refused = _chat(running)
    assert refused.status_code == 503 and "retry-after" in refused.headers  # still listening, refusing
    reader.join(30)
    assert events[-1] == "[DONE]" and len(events) > at_signal + 10
    usage = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
    assert usage and usage[-1]["completion_tokens"] == 63  # the whole answer, not cut
    assert running.process.wait(30) == 0
    assert not pid_alive(engine_pid)
    assert not (running.data_dir / "serve.json").exists()
    assert "refusing new requests" in running.log.read_text()
