"""`r1nest serve`: engine + gateway + ledger on this machine.

    r1nest serve --model deepseek-r1-distill-qwen-7b          a catalog model on this box's GPUs
    r1nest serve --model .r1nest/models/tiny-deepseek-v3      a checkpoint directory (CPU if no GPU)

What happens:
1. the planner picks the engine launch for this box (r1nest.launch: `cloud="local"`; vLLM's CPU
   build when there is no NVIDIA GPU);
2. the data dir gets the SQLite ledger, the admin key and, on the first run, a demo API key with
   `demo_credits` credits (r1nest.accounts; its plaintext in the data dir's ApiKey file, mode
   0600, shown once);
3. the gateway listens at once (503 + Retry-After, `/health` says `warming` with an ETA) while
   the engine starts under the supervisor (r1nest.engines.launcher) on 127.0.0.1 with its own key;
4. when the engine is ready the endpoint, the key and a curl command that works are printed
   (r1nest.console);
5. SIGTERM / Ctrl-C: the gateway stops taking requests, open streams get `drain_timeout_s` to
   finish (then are cut and settled), the engine is stopped, the process exits 0.

The data dir's serve.json (r1nest.files) tells other tools (tests, `r1nest overview`) where things
run; it holds no secret. This module only puts the pieces together.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from r1nest.console import Display, client_base_url
from r1nest.errors import ConfigError
from r1nest.files import remove_serve_state, write_serve_state
from r1nest.launch import Launch, detect_local_gpus, plan_launch
from r1nest.ports import GATEWAY_PORT

if TYPE_CHECKING:
    from r1nest.engines.launcher import EngineSupervisor
    from r1nest.gateway.state import EngineState
    from r1nest.ledger.base import Store
    from r1nest.settings import Settings

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
ENGINE_STOP_WAIT_S = 30.0
ANNOUNCE_POLL_S = 1.0


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror} (another server? try --port)") from None


# --- the pieces of a run --------------------------------------------------------------------


def engine_supervisor(settings: Settings, launch: Launch, display: Display, state: EngineState, data_dir: Path,
                      engine_argv: list[str] | None) -> EngineSupervisor:
    """The engine under supervision: on `engine_port` when the settings name one, else a free port."""
    from r1nest.engines.launcher import EngineSupervisor

    engine_port = settings.engine_port if "engine_port" in settings.model_fields_set else None
    return EngineSupervisor(
        launch.profile, state=state, port=engine_port, data_dir=data_dir, weight_bytes=launch.weight_bytes,
        log_sink=display.engine_line, argv=engine_argv,
    )


def gateway_server(settings: Settings, launch: Launch, store: Store, state: EngineState, admin_key: str,
                   supervisor: EngineSupervisor) -> tuple[Any, Any]:
    """(app, uvicorn server): the gateway in front of the supervised engine; serve handles the signals."""
    from r1nest.gateway.app import create_app
    from r1nest.gateway.cli import uvicorn_server
    from r1nest.gateway.upstream import UpstreamConfig

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
    return app, server


def handle_stop_signals(app: Any, server: Any, display: Display, drain_timeout_s: float) -> None:
    """The first SIGTERM / SIGINT drains the gateway; a second one stops at once."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        name = signal.Signals(sig).name
        if getattr(server, "draining", False):
            display.note(f"{name} again: stopping now")
        else:
            display.note(f"{name}: refusing new requests, letting {app.state.gateway.open_requests} open "
                         f"request(s) finish (up to {drain_timeout_s:.0f} s), then stopping the engine")
        server.handle_exit(sig, None)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)


def serve_state(launch: Launch, supervisor: EngineSupervisor, base_url: str) -> dict[str, Any]:
    """What serve.json says (no secret): where the gateway and the engine run, and what they serve."""
    return {
        "pid": os.getpid(), "gateway_url": base_url, "engine_url": supervisor.url,
        "engine_port": supervisor.port, "engine": launch.engine, "served_model": launch.served_model,
        "model": launch.profile.model, "started_at": time.time(), "engine_pid": None,
    }


async def announce_when_ready(supervisor: EngineSupervisor, display: Display, data_dir: Path,
                              state_doc: dict[str, Any], banner: dict[str, Any]) -> None:
    """The banner when the engine is first ready, a note after each restart; serve.json follows
    the engine's pid."""
    last_pid = None
    while True:
        await supervisor.ready_event.wait()
        if supervisor.pid != last_pid:
            if last_pid is None:
                display.banner(**banner, startup_s=supervisor.last_startup_s)
            else:
                display.note(f"engine ready again after a restart ({supervisor.last_startup_s:.0f} s)")
            last_pid = supervisor.pid
            write_serve_state(data_dir, {**state_doc, "engine_pid": last_pid})
        await asyncio.sleep(ANNOUNCE_POLL_S)


async def stop_engine(supervisor: EngineSupervisor, supervisor_task: asyncio.Task[None], display: Display) -> None:
    display.note("stopping the engine")
    await supervisor.stop()
    with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
        await asyncio.wait_for(supervisor_task, ENGINE_STOP_WAIT_S)


# --- the run --------------------------------------------------------------------------------


async def serve_async(settings: Settings, launch: Launch, display: Display, *,
                      engine_argv: list[str] | None = None) -> int:
    """Gateway + supervised engine until a signal. `engine_argv` replaces the profile's command
    (tests run a fake engine that reads its key from VLLM_API_KEY like vLLM)."""
    from r1nest.accounts import ensure_admin_key, ensure_demo_key
    from r1nest.gateway.state import EngineState
    from r1nest.ledger import open_store

    data_dir = Path(settings.data_dir).expanduser()
    admin_key = ensure_admin_key(settings)
    store = open_store(settings)
    try:
        key, created = await ensure_demo_key(store, data_dir, credits=settings.demo_credits, now=time.time())
        state = EngineState()
        supervisor = engine_supervisor(settings, launch, display, state, data_dir, engine_argv)
        state.set_warming(supervisor.eta_s)
        app, server = gateway_server(settings, launch, store, state, admin_key, supervisor)
        base_url = client_base_url(settings)
        state_doc = serve_state(launch, supervisor, base_url)
        write_serve_state(data_dir, state_doc)
        display.note(f"gateway on {settings.host}:{settings.port}; starting {launch.engine} "
                     f"({launch.hardware}), ready in ~{supervisor.eta_s:.0f} s")
        banner = {"launch": launch, "base_url": base_url, "key": key, "key_created": created, "data_dir": data_dir}
        try:
            await run_until_stopped(app, server, supervisor, display, settings.drain_timeout_s, [
                display.warming(state, supervisor.eta_s, supervisor.ready_event),
                announce_when_ready(supervisor, display, data_dir, state_doc, banner),
            ])
        finally:
            remove_serve_state(data_dir)
        if not server.started:
            raise ConfigError(f"the gateway could not start on {settings.host}:{settings.port}")
        display.note("stopped")
        return 0
    finally:
        await store.close()


async def run_until_stopped(app: Any, server: Any, supervisor: EngineSupervisor, display: Display,
                            drain_timeout_s: float, companions: list[Any]) -> None:
    """The gateway until a stop signal, with the engine's supervisor and `companions` (coroutines
    cancelled when the gateway stops); then the engine is stopped."""
    loop = asyncio.get_running_loop()
    handle_stop_signals(app, server, display, drain_timeout_s)
    supervisor_task = loop.create_task(supervisor.run())
    tasks = [loop.create_task(companion) for companion in companions]
    try:
        await server.serve()
    finally:
        for task in tasks:
            task.cancel()
        await stop_engine(supervisor, supervisor_task, display)
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def run_serve(settings: Settings, *, max_model_len: int | None = None) -> int:
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
@click.option("--port", type=int, help=f"Listen port of the gateway (default {GATEWAY_PORT}).")
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
