"""Launch properties every launcher relies on: no secret in argv, per-node arguments, key files."""

from __future__ import annotations

import json
import sys

import pytest

from r1nest.engines import engine_argv, engine_env, engine_secret_files, health_path
from r1nest.engines.matrix import profile_matrix
from r1nest.errors import ConfigError
from r1nest.planner import plan

KEY = "r1n-engine-secret-value"


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_the_api_key_is_never_in_argv(engine: str) -> None:
    for _, profile in profile_matrix(engine):  # type: ignore[arg-type]
        env = engine_env(profile, api_key=KEY)
        files = engine_secret_files(profile, api_key=KEY)
        assert (env.get("VLLM_API_KEY") == KEY) or any(KEY in text for text in files.values())
        for rank in range(profile.nodes):
            argv = engine_argv(profile, host="127.0.0.1", port=8100, node_rank=rank,
                               head_address="10.0.0.9" if profile.nodes > 1 else None,
                               secrets_dir="/run/r1nest")
            assert KEY not in " ".join(argv)
            assert "--api-key" not in argv
            assert argv[0] == sys.executable


def test_vllm_key_goes_in_the_environment_and_sglang_key_in_a_file() -> None:
    vllm_profile = plan("deepseek-r1", "aws").profile
    assert engine_env(vllm_profile, api_key=KEY)["VLLM_API_KEY"] == KEY
    assert engine_secret_files(vllm_profile, api_key=KEY) == {}
    sglang_profile = plan("deepseek-r1", "aws", engine="sglang").profile
    assert KEY not in json.dumps(engine_env(sglang_profile, api_key=KEY))
    (name, text), = engine_secret_files(sglang_profile, api_key=KEY).items()
    assert name == "sglang-secrets.yaml" and text == f'api-key: "{KEY}"\n'


@pytest.mark.parametrize("bad", ["", "a\nb", "a\rb"])
def test_bad_engine_keys_are_refused(bad: str) -> None:
    profile = plan("deepseek-r1", "aws").profile
    with pytest.raises(ConfigError):
        engine_env(profile, api_key=bad)


def test_vllm_multi_node_ranks() -> None:
    tp_pp = plan("deepseek-r1", "aws", instance_type="p5.48xlarge", nodes=2, mode="latency").profile
    head = engine_argv(tp_pp, host="0.0.0.0", port=8100, node_rank=0, head_address="10.0.0.9")
    worker = engine_argv(tp_pp, host="0.0.0.0", port=8100, node_rank=1, head_address="10.0.0.9")
    assert "--headless" not in head and "--headless" in worker
    assert worker[worker.index("--node-rank") + 1] == "1"
    assert worker[worker.index("--master-addr") + 1] == "10.0.0.9"

    dp_ep = plan("deepseek-r1", "aws", instance_type="p5.48xlarge", nodes=2, mode="throughput").profile
    worker = engine_argv(dp_ep, host="0.0.0.0", port=8100, node_rank=1, head_address="10.0.0.9")
    assert worker[worker.index("--data-parallel-size") + 1] == "16"
    assert worker[worker.index("--data-parallel-size-local") + 1] == "8"
    assert worker[worker.index("--data-parallel-start-rank") + 1] == "8"
    assert "--headless" in worker


def test_sglang_multi_node_ranks() -> None:
    profile = plan("deepseek-r1", "aws", engine="sglang", instance_type="p5.48xlarge", nodes=2).profile
    argv = engine_argv(profile, host="0.0.0.0", port=8100, node_rank=1, head_address="10.0.0.9",
                       secrets_dir="/run/r1nest")
    assert argv[argv.index("--tp-size") + 1] == "16"
    assert argv[argv.index("--dist-init-addr") + 1] == "10.0.0.9:5000"
    assert argv[argv.index("--node-rank") + 1] == "1"


def test_multi_node_needs_the_head_address_and_a_valid_rank() -> None:
    profile = plan("deepseek-r1", "aws", instance_type="p5.48xlarge", nodes=2).profile
    with pytest.raises(ConfigError):
        engine_argv(profile, host="0.0.0.0", port=8100, node_rank=1)
    with pytest.raises(ConfigError):
        engine_argv(profile, host="0.0.0.0", port=8100, node_rank=2, head_address="10.0.0.9")
    with pytest.raises(ConfigError):
        engine_argv(profile, host="0.0.0.0", port=0)


def test_health_path() -> None:
    assert health_path(plan("deepseek-r1", "aws").profile) == "/health"
