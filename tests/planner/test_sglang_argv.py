"""Every SGLang command line r1nest can produce is accepted by SGLang's own `prepare_server_args`.

SGLang 0.5.23's ServerArgs parser imports without a GPU (scripts/setup-env installs the package
with --no-deps plus the few modules the parser needs). Flags are also checked to be spelled
exactly as SGLang defines them (argparse accepts prefixes) and not to be deprecated aliases.
The API key travels in the YAML file given with --config and never in argv.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from r1nest.engines import EngineProfile, engine_argv, engine_secret_files
from r1nest.engines.matrix import profile_matrix
from r1nest.errors import ConfigError

pytestmark = pytest.mark.engine

pytest.importorskip("sglang.srt.server_args", reason="SGLang's argument parser is not installed")

PROFILES = list(profile_matrix("sglang"))
API_KEY = "engine-key-0123456789"


@pytest.fixture(scope="module")
def sglang_cli() -> dict[str, Any]:
    from sglang.srt.server_args import ServerArgs, prepare_server_args

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    options = {}
    for action in parser._actions:
        for opt in action.option_strings:
            options[opt] = action
    return {"options": options, "prepare": prepare_server_args}


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("secrets")
    profile = PROFILES[0][1]
    for name, text in engine_secret_files(profile, api_key=API_KEY).items():
        path = directory / name
        path.write_text(text)
        path.chmod(0o600)
    return directory


def check_argv(cli: dict[str, Any], argv: list[str]) -> Any:
    assert argv[:3] == [sys.executable, "-m", "sglang.launch_server"], argv[:3]
    rest = argv[3:]
    for token in rest:
        if token.startswith("--"):
            action = cli["options"].get(token)
            assert action is not None, f"SGLang has no flag spelled {token!r}"
            assert "Deprecated" not in type(action).__name__, f"{token} is deprecated in SGLang"
    return cli["prepare"](rest)


@pytest.mark.parametrize("label,profile", PROFILES, ids=[label for label, _ in PROFILES])
def test_sglang_accepts_every_profile(
    sglang_cli: dict[str, Any], secrets_dir: Path, label: str, profile: EngineProfile
) -> None:
    from sglang.srt.function_call.function_call_parser import FunctionCallParser

    head = "10.0.0.1" if profile.nodes > 1 else None
    for rank in range(profile.nodes):
        argv = engine_argv(profile, host="127.0.0.1", port=8100, node_rank=rank,
                           head_address=head, secrets_dir=str(secrets_dir))
        assert API_KEY not in " ".join(argv)
        args = check_argv(sglang_cli, argv)
        assert args.api_key == API_KEY  # read from the --config file
        assert args.served_model_name == profile.served_model_name
        assert args.model_path == profile.model
        assert args.tp_size == profile.tp
        assert args.nnodes == profile.nodes and args.node_rank == rank
        if args.tool_call_parser:
            assert args.tool_call_parser in FunctionCallParser.ToolCallParserEnum
        if args.chat_template:
            assert os.path.isfile(args.chat_template)
        if profile.dp > 1:
            assert args.attn_dp_size == profile.dp
        assert args.enable_cache_report  # cached prompt tokens in every usage (cache-hit pricing)
        assert not args.disable_radix_cache


def test_sglang_profiles_cover_the_hard_cases() -> None:
    flags = [set(p.args) for _, p in PROFILES]
    assert any("--attn-dp-size" in f and "--ep-size" in f for f in flags)
    assert any("--speculative-algorithm" in f for f in flags)
    assert any("--moe-a2a-backend" in f for f in flags)
    assert any("--tool-call-parser" in f for f in flags)
    assert any(p.multinode == "nnodes" for _, p in PROFILES)


@pytest.mark.parametrize(
    "bad",
    [["--tp", "8"], ["--enable-dp-attention"], ["--kv-cache-dtype", "fp8"], ["--reasoning-parser", "deepseek_r1"],
     ["--no-such-flag"]],
    ids=["prefix", "deprecated", "vllm-kv-spelling", "vllm-parser-spelling", "unknown"],
)
def test_a_planted_bad_flag_fails(sglang_cli: dict[str, Any], secrets_dir: Path, bad: list[str]) -> None:
    _, profile = PROFILES[0]
    argv = engine_argv(profile, host="127.0.0.1", port=8100, secrets_dir=str(secrets_dir)) + bad
    with pytest.raises((AssertionError, SystemExit)):
        check_argv(sglang_cli, argv)


def test_sglang_without_a_secrets_file_is_refused() -> None:
    _, profile = PROFILES[0]
    with pytest.raises(ConfigError):
        engine_argv(profile, host="127.0.0.1", port=8100)


def test_revision_and_hopper_attention_survive_sglangs_own_resolution(
    sglang_cli: dict[str, Any], secrets_dir: Path
) -> None:
    """What prepare_server_args keeps: the pinned --revision, and fa3 (not FlashMLA) for MLA on Hopper."""
    seen_hopper = 0
    for label, profile in PROFILES:
        argv = engine_argv(profile, host="127.0.0.1", port=8100, node_rank=0,
                           head_address="10.0.0.1" if profile.nodes > 1 else None, secrets_dir=str(secrets_dir))
        args = check_argv(sglang_cli, argv)
        assert args.revision == profile.revision, label
        if profile.hardware_class == "hopper" and "deepseek-r1" in label and "distill" not in label:
            seen_hopper += 1
            assert args.attention_backend == "fa3", label
            if profile.kv_cache_dtype == "fp8":
                assert args.kv_cache_dtype == "fp8_e4m3", label  # the FP8 KV FA3 takes
    assert seen_hopper > 10


def test_multinode_dp_attention_uses_deepep_only_on_infiniband() -> None:
    for label, profile in PROFILES:
        if profile.nodes > 1 and profile.dp > 1 and profile.ep > 1:
            expected = "deepep" if profile.fabric == "infiniband" else "none"
            assert profile.flag_value("--moe-a2a-backend") == expected, label
