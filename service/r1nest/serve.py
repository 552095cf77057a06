"""`r1nest serve`: engine + gateway + ledger on this machine.

    r1nest serve --model deepseek-r1-distill-qwen-7b          a catalog model on this box's GPUs
    r1nest serve --model .r1nest/models/tiny-deepseek-v3      a checkpoint directory (CPU if no GPU)

What happens:
1. the planner picks the engine launch for this box (`cloud="local"`; vLLM's CPU build when
   there is no NVIDIA GPU);
2. the data dir gets the SQLite ledger, the admin key and, on the first run, a demo API key with
   `demo_credits` credits (its plaintext in `data_dir/api_key`, mode 0600, shown once);
3. the gateway listens at once (503 + Retry-After, `/health` says `warming` with an ETA) while
   the engine starts under the supervisor on 127.0.0.1 with its own key;
4. when the engine is ready the endpoint, the key and a curl command that works are printed;
5. SIGTERM / Ctrl-C: the gateway stops taking requests, open streams get `drain_timeout_s` to
   finish (then are cut and settled), the engine is stopped, the process exits 0.

`data_dir/serve.json` tells other tools (tests, `r1nest overview`) where things run; it holds no
secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from r1nest.errors import ConfigError

log = logging.getLogger("r1nest.serve")

STATE_FILE = "serve.json"
API_KEY_FILE = "api_key"  # the deployment's ApiKey file, as r1nest.overview.sources names it
PLAIN_PROGRESS_EVERY_S = 15.0


@dataclass(frozen=True)
class Launch:
    """What serve decided before starting anything."""

    served_model: str
    engine: str
    hardware: str  # "CPU" or e.g. "local (8x H100)"
    profile: Any  # EngineProfile
    weight_bytes: int


# --- planning -----------------------------------------------------------------------------------


def detect_local_gpus() -> str | None:
    """'H100:8' for this box's NVIDIA GPUs (nvidia-smi), or None when there are none."""
    import shutil

    if shutil.which("nvidia-smi") is None:
        return None
    from r1nest.doctor import match_gpu_model
    from r1nest.gpu_probe import _nvidia_smi_gpus

    gpus = _nvidia_smi_gpus()
    if not gpus:
        return None
    model = match_gpu_model(gpus[0])
    if model is None:
        raise ConfigError(f"this box's GPU ({gpus[0].name}) is not in r1nest's hardware table")
    return f"{model.name}:{len(gpus)}"


def plan_launch(model: str, *, engine: str, max_model_len: int | None, local_gpus: str | None) -> Launch:
    from r1nest.catalog import resolve_model
    from r1nest.planner import plan

    spec = resolve_model(model)
    chosen = plan(spec, "local", context=max_model_len, engine=engine,  # type: ignore[arg-type]
                  local_gpus=local_gpus, hardware_class=None if local_gpus else "cpu")
    return Launch(served_model=chosen.profile.served_model_name, engine=chosen.engine,
                  hardware=chosen.hardware, profile=chosen.profile, weight_bytes=spec.weight_bytes)


# --- keys and files in the data dir ---------------------------------------------------------


async def ensure_demo_key(store: Any, data_dir: Path, *, credits: int, now: float) -> tuple[str, bool]:
    """(plaintext, created): the demo key kept in data_dir/api_key, created on the first run.

    A key file whose key this ledger does not know (a new ledger) is replaced; a key that was
    revoked or has expired is kept: that was someone's decision.
    """
    from r1nest.accounts import create_api_key
    from r1nest.keys import parse_key_id
    from r1nest.overview.sources import read_key_file, write_key_file

    path = data_dir / API_KEY_FILE
    existing = read_key_file(path)
    if existing is not None:
        key_id = parse_key_id(existing)
        if key_id is not None and await store.get_key(key_id) is not None:
            return existing, False
        log.warning("%s holds a key this ledger does not know: creating a new demo key", path)
    _, plaintext = await create_api_key(store, name="demo", credits=credits, now=now)
    write_key_file(path, plaintext)
    return plaintext, True


def write_state(data_dir: Path, state: dict[str, Any]) -> None:
    path = data_dir / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=1)
    tmp.replace(path)


def read_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((Path(data_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror} (another server? try --port)") from None


def client_base_url(settings: Any) -> str:
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def curl_command(base_url: str, served_model: str, key_ref: str) -> str:
    """A chat request that works as printed. `key_ref` is the key or a shell expression for it."""
    body = json.dumps({"model": served_model, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 64}, separators=(",", ":"))
    return (f"curl {base_url}/v1/chat/completions -H \"Authorization: Bearer {key_ref}\" "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}")


# --- console ------------------------------------------------------------------------------------


class Display:
    """Engine log lines, a progress bar while warming (plain lines when not on a terminal), and
    the banner once ready. Everything goes to stderr except the banner (stdout)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.err = Console(stderr=True, highlight=False)
        self.out = Console(highlight=False)
        self._progress: Any = None
        self._task: Any = None

    def engine_line(self, line: str) -> None:
        from rich.text import Text

        self.err.print(Text("engine | ", style="dim") + Text(line), soft_wrap=True)

    def note(self, message: str) -> None:
        self.err.print(message, markup=False, soft_wrap=True)

    async def warming(self, state: Any, eta_s: float, ready: asyncio.Event) -> None:
        """Show progress until `ready` is set (or the task is cancelled)."""
        started = time.monotonic()
        if self.err.is_terminal:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            progress = Progress(SpinnerColumn(), TextColumn("[bold]engine {task.fields[phase]}"), BarColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), console=self.err,
                                transient=True)
            with progress:
                task = progress.add_task("engine", total=max(eta_s, 1.0), phase="warming", eta="")
                while not ready.is_set():
                    elapsed = time.monotonic() - started
                    left = state.eta_remaining_s()
                    progress.update(task, completed=min(elapsed, max(eta_s, 1.0) * 0.99), phase=state.phase,
                                    eta=f"~{left:.0f} s left" if left else "")
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(ready.wait(), 0.5)
            return
        while not ready.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ready.wait(), PLAIN_PROGRESS_EVERY_S)
            if not ready.is_set():
                left = state.eta_remaining_s()
                self.note(f"engine {state.phase}: {time.monotonic() - started:.0f} s elapsed"
                          + (f", ~{left:.0f} s left" if left else ""))

    def banner(self, *, launch: Launch, base_url: str, key: str, key_created: bool, data_dir: Path,
               startup_s: float | None) -> None:
        from r1nest.keys import mask

        key_file = data_dir / API_KEY_FILE
        key_ref = f"$(cat {shlex.quote(str(key_file))})"
        lines = [
            "",
            f"r1nest is serving {launch.served_model} ({launch.engine}, {launch.hardware})"
            + (f", ready in {startup_s:.0f} s" if startup_s else ""),
            f"  endpoint   {base_url}/v1   (OpenAI-compatible; reasoning in reasoning_content)",
            f"  overview   {base_url}/overview   (log in with the admin key in {data_dir / 'admin_key'})",
        ]
        if key_created:
            lines.append(f"  API key    {key}   (shown once; also kept in {key_file})")
        else:
            lines.append(f"  API key    {mask(key)}   (in {key_file})")
        lines += ["", "Try it:", "  " + curl_command(base_url, launch.served_model, key_ref), ""]
        self.out.print("\n".join(lines), markup=False, soft_wrap=True)


# --- the run --------------------------------------------------------------------------------


async def serve_async(settings: Any, launch: Launch, display: Display, *, engine_argv: list[str] | None = None) -> int:
    """Gateway + supervised engine until a signal. `engine_argv` replaces the profile's command
    (tests run a fake engine that reads its key from VLLM_API_KEY like vLLM)."""
    from r1nest.accounts import ensure_admin_key
    from r1nest.engines.launcher import EngineSupervisor
    from r1nest.gateway.app import create_app
    from r1nest.gateway.cli import uvicorn_server
    from r1nest.gateway.state import EngineState
    from r1nest.gateway.upstream import UpstreamConfig
    from r1nest.ledger import open_store

    data_dir = Path(settings.data_dir).expanduser()
    admin_key = ensure_admin_key(settings)
    store = open_store(settings)
    try:
        key, created = await ensure_demo_key(store, data_dir, credits=settings.demo_credits, now=time.time())
        state = EngineState()
        engine_port = settings.engine_port if "engine_port" in settings.model_fields_set else None
        supervisor = EngineSupervisor(
            launch.profile, state=state, port=engine_port, data_dir=data_dir, weight_bytes=launch.weight_bytes,
            log_sink=display.engine_line, argv=engine_argv,
        )
        state.set_warming(supervisor.eta_s)
        gateway_settings = settings.model_copy(update={"served_model": launch.served_model})
        app = create_app(
            settings=gateway_settings, store=store, state=state, admin_key=admin_key, probe_upstream=False,
            upstream=UpstreamConfig(url=supervisor.url, api_key=supervisor.api_key, served_model=launch.served_model,
                                    max_model_len=launch.profile.context or None),
        )
        server = uvicorn_server(app, gateway_settings)
        # serve's own signal handling: uvicorn's would re-raise the signal after shutdown and
        # kill this process before the engine is stopped.
        server.capture_signals = contextlib.nullcontext
        loop = asyncio.get_running_loop()

        def on_signal(sig: int) -> None:
            name = signal.Signals(sig).name
            if getattr(server, "draining", False):
                display.note(f"{name} again: stopping now")
            else:
                display.note(f"{name}: refusing new requests, letting {app.state.gateway.open_requests} open "
                             f"request(s) finish (up to {settings.drain_timeout_s:.0f} s), then stopping the engine")
            server.handle_exit(sig, None)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

        base_url = client_base_url(settings)
        state_doc = {
            "pid": os.getpid(), "gateway_url": base_url, "engine_url": supervisor.url,
            "engine_port": supervisor.port, "engine": launch.engine, "served_model": launch.served_model,
            "model": launch.profile.model, "started_at": time.time(), "engine_pid": None,
        }
        write_state(data_dir, state_doc)
        display.note(f"gateway on {settings.host}:{settings.port}; starting {launch.engine} "
                     f"({launch.hardware}), ready in ~{supervisor.eta_s:.0f} s")

        async def announce_when_ready() -> None:
            last_pid = None
            while True:
                await supervisor.ready_event.wait()
                if supervisor.pid != last_pid:
                    if last_pid is None:
                        display.banner(launch=launch, base_url=base_url, key=key, key_created=created,
                                       data_dir=data_dir, startup_s=supervisor.last_startup_s)
                    else:
                        display.note(f"engine ready again after a restart ({supervisor.last_startup_s:.0f} s)")
                    last_pid = supervisor.pid
                    write_state(data_dir, {**state_doc, "engine_pid": last_pid})
                await asyncio.sleep(1.0)

        supervisor_task = loop.create_task(supervisor.run())
        progress_task = loop.create_task(display.warming(state, supervisor.eta_s, supervisor.ready_event))
        announce_task = loop.create_task(announce_when_ready())
        try:
            await server.serve()
        finally:
            for task in (progress_task, announce_task):
                task.cancel()
            display.note("stopping the engine")
            await supervisor.stop()
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(supervisor_task, 30)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            with contextlib.suppress(FileNotFoundError):
                (data_dir / STATE_FILE).unlink()
        if not server.started:
            raise ConfigError(f"the gateway could not start on {settings.host}:{settings.port}")
        display.note("stopped")
        return 0
    finally:
        await store.close()


def run_serve(settings: Any, *, max_model_len: int | None = None) -> int:
    from r1nest.gateway.cli import configure_logging

    configure_logging(settings.log_level)
    data_dir = Path(settings.data_dir).expanduser()
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the data dir {data_dir}: {exc.strerror}") from None
    launch = plan_launch(settings.model, engine=settings.engine, max_model_len=max_model_len,
                         local_gpus=detect_local_gpus())
    check_port_free(settings.host, settings.port)
    display = Display()
    try:
        import uvloop

        return uvloop.run(serve_async(settings, launch, display))
    except ImportError:
        return asyncio.run(serve_async(settings, launch, display))


@click.command()
@click.option("--model", help="Catalog id (r1nest plan lists them) or a checkpoint directory.")
@click.option("--engine", type=click.Choice(["vllm", "sglang"]), help="Inference engine (default vllm).")
@click.option("--host", help="Listen address of the gateway (default 0.0.0.0).")
@click.option("--port", type=int, help="Listen port of the gateway (default 8000).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Ledger, keys and state (default ~/.r1nest).")
@click.option("--max-model-len", type=click.IntRange(min=16), help="Context length the engine is planned for.")
def serve(model: str | None, engine: str | None, host: str | None, port: int | None, data_dir: Path | None,
          max_model_len: int | None) -> None:
    """Run engine + gateway + ledger on this machine.

    \b
    Examples:
      r1nest serve --model deepseek-r1-distill-qwen-7b
      r1nest serve --model .r1nest/models/tiny-deepseek-v3     (vLLM's CPU build, no GPU)
    """
    from r1nest.settings import load_settings

    if model is not None and model.strip() and Path(model).expanduser().is_dir():
        model = str(Path(model).expanduser().resolve())
    settings = load_settings(model=model, engine=engine, host=host, port=port, data_dir=data_dir)
    sys.exit(run_serve(settings, max_model_len=max_model_len))
