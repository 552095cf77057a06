"""The planner's choices and refusals as tables, and its memory math against published figures."""

from __future__ import annotations

import math

import pytest

from r1nest.catalog import MODELS, get_model
from r1nest.engines.matrix import tiny_specs
from r1nest.errors import ConfigError, PlanError
from r1nest.hardware import AWS_INSTANCE_TYPES, GIB, GPUS, MODAL_GPUS
from r1nest.planner import (
    OVERHEAD_DENSE_BYTES,
    OVERHEAD_MOE_BYTES,
    kv_bytes_per_token_per_gpu,
    plan,
    weight_bytes_per_gpu,
)

R1_FAMILY = ("deepseek-r1", "deepseek-r1-0528", "deepseek-r1-zero")

# model -> (AWS choice, Modal choice, tp, dp) for the defaults: vLLM, default context, concurrency 1
DEFAULT_CHOICES = {
    "deepseek-r1": ("p5en.48xlarge", "H200:8", 8, 1),
    "deepseek-r1-0528": ("p5en.48xlarge", "H200:8", 8, 1),
    "deepseek-r1-zero": ("p5en.48xlarge", "H200:8", 8, 1),
    "deepseek-r1-distill-qwen-1.5b": ("g6.xlarge", "L4", 1, 1),
    "deepseek-r1-distill-qwen-7b": ("g6.xlarge", "L4", 1, 1),
    "deepseek-r1-distill-llama-8b": ("g6e.xlarge", "L4:2", 1, 1),
    "deepseek-r1-distill-qwen-14b": ("g6e.xlarge", "L4:2", 1, 1),
    "deepseek-r1-distill-qwen-32b": ("g6.12xlarge", "A100-80GB", 4, 1),
    "deepseek-r1-distill-llama-70b": ("g6e.12xlarge", "B200", 4, 1),
}


def test_every_catalog_model_has_a_row() -> None:
    assert set(DEFAULT_CHOICES) == set(MODELS)


@pytest.mark.parametrize("model_id", sorted(DEFAULT_CHOICES))
def test_default_choice_on_aws(model_id: str) -> None:
    instance, _, tp, dp = DEFAULT_CHOICES[model_id]
    p = plan(model_id, "aws")
    assert (p.instance_type, p.nodes, p.tp, p.dp) == (instance, 1, tp, dp)
    assert p.modal_gpu is None and p.max_concurrency >= 1
    assert p.kv_capacity_tokens >= p.context
    assert p.cost_microusd_per_hour == AWS_INSTANCE_TYPES[instance].price_microusd_per_hour
    assert p.root_volume_gib * GIB > get_model(model_id).weight_bytes
    assert p.profile.served_model_name == model_id


@pytest.mark.parametrize("model_id", sorted(DEFAULT_CHOICES))
def test_default_choice_on_modal(model_id: str) -> None:
    _, gpu_string, _, _ = DEFAULT_CHOICES[model_id]
    p = plan(model_id, "modal")
    assert p.modal_gpu == gpu_string and p.instance_type is None and p.nodes == 1
    name, _, count = gpu_string.partition(":")
    assert p.cost_microusd_per_hour == MODAL_GPUS[name].price_microusd_per_gpu_hour * int(count or 1)


@pytest.mark.parametrize("model_id", R1_FAMILY)
def test_r1_latency_profile(model_id: str) -> None:
    p = plan(model_id, "aws")
    args = p.profile.args
    assert p.mode == "latency" and p.ep == 8 and p.kv_cache_dtype == "fp8"
    assert "--enable-expert-parallel" in args and "--speculative-config" in args
    assert args[args.index("--attention-backend") + 1] == "FLASHMLA"
    assert p.profile.env["VLLM_USE_DEEP_GEMM"] == "1"
    assert p.kv_bytes_per_token == 35_136


# (model, cloud, concurrency) -> (hardware, nodes, mode)
CONCURRENCY_CHOICES = [
    ("deepseek-r1", "aws", 20, "p5en.48xlarge", 1, "throughput"),
    ("deepseek-r1", "aws", 100, "p6-b200.48xlarge", 1, "throughput"),
    ("deepseek-r1", "aws", 400, "p5en.48xlarge", 2, "throughput"),
    ("deepseek-r1", "modal", 100, "B200:8", 1, "throughput"),
    ("deepseek-r1-distill-qwen-7b", "aws", 4, "g6e.xlarge", 1, "latency"),
    ("deepseek-r1-distill-qwen-7b", "aws", 16, "g6.12xlarge", 1, "latency"),
]


@pytest.mark.parametrize("model_id,cloud,concurrency,hardware,nodes,mode", CONCURRENCY_CHOICES)
def test_concurrency_drives_the_choice(model_id: str, cloud: str, concurrency: int, hardware: str,
                                       nodes: int, mode: str) -> None:
    p = plan(model_id, cloud, concurrency=concurrency)  # type: ignore[arg-type]
    assert (p.instance_type or p.modal_gpu, p.nodes, p.mode) == (hardware, nodes, mode)
    assert p.max_concurrency >= concurrency


def test_the_cheapest_feasible_option_wins() -> None:
    """No on-demand AWS option that also serves the load is cheaper than the choice."""
    for model_id in MODELS:
        chosen = plan(model_id, "aws")
        for name, t in AWS_INSTANCE_TYPES.items():
            if not t.on_demand or t.price_microusd_per_hour >= chosen.cost_microusd_per_hour:
                continue
            with pytest.raises(PlanError):
                plan(model_id, "aws", instance_type=name, nodes=1)


# --- memory math against published figures ----------------------------------------------------


@pytest.mark.parametrize("instance", ["p5e.48xlarge", "p5en.48xlarge", "p6-b200.48xlarge"])
def test_r1_fp8_fits_one_node_of_h200_or_b200(instance: str) -> None:
    p = plan("deepseek-r1", "aws", instance_type=instance, nodes=1)
    assert p.nodes == 1 and p.gpus_per_node == 8


def test_r1_fp8_does_not_fit_one_node_of_h100() -> None:
    with pytest.raises(PlanError) as info:
        plan("deepseek-r1", "aws", instance_type="p5.48xlarge", nodes=1)
    err = info.value
    assert "0.69 TB" in err.reason and "H100" in err.reason
    joined = " ".join(err.alternatives)
    assert "p5en.48xlarge" in joined and "p6-b200.48xlarge" in joined and "2 x p5.48xlarge" in joined
    # ... but two nodes of it do
    two = plan("deepseek-r1", "aws", instance_type="p5.48xlarge", nodes=2)
    assert (two.tp, two.pp, two.nodes) == (8, 2, 2) and two.profile.multinode == "tp_pp"


def test_r1_weights_alone_exceed_eight_h100s() -> None:
    spec = get_model("deepseek-r1")
    assert spec.weight_bytes > 8 * GPUS["H100"].memory_bytes
    assert spec.weight_bytes < 8 * GPUS["H200"].memory_bytes * 0.9
    assert spec.weight_bytes < 8 * GPUS["B200"].memory_bytes * 0.9


def test_r1_on_modal_h100_is_refused_with_h200_and_b200() -> None:
    with pytest.raises(PlanError) as info:
        plan("deepseek-r1", "modal", instance_type="H100:8")
    joined = " ".join(info.value.alternatives)
    assert "H200:8" in joined and "B200:8" in joined


@pytest.mark.parametrize("instance", ["p4d.24xlarge", "p4de.24xlarge"])
def test_r1_on_a100_is_refused_for_lack_of_fp8(instance: str) -> None:
    with pytest.raises(PlanError, match="compute capability 8.0"):
        plan("deepseek-r1", "aws", instance_type=instance)


def test_r1_on_l40s_is_refused() -> None:
    with pytest.raises(PlanError, match="Hopper or newer"):
        plan("deepseek-r1", "aws", instance_type="g6e.48xlarge", nodes=2)


@pytest.mark.parametrize("model_id", ["deepseek-r1-distill-qwen-1.5b", "deepseek-r1-distill-qwen-7b"])
@pytest.mark.parametrize("instance", ["g5.xlarge", "g6.xlarge", "g6e.xlarge"])  # 24, 24, 48 GB
def test_small_distills_fit_one_24_or_48_gb_gpu(model_id: str, instance: str) -> None:
    p = plan(model_id, "aws", instance_type=instance)
    assert p.gpus_per_node == 1 and p.tp == 1 and p.max_concurrency >= 1


def test_kv_capacity_math_r1_on_8xh200() -> None:
    spec = get_model("deepseek-r1")
    p = plan("deepseek-r1", "aws", instance_type="p5en.48xlarge", mode="latency")
    weights = spec.weight_bytes / 8  # TP8 + EP8: every weight split eight ways
    free = int(GPUS["H200"].memory_bytes * 0.9) - math.ceil(weights) - OVERHEAD_MOE_BYTES
    assert p.kv_capacity_tokens == free // 35_136  # the MLA latent is replicated across TP ranks
    assert p.max_concurrency == p.kv_capacity_tokens // p.context
    dp = plan("deepseek-r1", "aws", instance_type="p5en.48xlarge", mode="throughput")
    assert dp.dp == 8 and dp.kv_capacity_tokens > p.kv_capacity_tokens  # each DP rank: own sequences


def test_kv_per_gpu_splits_gqa_heads_but_not_the_mla_latent() -> None:
    r1, qwen7 = get_model("deepseek-r1"), get_model("deepseek-r1-distill-qwen-7b")
    assert kv_bytes_per_token_per_gpu(r1, "fp8", tp=8, pp=1) == 35_136
    assert kv_bytes_per_token_per_gpu(r1, "fp8", tp=8, pp=2) == 17_568
    assert kv_bytes_per_token_per_gpu(qwen7, "bf16", tp=2, pp=1) == 57_344 // 2
    assert kv_bytes_per_token_per_gpu(qwen7, "bf16", tp=8, pp=1) == 57_344 // 4  # 4 KV heads
    assert weight_bytes_per_gpu(qwen7, tp=2, pp=1, dp=1) == qwen7.weight_bytes // 2


def test_distill_capacity_math() -> None:
    spec = get_model("deepseek-r1-distill-qwen-7b")
    p = plan(spec.id, "aws", instance_type="g6e.xlarge")
    free = int(GPUS["L40S"].memory_bytes * 0.9) - spec.weight_bytes - OVERHEAD_DENSE_BYTES
    assert p.kv_capacity_tokens == free // 57_344


# --- refusals and bad input ---------------------------------------------------------------------


def test_a_context_beyond_the_native_one_is_refused() -> None:
    with pytest.raises(PlanError, match="native context"):
        plan("deepseek-r1-distill-qwen-7b", "aws", context=200_000)


def test_unreachable_concurrency_suggests_replicas() -> None:
    with pytest.raises(PlanError) as info:
        plan("deepseek-r1", "aws", concurrency=10_000)
    assert "replicas" in " ".join(info.value.alternatives)


def test_multi_node_dense_and_modal_multi_node_are_refused() -> None:
    with pytest.raises(PlanError):
        plan("deepseek-r1-distill-qwen-7b", "aws", nodes=2)
    with pytest.raises(PlanError):
        plan("deepseek-r1", "modal", nodes=2)


@pytest.mark.parametrize(
    "kwargs",
    [dict(cloud="gcp"), dict(engine="tgi"), dict(concurrency=0), dict(nodes=3),
     dict(instance_type="p9.huge"), dict(hardware_class="tpu")],
)
def test_bad_arguments_are_config_errors(kwargs: dict) -> None:
    args = {"cloud": "aws", **kwargs}
    cloud = args.pop("cloud")
    with pytest.raises(ConfigError):
        plan("deepseek-r1", cloud, **args)


# --- local: CPU and this box's GPUs --------------------------------------------------------------


@pytest.mark.parametrize("spec", tiny_specs(), ids=lambda s: s.id)
def test_tiny_models_get_the_cpu_profile(spec) -> None:  # type: ignore[no-untyped-def]
    p = plan(spec, "local", hardware_class="cpu")
    assert p.hardware_class == "cpu" and p.gpu is None and p.cost_microusd_per_hour == 0
    assert p.engine == "vllm" and p.profile.env["VLLM_CPU_KVCACHE_SPACE"]
    assert "--gpu-memory-utilization" not in p.profile.args
    assert p.profile.args[p.profile.args.index("--max-model-len") + 1] == str(p.context)
    assert p.context <= spec.native_context


def test_r1_is_refused_on_cpu_and_sglang_on_cpu() -> None:
    with pytest.raises(PlanError):
        plan("deepseek-r1", "local", hardware_class="cpu")
    with pytest.raises(PlanError):
        plan(tiny_specs()[0], "local", hardware_class="cpu", engine="sglang")


def test_local_gpus() -> None:
    p = plan("deepseek-r1", "local", gpu="H200", gpu_count=8)
    assert p.gpus_per_node == 8 and p.cost_microusd_per_hour == 0
    mi = plan("deepseek-r1", "local", local_gpus="MI300X:8")
    assert "ROCM_AITER_MLA" in mi.profile.args and mi.profile.env["VLLM_ROCM_USE_AITER"] == "1"
    with pytest.raises(PlanError):
        plan("deepseek-r1", "local", gpu="H100", gpu_count=8)


def test_plan_json_is_complete() -> None:
    data = plan("deepseek-r1", "aws", instance_type="p5.48xlarge", nodes=2).to_json()
    for key in ("instance_type", "modal_gpu", "nodes", "parallelism", "kv_capacity_tokens",
                "max_concurrency", "cost_usd_per_hour", "root_volume_gib", "engine_argv"):
        assert key in data
    # experts are sharded over the 8 GPUs of each pipeline stage
    assert data["parallelism"] == {"tp": 8, "pp": 2, "dp": 1, "ep": 8}
    assert isinstance(data["cost_microusd_per_hour"], int)


@pytest.mark.parametrize(
    "hardware_class,instance",
    [("blackwell", "p6-b200.48xlarge"), ("hopper", "p5en.48xlarge")],
)
def test_hardware_class_restricts_the_choice(hardware_class: str, instance: str) -> None:
    p = plan("deepseek-r1", "aws", hardware_class=hardware_class)  # type: ignore[arg-type]
    assert p.instance_type == instance and p.hardware_class == hardware_class
    if hardware_class == "blackwell":
        args = p.profile.args
        assert args[args.index("--attention-backend") + 1] == "FLASHINFER_MLA"


def test_r1_refused_on_ampere_class() -> None:
    with pytest.raises(PlanError):
        plan("deepseek-r1", "aws", hardware_class="ampere")
