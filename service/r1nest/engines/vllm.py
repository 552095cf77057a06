"""vLLM launch profiles for the R1 family (MoE + MLA + FP8) and the dense distills.

Flags are those of the pinned vLLM (0.32; tests parse every profile with its own argument parser).
Sources: vLLM's DeepSeek-V3/R1 recipe (docs.vllm.ai/projects/recipes, "DeepSeek-V3 (R1) Usage
Guide": TP8+EP for latency, DP8+EP for throughput), the expert-parallel deployment guide
(--data-parallel-size-local / --data-parallel-address / --headless on the other nodes), the
reasoning-outputs and tool-calling docs, and vLLM's own attention-backend table:
- FP8 KV cache for MLA needs an MLA backend that supports it: FLASHMLA (SM90/SM100),
  FLASHINFER_MLA or CUTLASS_MLA (SM100 only), ROCM_AITER_MLA (MI300X). FLASH_ATTN_MLA, vLLM's
  first choice on Hopper, has no FP8 KV, so the backend is named explicitly. On Hopper the
  backend is always named (FLASHMLA with an FP8 KV cache, FLASH_ATTN_MLA with BF16): both are
  compiled into the pinned image's wheel for SM90 (images/README.md, "FlashMLA on Hopper"), so
  the choice does not depend on what a later FlashMLA release supports.
- Multi-node DP+EP names its expert all-to-all: allgather_reducescatter (NCCL collectives), which
  runs over EFA through the aws-ofi-nccl plugin; DeepEP's deepep_* kernels need IBGDA.
- Weights: `--revision <commit>` when the catalog pins one (the tokenizer follows the revision).
- DeepGEMM (VLLM_USE_DEEP_GEMM=1, vLLM's default) runs the FP8 block-scaled GEMMs and MoE on
  Hopper and Blackwell. Its JIT warm-up takes minutes on a fresh machine.
- MTP: DeepSeek-V3's one next-token-prediction layer as a speculative drafter,
  --speculative-config {"method": "mtp", "num_speculative_tokens": 1}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from r1nest.catalog import ModelSpec
from r1nest.engines.base import PACKAGED_FILE_PREFIX, EngineProfile, Fabric, Mode, MultiNode
from r1nest.hardware import HardwareClass

MLA_FP8_BACKEND: dict[str, str] = {
    "hopper": "FLASHMLA",
    "blackwell": "FLASHINFER_MLA",
    "mi300x": "ROCM_AITER_MLA",
}
# With a BF16 KV cache: vLLM's FlashAttention-3 MLA (vllm_flash_attn, SM90).
MLA_BF16_BACKEND: dict[str, str] = {"hopper": "FLASH_ATTN_MLA"}
# Multi-node DP+EP all-to-all: NCCL all-gather / reduce-scatter, on every fabric (EFA included).
MULTINODE_ALL2ALL = "allgather_reducescatter"
# R1's reasoning markers, for vLLM's per-request thinking budget (vllm/config/reasoning.py).
REASONING_CONFIG = json.dumps({"reasoning_start_str": "<think>", "reasoning_end_str": "</think>"}, separators=(",", ":"))
MTP_CONFIG = json.dumps({"method": "mtp", "num_speculative_tokens": 1}, separators=(",", ":"))
CPU_KVCACHE_GIB = 1
CPU_MAX_NUM_SEQS = 16
# The supervisor (and a load balancer, in the clouds) probes /health every few seconds; vLLM's
# uvicorn access log would print a line for each, burying what `r1nest serve` printed last.
# vLLM's own filter drops only those; requests to other paths are still logged.
QUIET_ACCESS_LOG_ENDPOINTS = "/health"


@dataclass
class _Flags:
    """The engine's arguments, environment and the plan's notes, collected step by step."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def vllm_profile(
    model: ModelSpec,
    *,
    hardware_class: HardwareClass,
    nodes: int = 1,
    gpus_per_node: int = 1,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    mode: Mode = "latency",
    context: int,
    kv_cache_dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
    speculative: bool | None = None,
    fabric: Fabric = "unknown",
) -> EngineProfile:
    flags = _Flags(["--max-model-len", str(context)])
    if model.engine_revision:
        flags.args += ["--revision", model.engine_revision]
    if hardware_class == "cpu":
        ep, multinode = _cpu_build(flags)
    else:
        ep, multinode = _gpu_layout(flags, model, nodes=nodes, tp=tp, pp=pp, dp=dp,
                                    gpu_memory_utilization=gpu_memory_utilization)
    _attention(flags, model, hardware_class, kv_cache_dtype)
    _kernels(flags, model, hardware_class)
    _speculative_decoding(flags, model, hardware_class, mode, speculative)
    _serving(flags, model)
    return EngineProfile(
        engine="vllm",
        model=model.hf_repo,
        served_model_name=model.id,
        args=tuple(flags.args),
        env=flags.env,
        hardware_class=hardware_class,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tp=tp,
        pp=pp,
        dp=dp,
        ep=ep,
        mode=mode,
        multinode=multinode,
        fabric=fabric,
        revision=model.engine_revision,
        kv_cache_dtype=kv_cache_dtype,
        context=context,
        gpu_memory_utilization=gpu_memory_utilization,
        notes=tuple(flags.notes),
    )


def _cpu_build(flags: _Flags) -> tuple[int, MultiNode]:
    """vLLM's CPU build, one process: (ep, multinode). Its KV cache size comes from
    VLLM_CPU_KVCACHE_SPACE (GiB), not from a GPU memory fraction; bfloat16 runs on AVX-512 / AMX
    and falls back elsewhere."""
    flags.args += ["--dtype", "bfloat16", "--max-num-seqs", str(CPU_MAX_NUM_SEQS)]
    flags.env["VLLM_CPU_KVCACHE_SPACE"] = str(CPU_KVCACHE_GIB)
    flags.notes.append(f"CPU build: {CPU_KVCACHE_GIB} GiB KV cache (VLLM_CPU_KVCACHE_SPACE)")
    return 1, "single"


def _gpu_layout(flags: _Flags, model: ModelSpec, *, nodes: int, tp: int, pp: int, dp: int,
                gpu_memory_utilization: float) -> tuple[int, MultiNode]:
    """Memory fraction, parallelism, expert parallelism and the multi-node scheme: (ep, multinode)."""
    flags.args += ["--gpu-memory-utilization", f"{gpu_memory_utilization:.2f}"]
    for flag, size in (("--tensor-parallel-size", tp), ("--pipeline-parallel-size", pp),
                       ("--data-parallel-size", dp)):
        if size > 1:
            flags.args += [flag, str(size)]
    ep = 1
    if model.is_moe and tp * dp * pp > 1:
        flags.args.append("--enable-expert-parallel")
        ep = tp * dp
        flags.notes.append(f"experts sharded over {ep} GPUs (EP)")
    if nodes == 1:
        return ep, "single"
    if dp > 1:
        if model.is_moe:
            flags.args += ["--all2all-backend", MULTINODE_ALL2ALL]
            flags.notes.append(f"expert all-to-all between nodes: {MULTINODE_ALL2ALL} (NCCL; works over EFA)")
        flags.notes.append("DP+EP across nodes: rank 0 serves the API, the others --headless")
        return ep, "dp_ep"
    flags.args += ["--distributed-executor-backend", "mp"]
    flags.notes.append(f"TP{tp} inside each node x PP{pp} across nodes (multiprocessing backend)")
    return ep, "tp_pp"


def _attention(flags: _Flags, model: ModelSpec, hardware_class: HardwareClass, kv_cache_dtype: str) -> None:
    """The KV cache's dtype and, for MLA, the attention backend that takes it."""
    if model.uses_mla and kv_cache_dtype == "fp8" and hardware_class in MLA_FP8_BACKEND:
        flags.args += ["--kv-cache-dtype", "fp8", "--attention-backend", MLA_FP8_BACKEND[hardware_class]]
        flags.notes.append(f"FP8 MLA KV cache on {MLA_FP8_BACKEND[hardware_class]}")
    elif kv_cache_dtype == "fp8" and hardware_class != "cpu":
        flags.args += ["--kv-cache-dtype", "fp8"]
    elif model.uses_mla and hardware_class in MLA_BF16_BACKEND:
        flags.args += ["--attention-backend", MLA_BF16_BACKEND[hardware_class]]
        flags.notes.append(f"BF16 MLA KV cache on {MLA_BF16_BACKEND[hardware_class]}")


def _kernels(flags: _Flags, model: ModelSpec, hardware_class: HardwareClass) -> None:
    if model.weight_dtype == "fp8" and hardware_class in ("hopper", "blackwell"):
        flags.env["VLLM_USE_DEEP_GEMM"] = "1"
        flags.notes.append("DeepGEMM FP8 kernels (JIT warm-up on first start)")
    if hardware_class == "mi300x":
        flags.env["VLLM_ROCM_USE_AITER"] = "1"


def _speculative_decoding(flags: _Flags, model: ModelSpec, hardware_class: HardwareClass, mode: Mode,
                          speculative: bool | None) -> None:
    """MTP when asked, or by default for latency on Hopper and Blackwell (the model must have it)."""
    use_mtp = speculative if speculative is not None else (
        model.mtp_layers > 0 and mode == "latency" and hardware_class in ("hopper", "blackwell")
    )
    if use_mtp and model.mtp_layers > 0:
        flags.args += ["--speculative-config", MTP_CONFIG]
        flags.notes.append("MTP speculative decoding (1 draft token)")


def _serving(flags: _Flags, model: ModelSpec) -> None:
    """What the gateway relies on: reasoning and tool parsers, cached-token counts, a quiet log."""
    if not model.is_local and not model.engine_revision:
        flags.notes.append("weights unpinned: the engine loads the repository's main branch")
    flags.args += ["--reasoning-parser", model.reasoning_parser_vllm]
    # Prompt-cache hits are priced apart: prefix caching on (vLLM's default on GPUs; its CPU build
    # turns it off for MLA models by itself) and the cached count reported in every usage object.
    # The thinking budget (`thinking_token_budget`) needs R1's reasoning markers.
    flags.args += ["--enable-prefix-caching", "--enable-prompt-tokens-details", "--reasoning-config",
                   REASONING_CONFIG]
    flags.args += ["--disable-access-log-for-endpoints", QUIET_ACCESS_LOG_ENDPOINTS]
    if model.tool_call_parser_vllm:
        flags.args += ["--enable-auto-tool-choice", "--tool-call-parser", model.tool_call_parser_vllm]
        if model.tool_chat_template:
            flags.args += ["--chat-template", PACKAGED_FILE_PREFIX + model.tool_chat_template]
