"""The planner: (model, cloud, context, concurrency, engine) -> hardware, parallelism, engine launch.

Pure functions over the catalog and the hardware tables. For every hardware option the planner
lays the model out (TP inside a node, PP or DP+EP across nodes), then computes per GPU:

    free = GPU memory x utilization - weights on this GPU - activation/overhead reserve
    tokens per replica = free / KV bytes per token held by this GPU
    max concurrency = replicas x (tokens per replica // context)

MLA keeps one latent per token that every tensor-parallel rank stores in full, so TP does not
divide it (only PP does, by layers); data-parallel attention ranks each hold their own sequences.
GQA splits KV heads across TP ranks. The cheapest option whose max concurrency meets the target
wins; when nothing fits, PlanError says why and what would fit.

Multi-node layouts are planned for the fabric between the nodes: AWS is EFA, so no AWS profile
uses an expert all-to-all that needs InfiniBand GPUDirect Async (r1nest.engines.base.
IBGDA_ONLY_ALL2ALL). MAX_NODES is the one bound on nodes; the AWS stack's configuration reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from r1nest.catalog import ModelSpec, resolve_model
from r1nest.engines import EngineName, EngineProfile, Mode, build_profile
from r1nest.engines.base import FABRICS, Fabric, engine_argv
from r1nest.engines.vllm import CPU_KVCACHE_GIB, CPU_MAX_NUM_SEQS
from r1nest.errors import ConfigError, PlanError
from r1nest.hardware import (
    AWS_INSTANCE_TYPES,
    GIB,
    GPUS,
    HARDWARE_CLASSES,
    MODAL_GPU_COUNTS,
    MODAL_GPUS,
    GpuModel,
    HardwareClass,
    format_usd_per_hour,
    get_instance_type,
    parse_gpu_string,
)
from r1nest.ports import ENGINE_PORT

Cloud = Literal["aws", "modal", "local"]
CLOUDS: tuple[Cloud, ...] = ("aws", "modal", "local")

MAX_CONCURRENCY = 100_000
MAX_NODES = 2  # multi-node only for the R1 family; infra/aws/r1nest_aws/config.py imports it
# The fabric between the nodes of each cloud; "local" takes it from the caller (r1nest doctor
# reads it off the box).
CLOUD_FABRIC: dict[str, Fabric] = {"aws": "efa", "modal": "unknown"}
# Per-GPU memory the engine needs besides weights and KV cache: activations, CUDA graphs,
# NCCL / all-to-all buffers, sampler. Estimates on the safe side of what vLLM reports.
OVERHEAD_DENSE_BYTES = 2 * GIB
OVERHEAD_MOE_BYTES = 8 * GIB
GPU_MEMORY_UTILIZATION = {"vllm": 0.90, "sglang": 0.85}
# Root volume: OS + engine image + weights + margin (GiB)
IMAGE_AND_OS_GIB = 60
WEIGHTS_MARGIN = 1.10
FP8_WEIGHT_CLASSES = ("hopper", "blackwell", "mi300x")


@dataclass(frozen=True)
class Plan:
    model: str
    cloud: Cloud
    engine: EngineName
    instance_type: str | None  # AWS
    modal_gpu: str | None  # Modal GPU string, e.g. "H200:8"
    gpu: str | None  # GPU model name; None on CPU
    gpus_per_node: int
    nodes: int
    tp: int
    pp: int
    dp: int
    ep: int
    mode: Mode
    context: int
    concurrency: int  # the target asked for
    kv_cache_dtype: str
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    max_concurrency: int
    weight_bytes_per_gpu: int
    profile: EngineProfile
    cost_microusd_per_hour: int
    root_volume_gib: int
    hardware_class: HardwareClass
    notes: tuple[str, ...] = field(default_factory=tuple)
    revision: str = ""  # the catalog's weights revision: a commit, "unpinned", "" (local checkpoint)

    @property
    def cost_usd_per_hour(self) -> float:
        return self.cost_microusd_per_hour / 1_000_000

    @property
    def hardware(self) -> str:
        if self.gpu is None:
            return "CPU"
        per_node = f"{self.gpus_per_node}x {self.gpu}"
        where = self.instance_type or self.modal_gpu or "local"
        return f"{self.nodes} x {where} ({per_node})" if self.nodes > 1 else f"{where} ({per_node})"

    def to_json(self) -> dict[str, Any]:
        argv = engine_argv(self.profile, host="127.0.0.1", port=ENGINE_PORT,
                           head_address="HEAD_PRIVATE_IP" if self.nodes > 1 else None,
                           python="python3", secrets_dir="$R1NEST_SECRETS_DIR")
        return {
            "model": self.model,
            "cloud": self.cloud,
            "engine": self.engine,
            "instance_type": self.instance_type,
            "modal_gpu": self.modal_gpu,
            "gpu": self.gpu,
            "gpus_per_node": self.gpus_per_node,
            "nodes": self.nodes,
            "hardware_class": self.hardware_class,
            "parallelism": {"tp": self.tp, "pp": self.pp, "dp": self.dp, "ep": self.ep},
            "mode": self.mode,
            "context": self.context,
            "concurrency": self.concurrency,
            "kv_cache_dtype": self.kv_cache_dtype,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "max_concurrency": self.max_concurrency,
            "weight_bytes_per_gpu": self.weight_bytes_per_gpu,
            "cost_usd_per_hour": round(self.cost_usd_per_hour, 4),
            "cost_microusd_per_hour": self.cost_microusd_per_hour,
            "root_volume_gib": self.root_volume_gib,
            "revision": self.revision,
            "fabric": self.profile.fabric,
            "engine_argv": argv,
            "engine_env": dict(self.profile.env),
            "notes": list(self.notes) + list(self.profile.notes),
        }


# --- hardware options --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    gpu: GpuModel
    gpus_per_node: int
    nodes: int
    price_microusd_per_hour: int  # all nodes
    instance_type: str | None = None
    modal_gpu: str | None = None
    on_demand: bool = True

    @property
    def label(self) -> str:
        base = self.instance_type or self.modal_gpu or f"{self.gpu.name}:{self.gpus_per_node}"
        return f"{self.nodes} x {base}" if self.nodes > 1 else base


def _options(
    cloud: Cloud, model: ModelSpec, *, instance_type: str | None, nodes: int | None,
    local_gpus: str | None,
) -> list[_Option]:
    node_counts = [nodes] if nodes else (list(range(1, MAX_NODES + 1)) if model.is_moe else [1])
    out: list[_Option] = []
    if cloud == "aws":
        types = [get_instance_type(instance_type)] if instance_type else list(AWS_INSTANCE_TYPES.values())
        for t in types:
            for n in node_counts:
                if n > 1 and t.efa_interfaces == 0:
                    continue
                out.append(_Option(t.gpu_model, t.gpu_count, n, t.price_microusd_per_hour * n,
                                   instance_type=t.name, on_demand=t.on_demand))
    elif cloud == "modal":
        if nodes and nodes > 1:
            raise PlanError("Modal runs one container per replica: r1nest plans one node there.",
                            ["--cloud aws for multi-node deployments"])
        if instance_type:
            name, count = parse_gpu_string(instance_type)
            if name not in MODAL_GPUS:
                raise ConfigError(f"Modal GPU must be one of {', '.join(MODAL_GPUS)}")
            choices = [(MODAL_GPUS[name], count)]
        else:
            choices = [(g, c) for g in MODAL_GPUS.values() for c in MODAL_GPU_COUNTS]
        for g, c in choices:
            out.append(_Option(g.gpu_model, c, 1, g.price_microusd_per_gpu_hour * c,
                               modal_gpu=g.gpu_string(c)))
    else:
        name, count = parse_gpu_string(local_gpus or instance_type or "H100:1")
        out.append(_Option(GPUS[name], count, nodes or 1, 0))
    return out


# --- layout and memory math --------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    tp: int
    pp: int
    dp: int
    mode: Mode


def _layouts(model: ModelSpec, opt: _Option, engine: EngineName, mode: Mode | None) -> list[_Layout]:
    g, n = opt.gpus_per_node, opt.nodes
    if model.is_moe:
        latency = _Layout(g, n, 1, "latency") if engine == "vllm" else _Layout(g * n, 1, 1, "latency")
        throughput = _Layout(1, 1, g * n, "throughput")
        layouts = [lay for lay in (latency, throughput) if mode in (None, lay.mode)]
        # attention heads must divide evenly over the tensor-parallel ranks
        return [lay for lay in layouts if model.num_attention_heads % lay.tp == 0]
    # dense: one node; the smallest tensor-parallel group that fits, the rest data parallel
    layouts = []
    tp = 1
    while tp <= g:
        if model.num_attention_heads % tp == 0 and (
            model.num_kv_heads % tp == 0 or tp % model.num_kv_heads == 0
        ):
            layouts.append(_Layout(tp, 1, g // tp, "latency" if g // tp == 1 else "throughput"))
        tp *= 2
    if mode == "latency":
        layouts = [lay for lay in layouts if lay.dp == 1] or layouts[-1:]
    return layouts


def kv_bytes_per_token_per_gpu(model: ModelSpec, kv_dtype: str, *, tp: int, pp: int) -> int:
    """KV bytes one token occupies on one GPU of a TP x PP group."""
    whole = model.kv_bytes_per_token(kv_dtype)  # type: ignore[arg-type]
    if model.uses_mla:
        return math.ceil(whole / pp)  # the latent is replicated across TP ranks
    heads_here = math.ceil(model.num_kv_heads / tp)
    return math.ceil(whole * heads_here / model.num_kv_heads / pp)


def weight_bytes_per_gpu(model: ModelSpec, *, tp: int, pp: int, dp: int) -> int:
    if model.is_moe:
        experts = model.weight_bytes * model.expert_weight_fraction
        rest = model.weight_bytes - experts
        return math.ceil(experts / (tp * pp * dp) + rest / (tp * pp))
    return math.ceil(model.weight_bytes / (tp * pp))


@dataclass(frozen=True)
class _Fit:
    option: _Option
    layout: _Layout
    kv_dtype: str
    weights_per_gpu: int
    tokens_per_replica: int
    kv_capacity_tokens: int
    max_concurrency: int
    reason: str  # "" when it fits


def _fit(model: ModelSpec, opt: _Option, layout: _Layout, engine: EngineName, context: int) -> _Fit:
    gpu = opt.gpu
    kv_dtype = "fp8" if model.weight_dtype == "fp8" and gpu.hardware_class in FP8_WEIGHT_CLASSES else "auto"
    utilization = GPU_MEMORY_UTILIZATION[engine]
    weights = weight_bytes_per_gpu(model, tp=layout.tp, pp=layout.pp, dp=layout.dp)
    overhead = OVERHEAD_MOE_BYTES if model.is_moe else OVERHEAD_DENSE_BYTES
    free = int(gpu.memory_bytes * utilization) - weights - overhead
    per_token = kv_bytes_per_token_per_gpu(model, kv_dtype, tp=layout.tp, pp=layout.pp)
    tokens = max(0, free) // per_token
    replicas = layout.dp
    reason = ""
    if model.needs_fp8_hardware and gpu.hardware_class not in FP8_WEIGHT_CLASSES:
        reason = (f"{gpu.name} (compute capability {gpu.compute_capability[0]}.{gpu.compute_capability[1]}) "
                  "lacks the FP8 block-scaled kernels (DeepGEMM / FlashMLA need Hopper or newer)")
    elif free <= 0:
        reason = (f"weights need {weights / GIB:.0f} GiB per GPU + {overhead / GIB:.0f} GiB reserve, "
                  f"{gpu.name} offers {gpu.memory_bytes * utilization / GIB:.0f} GiB at "
                  f"{utilization:.0%} utilization")
    elif tokens < context:
        reason = f"room for {tokens:,} KV tokens per replica, less than one {context:,}-token sequence"
    return _Fit(opt, layout, kv_dtype, weights, tokens, tokens * replicas,
                replicas * (tokens // context) if not reason else 0, reason)


# --- the planner -------------------------------------------------------------------------------


def plan(
    model: str | ModelSpec,
    cloud: Cloud,
    *,
    context: int | None = None,
    concurrency: int = 1,
    engine: EngineName = "vllm",
    instance_type: str | None = None,
    nodes: int | None = None,
    hardware_class: HardwareClass | None = None,
    mode: Mode | None = None,
    local_gpus: str | None = None,
    gpu: str | None = None,
    gpu_count: int | None = None,
    fabric: Fabric | None = None,
) -> Plan:
    """The cheapest deployment of `model` on `cloud` that serves `concurrency` sequences of
    `context` tokens; PlanError(reason, alternatives) when none does.

    `instance_type`: an AWS instance type, or a Modal GPU string ("H200:8") on Modal.
    `hardware_class`: restrict to one class; on cloud="local" "cpu" (the default there) plans
    vLLM's CPU build; local GPUs are named by `local_gpus` ("H100:8") or `gpu` + `gpu_count`.
    `fabric`: the network between local nodes ("infiniband", "efa"; default "unknown", planned
    like EFA); on AWS it is EFA.
    """
    spec = resolve_model(model)
    if gpu is not None and local_gpus is None:
        local_gpus = f"{gpu}:{gpu_count or 1}"
    net = _check_request(cloud, engine, hardware_class=hardware_class, concurrency=concurrency, nodes=nodes,
                         mode=mode, fabric=fabric)
    ctx = _context(spec, context)

    if cloud == "local" and hardware_class in (None, "cpu") and not local_gpus:
        return _cpu_plan(spec, engine, ctx, concurrency, context_given=context is not None)
    if hardware_class == "cpu":
        raise PlanError("CPU plans exist for cloud 'local' only (vLLM's CPU build).",
                        ["--cloud local --hardware-class cpu"])
    if not spec.is_moe and nodes and nodes > 1:
        raise PlanError(f"{spec.id} is dense and fits one node: r1nest plans it on one node.",
                        ["--nodes 1"])

    options = _options(cloud, spec, instance_type=instance_type, nodes=nodes, local_gpus=local_gpus)
    if hardware_class:
        options = [o for o in options if o.gpu.hardware_class == hardware_class]
    fits = [
        _fit(spec, o, layout, engine, ctx)
        for o in options
        for layout in _layouts(spec, o, engine, mode)
    ]
    enough = [f for f in fits if not f.reason and f.max_concurrency >= concurrency]
    if enough:
        return _make_plan(spec, cloud, engine, min(enough, key=_preference), ctx, concurrency, net)
    constrained = bool(instance_type or nodes or hardware_class)
    raise PlanError(_why_nothing_fits(spec, cloud, ctx, concurrency, fits, constrained=constrained),
                    _alternatives(spec, cloud, engine, ctx, concurrency, mode, exclude=fits))


def _check_request(
    cloud: Cloud, engine: EngineName, *, hardware_class: HardwareClass | None, concurrency: int,
    nodes: int | None, mode: Mode | None, fabric: Fabric | None,
) -> Fabric:
    """ConfigError for a value outside what the planner knows; the fabric between the nodes."""
    if cloud not in CLOUDS:
        raise ConfigError(f"unknown cloud {cloud!r}; choose one of {', '.join(CLOUDS)}")
    if engine not in ("vllm", "sglang"):
        raise ConfigError(f"unknown engine {engine!r}; choose vllm or sglang")
    if hardware_class is not None and hardware_class not in HARDWARE_CLASSES:
        raise ConfigError(f"unknown hardware class {hardware_class!r}; one of {', '.join(HARDWARE_CLASSES)}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ConfigError(f"concurrency must be 1..{MAX_CONCURRENCY}")
    if nodes is not None and not 1 <= nodes <= MAX_NODES:
        raise ConfigError(f"nodes must be 1..{MAX_NODES}")
    if mode is not None and mode not in ("latency", "throughput"):
        raise ConfigError("mode must be latency or throughput")
    if fabric is not None and fabric not in FABRICS:
        raise ConfigError(f"unknown fabric {fabric!r}; one of {', '.join(FABRICS)}")
    if cloud in CLOUD_FABRIC and fabric not in (None, CLOUD_FABRIC[cloud]):
        raise ConfigError(f"{cloud} nodes talk over {CLOUD_FABRIC[cloud]}, not {fabric}")
    return CLOUD_FABRIC.get(cloud) or fabric or "unknown"


def _context(spec: ModelSpec, context: int | None) -> int:
    """The context asked for (default: the catalog's), within the model's native context."""
    ctx = spec.default_context if context is None else context
    if not 1 <= ctx <= spec.native_context:
        raise PlanError(
            f"context {ctx:,} is outside 1..{spec.native_context:,}, {spec.id}'s native context.",
            [f"--context {min(spec.default_context, spec.native_context)}"],
        )
    return ctx


def _preference(fit: _Fit) -> tuple[Any, ...]:
    """On-demand first, then cheapest; at equal price fewer nodes and GPUs, then the latency
    layout (TP + MTP), then more concurrency."""
    return (not fit.option.on_demand, fit.option.price_microusd_per_hour, fit.option.nodes,
            fit.option.gpus_per_node, fit.layout.mode != "latency", -fit.max_concurrency)


def _why_nothing_fits(spec: ModelSpec, cloud: Cloud, ctx: int, concurrency: int, fits: list[_Fit], *,
                      constrained: bool) -> str:
    """PlanError's reason: the best concurrency that did fit, or why each layout did not."""
    good = [f for f in fits if not f.reason]
    if good:
        top = max(good, key=lambda f: f.max_concurrency)
        return (f"{spec.id} at {ctx:,} tokens of context allows at most {top.max_concurrency} "
                f"concurrent sequences on {top.option.label}, fewer than the {concurrency} asked for.")
    reasons = sorted({f"{f.option.label} {_layout_label(f.layout)}: {f.reason}" for f in fits})
    if not reasons:
        reasons = [f"no layout of the GPUs asked for divides {spec.id}'s "
                   f"{spec.num_attention_heads} attention heads evenly"]
    return (f"{spec.id} ({spec.weight_bytes / 1e12:.2f} TB of {spec.weight_dtype.upper()} "
            f"weights) does not fit " + ("the hardware asked for" if constrained else f"any {cloud} option")
            + ". " + "; ".join(reasons[:4]) + ".")


def _layout_label(layout: _Layout) -> str:
    parts = [f"{name.upper()}{size}" for name, size in
             (("tp", layout.tp), ("pp", layout.pp), ("dp", layout.dp)) if size > 1]
    return "x".join(parts) or "1 GPU"


def _alternatives(
    spec: ModelSpec, cloud: Cloud, engine: EngineName, ctx: int, concurrency: int,
    mode: Mode | None, *, exclude: list[_Fit],
) -> list[str]:
    """Cheapest distinct hardware that fits without the user's constraints."""
    if cloud == "local":
        return ["--cloud aws or --cloud modal for planned GPU hardware"]
    excluded = {f.option.label for f in exclude}
    fits = [
        _fit(spec, o, layout, engine, ctx)
        for o in _options(cloud, spec, instance_type=None, nodes=None, local_gpus=None)
        for layout in _layouts(spec, o, engine, mode)
    ]
    good = sorted((f for f in fits if not f.reason),
                  key=lambda f: (f.max_concurrency < concurrency, f.option.price_microusd_per_hour))
    out: list[str] = []
    seen: set[str] = set()
    for f in good:
        label = f.option.label
        if label in seen or label in excluded:
            continue
        seen.add(label)
        out.append(f"{label} ({f.option.nodes * f.option.gpus_per_node}x {f.option.gpu.name}, "
                   f"{format_usd_per_hour(f.option.price_microusd_per_hour)}, "
                   f"up to {f.max_concurrency} x {ctx:,} tokens)")
        if len(out) == 4:
            break
    if not out and good:
        best = max(good, key=lambda f: f.max_concurrency)
        replicas = math.ceil(concurrency / max(1, best.max_concurrency))
        out.append(f"{replicas} replicas of {best.option.label} behind a load balancer")
    if not out:
        out.append("a shorter --context")
    return out


def _make_plan(
    spec: ModelSpec, cloud: Cloud, engine: EngineName, fit: _Fit, ctx: int, concurrency: int,
    fabric: Fabric = "unknown",
) -> Plan:
    opt, layout = fit.option, fit.layout
    profile = build_profile(
        engine, spec,
        hardware_class=opt.gpu.hardware_class, nodes=opt.nodes, gpus_per_node=opt.gpus_per_node,
        tp=layout.tp, pp=layout.pp, dp=layout.dp, mode=layout.mode, context=ctx,
        kv_cache_dtype=fit.kv_dtype, gpu_memory_utilization=GPU_MEMORY_UTILIZATION[engine],
        fabric=fabric,
    )
    notes = []
    if cloud == "aws" and opt.instance_type:
        note = AWS_INSTANCE_TYPES[opt.instance_type].price_note
        if note:
            notes.append(f"price: {note}")
    return Plan(
        model=spec.id, cloud=cloud, engine=engine,
        instance_type=opt.instance_type, modal_gpu=opt.modal_gpu, gpu=opt.gpu.name,
        gpus_per_node=opt.gpus_per_node, nodes=opt.nodes,
        tp=profile.tp, pp=profile.pp, dp=profile.dp, ep=profile.ep, mode=layout.mode,
        context=ctx, concurrency=concurrency, kv_cache_dtype=fit.kv_dtype,
        kv_bytes_per_token=spec.kv_bytes_per_token(fit.kv_dtype),  # type: ignore[arg-type]
        kv_capacity_tokens=fit.kv_capacity_tokens, max_concurrency=fit.max_concurrency,
        weight_bytes_per_gpu=fit.weights_per_gpu, profile=profile,
        cost_microusd_per_hour=opt.price_microusd_per_hour,
        root_volume_gib=root_volume_gib(spec), hardware_class=opt.gpu.hardware_class,
        notes=tuple(notes), revision=spec.revision,
    )


def _cpu_plan(spec: ModelSpec, engine: EngineName, ctx: int, concurrency: int, *, context_given: bool = True) -> Plan:
    if engine != "vllm":
        raise PlanError("On CPU r1nest runs vLLM's CPU build only.", ["--engine vllm"])
    if spec.weight_bytes > 8 * GIB:
        raise PlanError(
            f"{spec.id} ({spec.weight_bytes / GIB:.1f} GiB of weights) is too large for the CPU "
            "profile, meant for tiny test models.",
            ["--cloud aws or --cloud modal", "a checkpoint made by `r1nest dev tiny-model`"],
        )
    ctx = min(ctx, spec.native_context)
    kv_dtype = "auto" if spec.weight_dtype != "fp32" else "bf16"
    per_token = spec.kv_bytes_per_token("bf16")
    capacity = CPU_KVCACHE_GIB * GIB // per_token
    if not context_given:  # the model's own context, as far as the KV cache holds `concurrency` of them
        ctx = max(1, min(ctx, capacity // concurrency))
    max_conc = min(CPU_MAX_NUM_SEQS, capacity // ctx)
    if max_conc < concurrency:
        raise PlanError(
            f"the CPU profile holds {capacity:,} KV tokens and {CPU_MAX_NUM_SEQS} sequences: "
            f"at most {max_conc} concurrent sequences of {ctx:,} tokens.",
            ["a shorter --context", f"--concurrency {max(1, max_conc)}"],
        )
    profile = build_profile("vllm", spec, hardware_class="cpu", context=ctx, kv_cache_dtype="auto")
    return Plan(
        model=spec.id, cloud="local", engine="vllm", instance_type=None, modal_gpu=None, gpu=None,
        gpus_per_node=0, nodes=1, tp=1, pp=1, dp=1, ep=1, mode="latency", context=ctx,
        concurrency=concurrency, kv_cache_dtype=kv_dtype, kv_bytes_per_token=per_token,
        kv_capacity_tokens=capacity, max_concurrency=max_conc, weight_bytes_per_gpu=spec.weight_bytes,
        profile=profile, cost_microusd_per_hour=0, root_volume_gib=root_volume_gib(spec),
        hardware_class="cpu", revision=spec.revision,
    )


def root_volume_gib(spec: ModelSpec) -> int:
    """Disk for one node: OS + engine image + the weights with a margin, rounded up to 10 GiB."""
    need = IMAGE_AND_OS_GIB + spec.weight_bytes * WEIGHTS_MARGIN / GIB
    return int(math.ceil(need / 10) * 10)
