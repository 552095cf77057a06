"""`r1nest serve` pieces that run without an engine: planning, demo key, printed commands."""

from __future__ import annotations

import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from r1nest.accounts import ensure_demo_key
from r1nest.console import client_base_url, curl_command
from r1nest.errors import ConfigError, PlanError
from r1nest.files import read_serve_state
from r1nest.files import write_serve_state as write_state
from r1nest.launch import plan_launch
from r1nest.serve import check_port_free
from r1nest.tinymodel import TINY_CONTEXT


def read_state(data_dir: Path) -> dict | None:
    """serve.json as `r1nest overview` reads it; None when there is none."""
    return read_serve_state(data_dir) or None


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r1nest.tinymodel import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("m") / "tiny-v3", arch="deepseek_v3")


def test_a_checkpoint_dir_is_planned_on_vllm_cpu_with_the_r1_parser(tiny_v3: Path) -> None:
    launch = plan_launch(str(tiny_v3), engine="vllm", max_model_len=None, local_gpus=None)
    assert launch.served_model == "tiny-v3" and launch.engine == "vllm" and launch.hardware == "CPU"
    args = list(launch.profile.args)
    assert args[args.index("--reasoning-parser") + 1] == "deepseek_r1"
    assert args[args.index("--max-model-len") + 1] == str(TINY_CONTEXT)  # the checkpoint's own context
    assert launch.weight_bytes == (tiny_v3 / "model.safetensors").stat().st_size
    shorter = plan_launch(str(tiny_v3), engine="vllm", max_model_len=512, local_gpus=None)
    assert "512" in shorter.profile.args


def test_a_catalog_giant_on_a_cpu_box_is_refused_with_reasons() -> None:
    with pytest.raises(PlanError, match="too large for the CPU"):
        plan_launch("deepseek-r1", engine="vllm", max_model_len=None, local_gpus=None)
    with pytest.raises(ConfigError, match="known models"):
        plan_launch("no-such-model", engine="vllm", max_model_len=None, local_gpus=None)


async def test_demo_key_is_created_once_kept_private_and_reused(tmp_path: Path) -> None:
    from r1nest.accounts import authenticate
    from r1nest.ledger.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "ledger.sqlite3")
    try:
        key, created = await ensure_demo_key(store, tmp_path, credits=1234, now=time.time())
        assert created
        path = tmp_path / "api_key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() == key
        record = await authenticate(store, key, now=time.time())
        assert record is not None and record.remaining_credits == 1234
        again, created_again = await ensure_demo_key(store, tmp_path, credits=99, now=time.time())
        assert (again, created_again) == (key, False)
        assert len(await store.list_keys()) == 1
    finally:
        await store.close()
    # a new ledger does not know the old key: a new one replaces it
    fresh = SqliteStore(tmp_path / "other.sqlite3")
    try:
        new_key, created_new = await ensure_demo_key(fresh, tmp_path, credits=5, now=time.time())
        assert created_new and new_key != key and (tmp_path / "api_key").read_text().strip() == new_key
    finally:
        await fresh.close()


def test_printed_curl_command_is_one_valid_shell_command() -> None:
    command = curl_command("http://127.0.0.1:8000", "tiny-v3", "$(cat /d/api_key)")
    words = shlex.split(command)
    assert words[:2] == ["curl", "http://127.0.0.1:8000/v1/chat/completions"]
    body = json.loads(words[words.index("-d") + 1])
    assert body["model"] == "tiny-v3" and body["messages"][0]["role"] == "user"
    assert 'Authorization: Bearer $(cat /d/api_key)' in command


def test_client_url_never_shows_the_wildcard_address() -> None:
    def settings(**kw: object) -> SimpleNamespace:
        return SimpleNamespace(**{"public_url": None, "host": "0.0.0.0", "port": 8000, **kw})

    assert client_base_url(settings()) == "http://127.0.0.1:8000"
    assert client_base_url(settings(host="::1")) == "http://[::1]:8000"
    assert client_base_url(settings(public_url="https://api.example.com/")) == "https://api.example.com"


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)


def test_state_file_round_trip_is_private(tmp_path: Path) -> None:
    write_state(tmp_path, {"engine_port": 1234})
    assert read_state(tmp_path) == {"engine_port": 1234}
    assert stat.S_IMODE((tmp_path / "serve.json").stat().st_mode) == 0o600
    assert read_state(tmp_path / "missing") is None


def test_cli_reports_user_errors_without_a_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("R1NEST_")}
    done = subprocess.run(
        [sys.executable, "-m", "r1nest", "serve", "--model", "deepseek-r1", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 3
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
