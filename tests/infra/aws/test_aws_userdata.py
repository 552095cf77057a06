"""The cloud-init document and the boot-time key registration, without Pulumi."""

from __future__ import annotations

import io
import shlex
import subprocess
from dataclasses import replace

import pytest
import yaml

from r1nest.cloud.bootstrap import read_key, register_key
from r1nest.cloud.userdata import (
    ENGINE_KEY_SENTINEL,
    NodeBoot,
    UserDataError,
    find_secrets,
    render_user_data,
    systemd_command,
)
from r1nest.errors import ConfigError, StoreError
from r1nest.keys import ADMIN_PREFIX, hash_key, new_key
from r1nest.ledger.memory import MemoryStore

HEAD = NodeBoot(
    deployment="r1nest-dev", region="us-east-1", image="ghcr.io/example/r1nest:vllm", node_rank=0, nodes=2,
    served_model="deepseek-r1",
    engine_argv=("python3", "-m", "vllm.entrypoints.cli.main", "serve", "deepseek-ai/DeepSeek-R1",
                 "--host", "127.0.0.1", "--port", "8100",
                 "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 1}'),
    engine_env=(("VLLM_API_KEY", ENGINE_KEY_SENTINEL), ("VLLM_USE_DEEP_GEMM", "1")),
    doctor_argv=("r1nest", "doctor", "--model", "deepseek-r1"),
    api_key_parameter="/r1nest/dev/api-key", admin_key_parameter="/r1nest/dev/admin-key",
    gateway_port=8000, engine_port=8100, public_url="http://198.51.100.7:8000/v1",
    internal_url="http://10.42.0.11:8000/v1", initial_credits=1_000_000,
)
WORKER = replace(HEAD, node_rank=1)


def files(text: str) -> dict[str, dict]:
    return {f["path"]: f for f in yaml.safe_load(text)["write_files"]}


def test_head_gets_engine_and_gateway_worker_only_the_engine():
    head, worker = files(render_user_data(HEAD)), files(render_user_data(WORKER))
    assert "/etc/systemd/system/r1nest-gateway.service" in head
    assert "/etc/systemd/system/r1nest-gateway.service" not in worker
    assert "/etc/systemd/system/r1nest-engine.service" in worker
    for tree in (head, worker):
        assert tree["/usr/local/sbin/r1nest-secrets"]["permissions"] == "0700"
    assert "R1NEST_PUBLIC_URL=http://198.51.100.7:8000/v1" in head["/etc/r1nest/gateway.env"]["content"]
    # the engine key is drawn on the box; the engine env file names only what is not secret
    assert head["/etc/r1nest/engine.env"]["content"] == "VLLM_USE_DEEP_GEMM=1\n"
    assert 'VLLM_API_KEY "$ENGINE_KEY"' in head["/usr/local/sbin/r1nest-secrets"]["content"]
    runcmd = yaml.safe_load(render_user_data(HEAD))["runcmd"]
    assert ["systemctl", "enable", "--now", "--no-block", "r1nest-gateway.service"] in runcmd


def test_units_run_the_doctor_before_the_engine_and_register_the_key_before_the_gateway():
    tree = files(render_user_data(HEAD))
    engine = tree["/etc/systemd/system/r1nest-engine.service"]["content"].splitlines()
    pre = [line for line in engine if line.startswith("ExecStartPre=")]
    assert pre[1] == "ExecStartPre=/usr/local/sbin/r1nest-secrets"
    assert "doctor --model deepseek-r1" in pre[-1]
    gateway = tree["/etc/systemd/system/r1nest-gateway.service"]["content"]
    assert "ExecStartPre=/usr/local/sbin/r1nest-register-key" in gateway
    assert "Requires=docker.service r1nest-engine.service" in gateway
    register = tree["/usr/local/sbin/r1nest-register-key"]["content"]
    assert register.rstrip().endswith("< /etc/r1nest/secrets/api_key")  # the key travels on stdin


@pytest.mark.parametrize("arg", ['{"method": "mtp", "n": 1}', "100%", "$HOME", 'a"b', "back\\slash", "plain", ""])
def test_systemd_quoting_round_trips(arg):
    from r1nest_aws.policies import exec_argv

    line = "ExecStart=" + systemd_command(["/usr/bin/docker", "run", arg])
    assert exec_argv(line) == ["/usr/bin/docker", "run", arg]
    assert "%" not in line.replace("%%", "") and "$" not in line.replace("$$", "")


def test_the_secrets_script_is_valid_bash():
    script = files(render_user_data(HEAD))["/usr/local/sbin/r1nest-secrets"]["content"]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True, timeout=10)
    for quoted in (shlex.quote(HEAD.api_key_parameter), shlex.quote(HEAD.admin_key_parameter)):
        assert f"fetch {quoted}" in script


def test_sglang_key_file_is_written_at_boot_from_a_template():
    boot = replace(HEAD, engine_env=(), engine_secret_files=(("sglang-secrets.yaml", f'api-key: "{ENGINE_KEY_SENTINEL}"\n'),))
    tree = files(render_user_data(boot))
    script = tree["/usr/local/sbin/r1nest-secrets"]["content"]
    assert 'FILES="$ROOT"/etc/r1nest/secrets/engine-files' in script and '> "$FILES/sglang-secrets.yaml"' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True, timeout=10)
    assert "/etc/r1nest/secrets/engine-files:/run/r1nest-secrets:ro" in tree["/etc/systemd/system/r1nest-engine.service"]["content"]


@pytest.mark.parametrize("field, value", [
    ("image", "ghcr.io/example/r1nest:vllm --env R1NEST_ADMIN_KEY=" + "r1nadmin-0123456789ab-" + "x" * 43),
    ("engine_env", (("HF_TOKEN", "hf_" + "a" * 34),)),
    ("engine_argv", ("python3", "-m", "vllm", "--api-key", "sk-" + "b" * 40)),
    ("public_url", "http://AKIAABCDEFGHIJKLMNOP@198.51.100.7:8000/v1"),
])
def test_rendering_refuses_anything_secret(field, value):
    with pytest.raises(UserDataError, match="secret"):
        render_user_data(replace(HEAD, **{field: value}))


def test_rendering_refuses_user_data_over_the_ec2_limit():
    with pytest.raises(UserDataError, match="bytes"):
        render_user_data(replace(HEAD, engine_argv=HEAD.engine_argv + ("--x",) * 5000))


@pytest.mark.parametrize("text, kind", [
    ("KEY=" + new_key()[1], "r1nest key"),
    ("admin " + new_key(ADMIN_PREFIX)[1], "r1nest key"),
    ("aws_access_key_id=AKIAIOSFODNN7EXAMPLE", "AWS access key id"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
    ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345", "bearer token"),
    ("password: Zq9Zq9Zq9Zq9Zq9Zq9Zq9Zq9Zq9Zq9", "literal key assignment"),
])
def test_secret_patterns(text, kind):
    assert kind in find_secrets(text)


def test_the_rendered_document_itself_is_clean():
    assert find_secrets(render_user_data(HEAD)) == [] and find_secrets(render_user_data(WORKER)) == []


# -- registering the generated key at boot -------------------------------------------------------

async def test_register_key_creates_once_and_is_idempotent():
    store = MemoryStore()
    _, plaintext = new_key()
    assert await register_key(store, plaintext, name="default", credits=500, now=1000.0) is True
    assert await register_key(store, plaintext, name="default", credits=500, now=2000.0) is False
    (record,) = await store.list_keys()
    assert record.key_hash == hash_key(plaintext) and record.remaining_credits == 500  # granted once


async def test_register_key_refuses_a_different_secret_under_the_same_id():
    store = MemoryStore()
    _, plaintext = new_key()
    await register_key(store, plaintext, name="default", credits=1, now=0.0)
    impostor = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    with pytest.raises(StoreError, match="another secret"):
        await register_key(store, impostor, name="default", credits=1, now=0.0)


@pytest.mark.parametrize("text", ["", "not-a-key", new_key(ADMIN_PREFIX)[1], new_key()[1] + "x" * 300])
def test_read_key_accepts_only_an_api_key(text):
    with pytest.raises(ConfigError):
        read_key(io.StringIO(text))
    _, good = new_key()
    assert read_key(io.StringIO(good + "\n")) == good


def test_bootstrap_command_registers_the_key_in_the_sqlite_ledger_once(tmp_path):
    import asyncio
    import os
    import sys

    from r1nest.ledger.sqlite import SqliteStore

    _, plaintext = new_key()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("R1NEST_")}
    env["R1NEST_DATA_DIR"] = str(tmp_path)
    outputs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "r1nest.cloud.bootstrap", "--credits", "777"], input=plaintext + "\n",
                              text=True, capture_output=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        assert plaintext not in done.stdout + done.stderr  # never echoed
        outputs.append(done.stdout.strip())
    assert outputs == ["registered the deployment's API key", "the deployment's API key is already registered"]

    async def read() -> list:
        store = SqliteStore(tmp_path / "ledger.sqlite3")
        try:
            return await store.list_keys()
        finally:
            await store.close()

    (record,) = asyncio.run(read())
    assert record.key_hash == hash_key(plaintext) and record.remaining_credits == 777
    # kept for the gateway's overview page, readable by the service's user only
    key_file = tmp_path / "api_key"
    assert key_file.read_text().strip() == plaintext
    assert key_file.stat().st_mode & 0o777 == 0o600

    bad = subprocess.run([sys.executable, "-m", "r1nest.cloud.bootstrap", "--credits", "1"], input="nope",
                         text=True, capture_output=True, env=env, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
