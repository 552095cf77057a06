"""Every engine launch r1nest can produce, for checking them against the engines' own parsers.

The matrix covers the planner's choices (each catalog model on each cloud, in each mode and node
count it accepts) plus every layout the profile builders accept directly (each model family on
each hardware class, single and multi node, FP8 and BF16 KV cache, EFA and InfiniBand between
nodes), and the CPU profile of the tiny local models.
Images and tests use it; it has no I/O.
"""

from __future__ import annotations

from typing import Iterator

from r1nest.catalog import MODELS, ModelSpec, spec_from_config
from r1nest.engines import EngineName, EngineProfile, build_profile
from r1nest.errors import PlanError

def tiny_specs() -> list[ModelSpec]:
    """Specs of the tiny test models `r1nest dev tiny-model` writes (from their config.json)."""
    from r1nest.tinymodel import model_config

    variants = (("tiny-deepseek-v3", "deepseek_v3", False), ("tiny-deepseek-v3-fp8", "deepseek_v3", True),
                ("tiny-qwen2", "qwen2", False))
    return [
        spec_from_config(model_config(arch, vocab_size=1024, bos_id=0, eos_id=1, fp8=fp8),  # type: ignore[arg-type]
                         model_id=name, location=f"/models/{name}", weight_bytes=16 * 2**20)
        for name, arch, fp8 in variants
    ]


def profile_matrix(engine: EngineName) -> Iterator[tuple[str, EngineProfile]]:
    """(label, profile) for every launch of `engine` that r1nest can produce."""
    from r1nest.planner import MAX_NODES, plan

    for model_id in MODELS:
        for cloud in ("aws", "modal"):
            for mode in (None, "latency", "throughput"):
                moe_on_aws = MODELS[model_id].is_moe and cloud == "aws"
                for nodes in (None, *range(1, MAX_NODES + 1)) if moe_on_aws else (None,):
                    try:
                        p = plan(model_id, cloud, engine=engine, mode=mode, nodes=nodes)
                    except PlanError:
                        continue
                    yield f"plan:{model_id}:{cloud}:{mode}:{nodes}", p.profile

    for spec in MODELS.values():
        if spec.is_moe:
            for hw in ("hopper", "blackwell", "mi300x"):
                for nodes, tp, pp, dp, mode in (
                    (1, 8, 1, 1, "latency"), (1, 1, 1, 8, "throughput"),
                    (2, 8, 2, 1, "latency"), (2, 1, 1, 16, "throughput"),
                ):
                    if engine == "sglang" and pp > 1:
                        tp, pp = tp * pp, 1
                    for kv in ("fp8", "auto"):
                        for fabric in ("efa", "infiniband") if nodes > 1 else ("unknown",):
                            yield (f"layout:{spec.id}:{hw}:n{nodes}tp{tp}pp{pp}dp{dp}:kv-{kv}:{fabric}",
                                   build_profile(engine, spec, hardware_class=hw, nodes=nodes,
                                                 gpus_per_node=8, tp=tp, pp=pp, dp=dp, mode=mode,
                                                 context=spec.default_context, kv_cache_dtype=kv,
                                                 fabric=fabric))
        else:
            for hw in ("ampere", "ada", "hopper", "blackwell"):
                for tp, dp in ((1, 1), (2, 1), (4, 1), (8, 1), (1, 8), (2, 4)):
                    if spec.num_attention_heads % tp:
                        continue
                    yield (f"layout:{spec.id}:{hw}:tp{tp}dp{dp}",
                           build_profile(engine, spec, hardware_class=hw, nodes=1,
                                         gpus_per_node=tp * dp, tp=tp, dp=dp,
                                         mode="latency" if dp == 1 else "throughput",
                                         context=spec.default_context))

    if engine == "vllm":
        for spec in tiny_specs():
            yield (f"cpu:{spec.id}", plan(spec, "local", hardware_class="cpu").profile)
        yield ("cpu:distill-1.5b", build_profile("vllm", MODELS["deepseek-r1-distill-qwen-1.5b"],
                                                  hardware_class="cpu", context=2048))
