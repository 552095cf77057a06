"""The engine supervisor: backoff and ETA (pure), then a real child process that misbehaves."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from r1nest.engines.base import EngineProfile
from r1nest.engines.launcher import (
    Backoff,
    EngineSupervisor,
    child_environ,
    estimate_startup_s,
    read_startup_s,
    redact,
    startup_key,
    write_startup_s,
)
from r1nest.gateway.state import EngineState

FAKE = Path(__file__).with_name("fake_engine_process.py")
FAST = Backoff(initial_s=0.05, factor=2.0, max_s=0.2, max_restarts=2, stable_s=60.0)


# --- pure parts ------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_then_gives_up() -> None:
    policy = Backoff(initial_s=2, factor=2, max_s=10, max_restarts=5)
    assert [policy.delay_s(n) for n in range(1, 7)] == [2, 4, 8, 10, 10, None]
    with pytest.raises(ValueError):
        policy.delay_s(0)


def test_eta_prefers_the_last_observed_startup() -> None:
    assert estimate_startup_s(10**9, "cpu", observed_s=42.0) == 42.0
    cpu_small = estimate_startup_s(10_000_000, "cpu")
    assert 60 <= cpu_small <= 200
    # bigger models take longer; GPUs have a bigger fixed part (CUDA graphs, kernels)
    assert estimate_startup_s(700 * 10**9, "hopper") > estimate_startup_s(10**9, "hopper") > cpu_small
    assert estimate_startup_s(10**9, "cpu", observed_s=0) == estimate_startup_s(10**9, "cpu")


def test_startup_records_round_trip_and_survive_garbage(tmp_path: Path) -> None:
    assert read_startup_s(tmp_path, "k") is None
    write_startup_s(tmp_path, "k", 75.04)
    assert read_startup_s(tmp_path, "k") == 75.0
    (tmp_path / "engine-startups.json").write_text("{not json")
    assert read_startup_s(tmp_path, "k") is None
    write_startup_s(tmp_path, "k2", 5)
    assert read_startup_s(tmp_path, "k2") == 5
    for i in range(100):
        write_startup_s(tmp_path, f"m{i}", i + 1)
    assert read_startup_s(tmp_path, "m99") == 100 and read_startup_s(tmp_path, "m0") is None  # bounded


def test_redact_and_child_environment() -> None:
    assert redact("key=abc123 and abc123", ("abc123",)) == "key=[redacted] and [redacted]"
    env = child_environ({"PATH": "/bin", "R1NEST_ADMIN_KEY": "secret", "r1nest_x": "1"}, {"VLLM_API_KEY": "k"})
    assert env == {"PATH": "/bin", "VLLM_API_KEY": "k"}


# --- a real child process --------------------------------------------------------------------


def _profile() -> EngineProfile:
    return EngineProfile(engine="vllm", model="/nonexistent/tiny", served_model_name="fake", args=(),
                         env={"FAKE_PROFILE_VAR": "1"}, hardware_class="cpu")


def _supervisor(tmp_path: Path, *flags: str, state: EngineState | None = None, lines: list[str] | None = None,
                backoff: Backoff = FAST, grace_s: float = 5.0) -> EngineSupervisor:
    sup = EngineSupervisor(
        _profile(), state=state or EngineState(phase="warming"), backoff=backoff, data_dir=tmp_path,
        log_sink=(lines.append if lines is not None else None), stop_grace_s=grace_s,
        health_poll_interval_s=0.05, watch_interval_s=0.1, startup_timeout_s=30,
        argv=[], base_environ={"PATH": os.environ.get("PATH", ""), "R1NEST_ADMIN_KEY": "r1a-admin-secret"},
    )
    sup._argv_override = [sys.executable, str(FAKE), "--port", str(sup.port), *flags]
    return sup


async def _until(predicate, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def test_ready_key_in_env_only_logs_forwarded_and_redacted(tmp_path: Path) -> None:
    lines: list[str] = []
    state = EngineState(phase="warming")
    sup = _supervisor(tmp_path, "--print-key", state=state, lines=lines)
    task = asyncio.create_task(sup.run())
    try:
        await asyncio.wait_for(sup.ready_event.wait(), 20)
        assert state.phase == "ready"
        pid = sup.pid
        assert pid is not None
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode()
        assert sup.api_key not in cmdline
        assert f"VLLM_API_KEY={sup.api_key}" in environ
        assert "FAKE_PROFILE_VAR=1" in environ
        assert "R1NEST_ADMIN_KEY" not in environ and "r1a-admin-secret" not in environ
        assert os.getpgid(pid) == pid  # its own process group (setsid)
        await _until(lambda: any("loaded key" in line for line in lines))
        assert any("loaded key [redacted]" in line for line in lines)
        assert not any(sup.api_key in line for line in lines)
        assert read_startup_s(tmp_path, startup_key(sup.profile)) == pytest.approx(sup.last_startup_s, abs=0.1)
    finally:
        await sup.stop()
        await asyncio.wait_for(task, 10)
    assert not _alive(pid)


async def test_crash_after_ready_restarts_the_engine(tmp_path: Path) -> None:
    state = EngineState(phase="warming")
    phases: list[str] = []
    crash = tmp_path / "crash"
    sup = _supervisor(tmp_path, "--crash-when", str(crash), state=state)
    task = asyncio.create_task(sup.run())
    try:
        await asyncio.wait_for(sup.ready_event.wait(), 20)
        first_pid = sup.pid
        crash.touch()  # crashes after it was seen ready, however slow its start was
        await _until(lambda: sup.starts >= 2, 20)
        phases.append(state.phase)
        await asyncio.wait_for(sup.ready_event.wait(), 20)
        assert state.phase == "ready"
        assert sup.pid != first_pid and not _alive(first_pid)
        assert phases == ["warming"]  # clients saw warming (503 + Retry-After) meanwhile
    finally:
        await sup.stop()
        await asyncio.wait_for(task, 10)


async def test_crash_loop_ends_down_and_the_gateway_answers_503(tmp_path: Path) -> None:
    import httpx

    from r1nest.accounts import create_api_key
    from r1nest.gateway.app import create_app
    from r1nest.gateway.upstream import UpstreamConfig
    from r1nest.ledger.memory import MemoryStore
    from r1nest.settings import Settings

    state = EngineState(phase="warming")
    counter = tmp_path / "starts"
    sup = _supervisor(tmp_path, "--crash-starts", "99", "--counter", str(counter), state=state)
    await asyncio.wait_for(sup.run(), 30)  # returns when it gives up
    assert state.phase == "down"
    assert sup.starts == FAST.max_restarts + 1 == int(counter.read_text())

    store = MemoryStore()
    _, key = await create_api_key(store, name="t", credits=1000, now=time.time())
    app = create_app(settings=Settings(data_dir=tmp_path), store=store, admin_key="r1a-test",
                     upstream=UpstreamConfig(url=sup.url, api_key=sup.api_key, served_model="fake"), state=state)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "down"
        chat = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                 json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503
        assert int(chat.headers["retry-after"]) >= 1
        assert chat.headers["x-remaining-credits"] == "1000"


async def test_a_crash_at_startup_then_success_recovers(tmp_path: Path) -> None:
    state = EngineState(phase="warming")
    counter = tmp_path / "starts"
    sup = _supervisor(tmp_path, "--crash-starts", "1", "--counter", str(counter), state=state)
    task = asyncio.create_task(sup.run())
    try:
        await asyncio.wait_for(sup.ready_event.wait(), 20)
        assert state.phase == "ready" and sup.starts == 2 and sup.failures == 1
    finally:
        await sup.stop()
        await asyncio.wait_for(task, 10)


async def test_stuck_engine_is_restarted(tmp_path: Path) -> None:
    stuck = tmp_path / "stuck"
    sup = _supervisor(tmp_path, "--unhealthy-when", str(stuck))
    task = asyncio.create_task(sup.run())
    try:
        await asyncio.wait_for(sup.ready_event.wait(), 20)
        first_pid = sup.pid
        stuck.touch()  # stops answering /health after it was seen ready, however slow its start was
        await _until(lambda: sup.starts >= 2, 20)
        assert not _alive(first_pid)
    finally:
        await sup.stop()
        await asyncio.wait_for(task, 10)


async def test_stop_kills_the_whole_group_even_when_sigterm_is_ignored(tmp_path: Path) -> None:
    child_pid_file = tmp_path / "child.pid"
    sup = _supervisor(tmp_path, "--ignore-sigterm", "--spawn-child", str(child_pid_file), grace_s=1.0)
    task = asyncio.create_task(sup.run())
    await asyncio.wait_for(sup.ready_event.wait(), 20)
    pid = sup.pid
    await _until(lambda: child_pid_file.exists() and child_pid_file.read_text().strip() != "")
    grandchild = int(child_pid_file.read_text())
    assert _alive(grandchild)
    started = time.monotonic()
    await sup.stop()
    await asyncio.wait_for(task, 10)
    # waited for the grace period, then killed (the upper bound only says it did not hang)
    assert 0.9 <= time.monotonic() - started < 30
    assert not _alive(pid)
    await _until(lambda: not _alive(grandchild), 5)


async def test_stop_during_startup_leaves_nothing_running(tmp_path: Path) -> None:
    state = EngineState(phase="warming")
    sup = _supervisor(tmp_path, "--ready-after", "60", state=state)
    task = asyncio.create_task(sup.run())
    await _until(lambda: sup.pid is not None)
    pid = sup.pid
    assert state.phase == "warming" and state.eta_s is not None
    await sup.stop()
    await asyncio.wait_for(task, 10)
    assert not _alive(pid)


def test_cpu_wheel_runs_the_openai_server_module() -> None:
    from r1nest.engines.launcher import cpu_wheel_compatible

    argv = ["py", "-m", "vllm.entrypoints.cli.main", "serve", "/m", "--port", "1"]
    assert cpu_wheel_compatible(argv, vllm_metadata_found=True) == argv
    assert cpu_wheel_compatible(argv, vllm_metadata_found=False) == [
        "py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--port", "1"]
    other = ["py", "-m", "sglang.launch_server", "--model-path", "/m"]
    assert cpu_wheel_compatible(other, vllm_metadata_found=False) == other
