"""SGLang launch profiles for the R1 family and the distills.

Flags are those of the pinned SGLang (0.5.23; tests parse every profile with its own
`prepare_server_args`). Sources: SGLang's "DeepSeek V3/V3.1/R1 Usage" page (8xH200, 8xB200,
8xMI300X, 2x8xH100 with --tp 16 --nnodes 2 --node-rank --dist-init-addr; DP attention for high
throughput; MTP through the EAGLE speculative path), the large-scale EP guide
(--ep-size, --moe-a2a-backend deepep) and the reasoning / tool parser docs.
- SGLang runs one tensor-parallel group over all GPUs of all nodes (--tp-size = total GPUs);
  DP attention (--attn-dp-size N; older releases: --dp-size N --enable-dp-attention) gives each
  rank its own sequences and attention weights, for throughput.
- FP8 KV cache: --kv-cache-dtype fp8_e4m3.
- MTP: --speculative-algorithm EAGLE with the checkpoint's own NextN layer (no draft model path;
  SGLang gives the draft the target's --revision).
- Attention on Hopper is named: fa3 (sgl-kernel's FlashAttention-3, SGLang's own default for MLA
  on Hopper; it takes an fp8_e4m3 KV cache), so nothing depends on FlashMLA's Hopper kernels.
- Multi-node DP attention: DeepEP (--moe-a2a-backend deepep) only on an InfiniBand fabric; its
  inter-node kernels need IBGDA, which EFA lacks (deepseek-ai/DeepEP#369). Elsewhere (AWS, or a
  fabric not known) the expert all-to-all stays on NCCL collectives (--moe-a2a-backend none).
- Weights: `--revision <commit>` when the catalog pins one.
"""

from __future__ import annotations

from r1nest.catalog import ModelSpec
from r1nest.engines.base import PACKAGED_FILE_PREFIX, EngineProfile, Fabric, Mode
from r1nest.hardware import HardwareClass

MTP_ARGS = (
    "--speculative-algorithm", "EAGLE",
    "--speculative-num-steps", "1",
    "--speculative-eagle-topk", "1",
    "--speculative-num-draft-tokens", "2",
)
# MLA attention, named where the choice matters: FP8 KV on Blackwell, and Hopper, where fa3 keeps
# the FlashMLA kernels out of the picture. ROCm keeps SGLang's default (aiter).
ATTENTION_BACKEND: dict[str, str] = {"hopper": "fa3", "blackwell": "trtllm_mla"}
# Expert all-to-all between nodes: DeepEP needs IBGDA (InfiniBand); "none" is NCCL collectives.
MULTINODE_A2A: dict[str, str] = {"infiniband": "deepep", "efa": "none", "unknown": "none"}


def sglang_profile(
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
    gpu_memory_utilization: float = 0.85,
    speculative: bool | None = None,
    fabric: Fabric = "unknown",
) -> EngineProfile:
    if hardware_class == "cpu":
        raise ValueError("r1nest plans SGLang for GPUs only; use vLLM's CPU build on CPUs")
    world = tp * pp * dp
    args: list[str] = [
        "--context-length", str(context),
        "--mem-fraction-static", f"{gpu_memory_utilization:.2f}",
        "--tp-size", str(world),
    ]
    if model.engine_revision:
        args += ["--revision", model.engine_revision]
    notes: list[str] = []
    ep = _parallelism(args, notes, model, world=world, nodes=nodes, dp=dp, fabric=fabric)
    args += _attention_args(model, hardware_class, kv_cache_dtype)
    _speculative_decoding(args, notes, model, hardware_class, mode, speculative)
    _serving(args, notes, model)
    return EngineProfile(
        engine="sglang",
        model=model.hf_repo,
        served_model_name=model.id,
        args=tuple(args),
        env={},
        hardware_class=hardware_class,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tp=world,
        pp=1,
        dp=dp,
        ep=ep,
        mode=mode,
        multinode="nnodes" if nodes > 1 else "single",
        fabric=fabric,
        revision=model.engine_revision,
        kv_cache_dtype=kv_cache_dtype,
        context=context,
        gpu_memory_utilization=gpu_memory_utilization,
        notes=tuple(notes),
    )


def _parallelism(args: list[str], notes: list[str], model: ModelSpec, *, world: int, nodes: int, dp: int,
                 fabric: Fabric) -> int:
    """DP attention, expert parallelism and the all-to-all between nodes; returns the EP size."""
    if dp > 1:
        # SGLang 0.5.23 spells DP attention --attn-dp-size N (it deprecates the older
        # "--dp-size N --enable-dp-attention", which still works there).
        args += ["--attn-dp-size", str(dp)]
        notes.append(f"DP attention over {dp} ranks (throughput)")
    if not (model.is_moe and world > 1):
        return 1
    args += ["--ep-size", str(world)]
    if nodes > 1 and dp > 1:
        a2a = MULTINODE_A2A[fabric]
        args += ["--moe-a2a-backend", a2a]
        notes.append("DeepEP all-to-all between nodes (InfiniBand, IBGDA)" if a2a == "deepep" else
                     f"expert all-to-all between nodes on NCCL collectives ({fabric} fabric: no DeepEP)")
    notes.append(f"experts sharded over {world} GPUs (EP)")
    return world


def _attention_args(model: ModelSpec, hardware_class: HardwareClass, kv_cache_dtype: str) -> list[str]:
    args = ["--kv-cache-dtype", "fp8_e4m3"] if kv_cache_dtype == "fp8" else []
    if model.uses_mla and hardware_class in ATTENTION_BACKEND:
        args += ["--attention-backend", ATTENTION_BACKEND[hardware_class]]
    return args


def _speculative_decoding(args: list[str], notes: list[str], model: ModelSpec, hardware_class: HardwareClass,
                          mode: Mode, speculative: bool | None) -> None:
    """MTP when asked, or by default for latency on Hopper and Blackwell (the model must have it)."""
    use_mtp = speculative if speculative is not None else (
        model.mtp_layers > 0 and mode == "latency" and hardware_class in ("hopper", "blackwell")
    )
    if use_mtp and model.mtp_layers > 0:
        args += list(MTP_ARGS)
        notes.append("MTP speculative decoding (EAGLE path, 1 step)")


def _serving(args: list[str], notes: list[str], model: ModelSpec) -> None:
    """What the gateway relies on: reasoning and tool parsers, cached-token counts."""
    if not model.is_local and not model.engine_revision:
        notes.append("weights unpinned: the engine loads the repository's main branch")
    args += ["--reasoning-parser", model.reasoning_parser_sglang]
    # prompt-cache hits are priced apart: the radix cache is on by default; this reports the
    # cached count in usage.prompt_tokens_details, as vLLM's --enable-prompt-tokens-details does
    args.append("--enable-cache-report")
    if model.tool_call_parser_sglang:
        args += ["--tool-call-parser", model.tool_call_parser_sglang]
        if model.tool_chat_template:
            args += ["--chat-template", PACKAGED_FILE_PREFIX + model.tool_chat_template]
