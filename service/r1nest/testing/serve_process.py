"""`r1nest serve` as a child process, as a user starts it: for end-to-end tests and benchmarks.

    served = start_serve(model_dir, data_dir, log_path)   # returns once /health says ready
    (or launch_serve(...) now, wait_ready(served) later: several servers start side by side)
    served.url, served.key, served.engine_url, served.engine_pid, served.warming_health
    served.stop()                                         # SIGTERM (drain), returns the exit code

While waiting, it records the gateway's first answers during warming (`/health` and a chat
request), so tests can check the 503 + Retry-After contract without a second start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from r1nest.files import API_KEY_FILE, SERVE_STATE_FILE, read_serve_state


class ServeFailed(RuntimeError):
    pass


STARTUP_TIMEOUT_S = 900.0  # a cold vLLM CPU start on a busy 2-core box


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Served:
    """One running `r1nest serve`."""

    process: subprocess.Popen[bytes]
    url: str  # gateway base URL, without /v1
    data_dir: Path
    log_path: Path
    warming_health: httpx.Response | None = None
    warming_chat: httpx.Response | None = None
    startup_s: float = 0.0
    started: float = 0.0  # time.monotonic() at launch
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return (self.data_dir / API_KEY_FILE).read_text().strip()

    @property
    def engine_url(self) -> str:
        url: str = self.state["engine_url"]
        return url

    @property
    def engine_pid(self) -> int:
        return int(self.state["engine_pid"])

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def credits(self) -> int:
        response = httpx.get(f"{self.url}/v1/credits", headers={"Authorization": f"Bearer {self.key}"}, timeout=10)
        response.raise_for_status()
        return int(response.json()["remaining_credits"])

    def stop(self, timeout_s: float = 120.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return self.process.returncode


def launch_serve(
    model_dir: Path, data_dir: Path, log_path: Path, *, settings_env: dict[str, str] | None = None,
) -> Served:
    """Start `r1nest serve` on a free port and return at once (see wait_ready). `settings_env`
    are R1NEST_* settings for it; the caller's own R1NEST_* variables are not passed on."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("R1NEST_")}
    env.update(settings_env or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "r1nest", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
             "--port", str(port), "--data-dir", str(data_dir)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    return Served(process=process, url=f"http://127.0.0.1:{port}", data_dir=data_dir, log_path=log_path,
                  started=time.monotonic())


def wait_ready(served: Served, *, timeout_s: float = STARTUP_TIMEOUT_S) -> Served:
    """Block until the gateway says ready (stopping the server if it never does)."""
    if served.state.get("engine_pid"):
        return served
    try:
        _wait_until_ready(served, served.started, timeout_s)
    except BaseException:
        served.stop(30)
        raise
    return served


def start_serve(
    model_dir: Path, data_dir: Path, log_path: Path, *, settings_env: dict[str, str] | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Served:
    """launch_serve + wait_ready."""
    served = launch_serve(model_dir, data_dir, log_path, settings_env=settings_env)
    return wait_ready(served, timeout_s=startup_timeout_s)


def _wait_until_ready(served: Served, started: float, timeout_s: float) -> None:
    deadline = started + timeout_s
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline:
            if served.process.poll() is not None:
                raise ServeFailed(f"r1nest serve exited with {served.process.returncode}:\n{served.log_tail()}")
            try:
                health = client.get(f"{served.url}/health")
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            if health.status_code == 503 and served.warming_health is None:
                served.warming_health = health
                served.warming_chat = client.post(
                    f"{served.url}/v1/chat/completions", headers={"Authorization": f"Bearer {served.key}"},
                    json={"messages": [{"role": "user", "content": "too early"}]},
                )
            if health.status_code == 200:
                served.startup_s = time.monotonic() - started
                for _ in range(50):  # the state file gets the engine pid right after ready
                    served.state = read_serve_state(served.data_dir)
                    if served.state.get("engine_pid"):
                        return
                    time.sleep(0.1)
                raise ServeFailed(f"{SERVE_STATE_FILE} never got the engine pid")
            time.sleep(1.0)
    raise ServeFailed(f"r1nest serve not ready after {timeout_s:.0f} s:\n{served.log_tail()}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def running_requests(engine_url: str) -> float:
    """vLLM's own gauge, summed over engines: requests in the model's batches right now."""
    text = httpx.get(f"{engine_url}/metrics", timeout=10).text
    total = 0.0
    seen = False
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    assert seen, "vLLM's /metrics has no vllm:num_requests_running"
    return total


def generated_tokens(engine_url: str) -> float:
    """vLLM's counter of generated tokens, summed over engines."""
    text = httpx.get(f"{engine_url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:generation_tokens_total"))
