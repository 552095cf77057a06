"""`r1nest doctor`: can this box serve the model, before 20 minutes of weight loading say it cannot.

The probes in `r1nest.gpu_probe` collect facts (GPUs and a real FP8 GEMM on each, kernel imports,
fabric, disk, the weights commits in the Hugging Face cache); `diagnose()` below turns facts into
checks and a verdict without any I/O, and asks the planner what it would run here (for the fabric
it finds: EFA, InfiniBand or unknown). It reports the attention backend the plan names and, when
`r1nest serve` ran an engine here, the backend and weights commit that engine reported
(`engine-observed.json` in the data dir, written by r1nest.engines.launcher). Exit status: 0
when the box can serve the model, 1 when it cannot (the first failing check says why).

JSON output (`--json`) has a fixed shape, versioned by `schema_version`; see `DoctorReport.to_json`.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import click

from r1nest.catalog import COMMIT_RE, ModelSpec, resolve_model
from r1nest.engines.base import EngineName, Fabric, flag_value
from r1nest.errors import PlanError
from r1nest.gpu_probe import (
    FP8_CHECK_MAX_REL_ERROR,
    BoxFacts,
    DiskFacts,
    GpuFacts,
    KernelFacts,
    NetworkFacts,
    Probes,
)
from r1nest.hardware import GIB, GPUS, GpuModel, HardwareClass
from r1nest.planner import MAX_NODES

SCHEMA_VERSION = 1
Status = Literal["ok", "warn", "fail", "skip"]

# A local model whose weights fit in this much memory runs on the CPU build of vLLM (the tiny
# models); the planner's CPU profile has the same bound.
CPU_MAX_WEIGHT_BYTES = 8 * GIB
# Part of GPU memory the weights may take: the rest is KV cache, activations, CUDA graphs.
WEIGHTS_MAX_GPU_FRACTION = 0.90
DISK_HEADROOM = 1.05  # 5 % over the weights for the Hub's temporary files
FP8_MIN_CAPABILITY = (8, 9)
# The oldest Linux driver branch each CUDA runtime needs (NVIDIA's CUDA toolkit release notes,
# "CUDA Toolkit and Corresponding Driver Versions"; forward-compat packages aside).
MIN_DRIVER_FOR_CUDA = {(13, 0): 580, (12, 9): 575, (12, 8): 570, (12, 6): 560, (12, 4): 550, (12, 1): 530}

# Modules the engine cannot serve without, per box kind; the rest are reported as warnings.
REQUIRED_MODULES_GPU = ("engine", "custom_ops", "fused_moe")
REQUIRED_MODULES_CPU = ("engine",)
REQUIRED_MODULES_SGLANG_GPU = ("engine", "sgl_kernel")


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


@dataclass(frozen=True)
class WeightsFacts:
    """The model's commits in the Hugging Face cache: snapshot directories and refs (main -> sha)."""

    snapshots: tuple[str, ...] = ()
    refs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DoctorReport:
    model: ModelSpec
    engine: str
    nodes: int
    hardware_class: str | None
    facts: BoxFacts
    checks: tuple[Check, ...]
    backends: dict[str, str]
    plan: dict[str, Any] | None
    weights: WeightsFacts = field(default_factory=WeightsFacts)
    reported: dict[str, str] = field(default_factory=dict)  # what a running engine reported

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    @property
    def reason(self) -> str | None:
        failed = [c for c in self.checks if c.status == "fail"]
        return failed[0].detail if failed else None

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        """The stable machine-readable shape (bump SCHEMA_VERSION when a key changes)."""
        facts = self.facts
        return {
            "schema_version": SCHEMA_VERSION,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "model": {
                "id": self.model.id,
                "hf_repo": self.model.hf_repo,
                "architecture": self.model.architecture,
                "weight_dtype": self.model.weight_dtype,
                "weight_bytes": self.model.weight_bytes,
            },
            "engine": {"name": self.engine, "version": facts.kernels.version},
            "nodes": self.nodes,
            "hardware": {
                "class": self.hardware_class,
                "gpu_count": len(facts.gpus),
                "driver_version": facts.driver_version,
                "torch_version": facts.torch_version,
                "cuda_version": facts.cuda_version,
                "gpus": [_gpu_json(g) for g in facts.gpus],
            },
            "kernels": {"modules": dict(facts.kernels.modules), "errors": dict(facts.kernels.errors)},
            "backends": dict(self.backends),
            "network": {
                "infiniband_devices": list(facts.network.infiniband_devices),
                "efa_devices": list(facts.network.efa_devices),
                "verbs_device_nodes": list(facts.network.verbs_device_nodes),
                "fabric_providers": list(facts.network.fabric_providers),
                "nccl_env": dict(facts.network.nccl_env),
            },
            "disk": {
                "path": facts.disk.path,
                "free_bytes": facts.disk.free_bytes,
                "cached_bytes": facts.disk.cached_bytes,
            },
            "plan": self.plan,
            "checks": [asdict(c) for c in self.checks],
            "weights": {
                "revision": self.model.revision,
                "pinned": self.model.revision_pinned,
                "revision_source": self.model.revision_source,
                "cached_revisions": list(self.weights.snapshots),
                "refs": dict(self.weights.refs),
            },
            "engine_reported": dict(self.reported),
        }


def _gpu_json(gpu: GpuFacts) -> dict[str, Any]:
    return {
        "index": gpu.index,
        "name": gpu.name,
        "arch": gpu.arch,
        "compute_capability": list(gpu.compute_capability) if gpu.compute_capability else None,
        "memory_bytes": gpu.memory_bytes,
        "fp8_supported": fp8_capable(gpu),
        "fp8_gemm": {
            "ran": gpu.fp8_gemm.ran,
            "tflops": gpu.fp8_gemm.tflops,
            "max_rel_error": gpu.fp8_gemm.max_rel_error,
            "error": gpu.fp8_gemm.error,
        },
    }


# --- pure helpers --------------------------------------------------------------------------------


def fp8_capable(gpu: GpuFacts) -> bool:
    if gpu.compute_capability is None:  # ROCm: MI300 (gfx942) and newer have FP8
        return (gpu.arch or "").startswith(("gfx94", "gfx95"))
    return gpu.compute_capability >= FP8_MIN_CAPABILITY


def hardware_class_of(gpus: tuple[GpuFacts, ...]) -> HardwareClass | None:
    """The planner's hardware class for these GPUs; "cpu" for none, None when unsupported/mixed."""
    if not gpus:
        return "cpu"
    classes = {_class_of(g) for g in gpus}
    return classes.pop() if len(classes) == 1 else None


def _class_of(gpu: GpuFacts) -> HardwareClass | None:
    if gpu.compute_capability is None:
        return "mi300x" if (gpu.arch or "").startswith(("gfx94", "gfx95")) else None
    major, minor = gpu.compute_capability
    if major == 9:
        return "hopper"
    if major in (10, 12):
        return "blackwell"
    if (major, minor) == (8, 9):
        return "ada"
    if major == 8:
        return "ampere"
    return None  # Volta / Turing: no bf16 tensor cores for these engines' kernels


def match_gpu_model(gpu: GpuFacts) -> GpuModel | None:
    """The hardware table's GPU for a detected one: by name, then by class and nearest memory."""
    words = set(re.split(r"[\s\-_]+", gpu.name.upper()))  # "NVIDIA A100-SXM4-80GB" -> A100, ...
    for key in GPUS:
        stem = key.split("-")[0].upper()
        if stem in words:  # whole words: a GH200 is not an H200
            same = [g for k, g in GPUS.items() if k.split("-")[0].upper() == stem]
            return min(same, key=lambda g: abs(g.memory_bytes - gpu.memory_bytes))
    return None


def needs_gpu(model: ModelSpec) -> bool:
    return not (model.is_local and model.weight_bytes <= CPU_MAX_WEIGHT_BYTES)


def expected_backends(
    model: ModelSpec,
    engine: str,
    hardware_class: str | None,
    modules: dict[str, bool],
    *,
    kv_cache_dtype: str = "auto",
    engine_env: dict[str, str] | None = None,
    nodes: int = 1,
    profile_args: tuple[str, ...] = (),
) -> dict[str, str]:
    """Which kernels the engine should pick here, from the hardware and what imports.

    This is the expectation; the engine's log says what it chose (the launcher records it, and
    scripts/gpu-proof greps it). A backend the plan names (`--attention-backend`, the expert
    all-to-all flag) is what the engine runs. Otherwise the rules follow each engine's own
    selection: vLLM's MLA on Hopper is FlashAttention-3 MLA, or FlashMLA with an FP8 KV cache;
    SGLang's MLA on Hopper is fa3 (sgl-kernel's FlashAttention-3); FP8 block GEMMs use DeepGEMM
    unless VLLM_USE_DEEP_GEMM=0, else CUTLASS; MoE uses DeepGEMM grouped GEMMs on Hopper/Blackwell
    when enabled, else Triton.
    """
    env = engine_env or {}
    if hardware_class == "cpu":
        return {"attention": "cpu (oneDNN / torch SDPA)", "linear": "cpu", "moe": "cpu" if model.is_moe else "-"}
    if hardware_class is None:
        return {}
    deep_gemm = modules.get("deep_gemm", False) and env.get("VLLM_USE_DEEP_GEMM", "1") != "0"
    hopper_plus = hardware_class in ("hopper", "blackwell")
    backends: dict[str, str] = {}
    named = flag_value(profile_args, "--attention-backend")
    if named:
        backends["attention"] = named
    elif engine == "vllm":
        forced = env.get("VLLM_ATTENTION_BACKEND")
        if forced:
            backends["attention"] = f"{forced} (forced by VLLM_ATTENTION_BACKEND)"
        elif model.uses_mla:
            backends["attention"] = {
                "hopper": "FLASHMLA" if kv_cache_dtype.startswith("fp8") else "FLASH_ATTN_MLA",
                "blackwell": "CUTLASS_MLA",
                "mi300x": "ROCM_AITER_MLA",
            }.get(hardware_class, "TRITON_MLA")
        else:
            backends["attention"] = "FLASH_ATTN" if hardware_class in ("hopper", "ampere") else "FLASHINFER"
    else:
        backends["attention"] = "fa3" if hardware_class == "hopper" else "triton"
    if model.weight_dtype == "fp8":
        backends["fp8_linear"] = (
            "DeepGEMM (block FP8)" if deep_gemm and hopper_plus else
            "CUTLASS block FP8" if hardware_class in ("hopper", "blackwell", "ada") else
            "none: FP8 needs compute capability >= 8.9"
            if hardware_class == "ampere" else "Triton block FP8"
        )
    if model.is_moe:
        backends["moe"] = "DeepGEMM grouped FP8" if deep_gemm and hopper_plus and model.weight_dtype == "fp8" else "Triton fused MoE"
        a2a = flag_value(profile_args, "--all2all-backend" if engine == "vllm" else "--moe-a2a-backend")
        if nodes > 1 and a2a:
            backends["all2all"] = a2a + (" (DeepEP: needs InfiniBand IBGDA)" if "deepep" in a2a else " (NCCL)")
        elif nodes > 1:
            backends["all2all"] = "DeepEP" if modules.get("deep_ep") else "allgather/reduce-scatter (DeepEP missing)"
    return backends


def _kv_cache_dtype(args: tuple[str, ...] | list[str]) -> str:
    args = list(args)
    for i, arg in enumerate(args):
        if arg.startswith("--kv-cache-dtype="):
            return arg.split("=", 1)[1]
        if arg == "--kv-cache-dtype" and i + 1 < len(args):
            return args[i + 1]
    return "auto"


def fabric_of(net: NetworkFacts) -> Fabric:
    """The fabric between nodes as the planner names it: EFA devices, else InfiniBand ones."""
    if net.efa_devices:
        return "efa"
    return "infiniband" if net.infiniband_devices else "unknown"


def read_weights_facts(cache_dir: Path, hf_repo: str) -> WeightsFacts:
    """The commits of `hf_repo` the Hugging Face cache holds (snapshot dirs, refs/*)."""
    repo_dir = cache_dir / ("models--" + hf_repo.replace("/", "--"))
    snapshots = tuple(sorted(p.name for p in (repo_dir / "snapshots").glob("*")
                             if p.is_dir() and COMMIT_RE.match(p.name)))
    refs = {}
    for ref in sorted((repo_dir / "refs").glob("*")):
        try:
            commit = ref.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if COMMIT_RE.match(commit):
            refs[ref.name] = commit
    return WeightsFacts(snapshots, refs)


# --- the verdict ---------------------------------------------------------------------------------

Planner = Callable[..., Any]


def diagnose(
    facts: BoxFacts,
    model: ModelSpec,
    *,
    engine: str = "vllm",
    nodes: int = 1,
    planner: Planner | None = None,
    weights: WeightsFacts | None = None,
    reported: dict[str, str] | None = None,
) -> DoctorReport:
    """Facts -> checks, expected backends and the planner's verdict. No I/O.

    `weights`: the model's commits in the Hub cache; `reported`: what an engine r1nest ran here
    recorded (engine-observed.json), used when it is this model on this engine.
    """
    hw_class = hardware_class_of(facts.gpus)
    checks = [
        *_gpu_checks(facts.gpus, model, hw_class),
        *_driver_checks(facts),
        *_fp8_checks(facts.gpus, model),
        *_memory_checks(facts.gpus, model, nodes),
        *_kernel_checks(facts.kernels, model, engine, has_gpus=bool(facts.gpus), nodes=nodes),
        *_fabric_checks(facts.network, nodes),
        *_disk_checks(facts.disk, model),
    ]
    weights = weights or WeightsFacts()
    reported = {k: v for k, v in (reported or {}).items()
                if (reported or {}).get("engine") == engine and (reported or {}).get("model") == model.hf_repo}
    checks.extend(_weights_checks(model, weights, reported))
    plan_json: dict[str, Any] | None = None
    profile_env: dict[str, str] = {}
    profile_args: tuple[str, ...] = ()
    kv_dtype = "auto"
    if planner is not None and hw_class is not None:
        try:
            result = planner(model, engine=engine, nodes=nodes, hardware_class=hw_class, gpus=facts.gpus,
                             fabric=fabric_of(facts.network))
        except PlanError as exc:
            checks.append(Check("plan", "fail", f"the planner refuses: {exc}"))
        else:
            plan_json = result.to_json() if hasattr(result, "to_json") else dict(result)
            profile = getattr(result, "profile", None)
            profile_env = dict(getattr(profile, "env", {}) or {})
            profile_args = tuple(getattr(profile, "args", ()) or ())
            kv_dtype = getattr(profile, "kv_cache_dtype", None) or _kv_cache_dtype(profile_args)
            checks.append(Check("plan", "ok", _plan_summary(plan_json)))
    backends = {} if hw_class == "cpu" and needs_gpu(model) else expected_backends(
        model, engine, hw_class, facts.kernels.modules, kv_cache_dtype=kv_dtype, engine_env=profile_env,
        nodes=nodes, profile_args=profile_args)
    checks.extend(_attention_checks(backends.get("attention"), profile_args, reported))
    return DoctorReport(model, engine, nodes, hw_class, facts, tuple(checks), backends, plan_json,
                        weights, reported)


def _weights_checks(model: ModelSpec, weights: WeightsFacts, reported: dict[str, str]) -> list[Check]:
    """Which weights commit this box serves: the catalog's pin, or for an unpinned model the
    commit main resolved to when it was downloaded (the engine's record, else the cache's refs)."""
    if model.is_local:
        return [Check("weights_revision", "skip", f"local checkpoint {model.hf_repo}")]
    served = reported.get("weights_revision")
    if model.revision_pinned:
        pin = model.revision
        if served and served != pin:
            return [Check("weights_revision", "warn", f"the engine that ran here loaded {served}, not the pinned "
                          f"{pin}: restart r1nest serve to load the pinned weights")]
        if pin in weights.snapshots or served == pin:
            return [Check("weights_revision", "ok", f"pinned {pin}, in the cache")]
        others = ", ".join(c[:12] for c in weights.snapshots)
        return [Check("weights_revision", "ok", f"pinned {pin}; downloaded at the engine's first start"
                      + (f" (the cache holds only {others})" if others else ""))]
    resolved = served or weights.refs.get("main")
    why = model.revision_source.split(":")[0] if model.revision_source else "no reason recorded"
    if resolved:
        return [Check("weights_revision", "warn", f"unpinned ({why}); this box serves {resolved} "
                      f"({'reported by the engine' if served else 'main in the cache'})")]
    return [Check("weights_revision", "warn", f"unpinned ({why}); the engine downloads main at its first start "
                  "and records the commit (run r1nest doctor again to see it)")]


def _attention_checks(expected: str | None, profile_args: tuple[str, ...],
                      reported: dict[str, str]) -> list[Check]:
    """The attention backend: the one the plan names, and the one a running engine reported."""
    named = flag_value(profile_args, "--attention-backend")
    seen = reported.get("attention_backend")
    if seen and named and seen != named:
        return [Check("attention", "warn", f"the plan names {named}; the engine that ran here reported {seen}")]
    if seen:
        return [Check("attention", "ok", f"{seen}, reported by the engine running here")]
    if named:
        return [Check("attention", "ok", f"{named}, named by the plan (--attention-backend)")]
    if expected:
        return [Check("attention", "skip", f"{expected} expected: the engine's own choice, not named by the plan")]
    return []


def _gpu_checks(gpus: tuple[GpuFacts, ...], model: ModelSpec, hw_class: str | None) -> list[Check]:
    if not gpus:
        if needs_gpu(model):
            return [Check("gpus", "fail", "no GPU found (torch sees no CUDA device and nvidia-smi lists "
                          f"none): {model.id} needs GPUs")]
        return [Check("gpus", "ok", f"no GPU; {model.id} is small enough for the CPU build")]
    names = sorted({g.name for g in gpus})
    first = gpus[0]
    checks = [Check("gpus", "ok" if len(names) == 1 else "warn",
                    f"{len(gpus)} x {' / '.join(names)} ({first.arch or '?'}, "
                    f"{first.memory_bytes / GIB:.0f} GiB each)")]
    if hw_class is None:
        archs = sorted({g.arch or "?" for g in gpus})
        checks.append(Check("architecture", "fail",
                            f"unsupported or mixed GPU architecture ({', '.join(archs)}): the engines' "
                            "DeepSeek kernels need Ampere (sm80) or newer, all GPUs alike"))
    else:
        checks.append(Check("architecture", "ok", f"hardware class {hw_class}"))
    return checks


def _driver_checks(facts: BoxFacts) -> list[Check]:
    """Is the driver new enough for the CUDA runtime torch (and so the engine) was built with?"""
    if not facts.gpus or not facts.driver_version or not facts.cuda_version:
        return []
    try:
        cuda = tuple(int(x) for x in facts.cuda_version.split(".")[:2])
        driver_major = int(facts.driver_version.split(".")[0])
    except ValueError:
        return []
    needed = next((v for k, v in sorted(MIN_DRIVER_FOR_CUDA.items(), reverse=True) if cuda >= k), None)
    if needed is None:
        return []
    if driver_major < needed:
        return [Check("driver", "fail", f"driver {facts.driver_version} is older than CUDA "
                      f"{facts.cuda_version} needs ({needed} or newer): update the driver, or use an image "
                      "built for an older CUDA")]
    return [Check("driver", "ok", f"driver {facts.driver_version}, CUDA {facts.cuda_version}")]


def _fp8_checks(gpus: tuple[GpuFacts, ...], model: ModelSpec) -> list[Check]:
    """FP8 capability, then the real GEMM measured on each GPU."""
    checks: list[Check] = []
    incapable = [g for g in gpus if not fp8_capable(g)]
    if incapable and model.needs_fp8_hardware:
        checks.append(Check("fp8", "fail",
                            f"{model.id} ships FP8 block-quantized weights; FP8 tensor cores need compute "
                            f"capability >= 8.9 (Ada, Hopper, Blackwell) and these GPUs are "
                            f"{incapable[0].arch or '?'} ({incapable[0].name}). Use H100/H200/B200, or serve "
                            "a BF16 distill here."))
    elif incapable:
        checks.append(Check("fp8", "skip",
                            f"no FP8 tensor cores ({incapable[0].arch}); {model.id} does not need them"))
    for gpu in gpus:
        if not fp8_capable(gpu):
            continue
        gemm, name = gpu.fp8_gemm, f"fp8_gemm[{gpu.index}]"
        if gemm.ran and gemm.max_rel_error is not None and gemm.max_rel_error > FP8_CHECK_MAX_REL_ERROR:
            checks.append(Check(name, "fail", f"FP8 GEMM gave wrong results (max relative error "
                                f"{gemm.max_rel_error})"))
        elif gemm.ran:
            checks.append(Check(name, "ok", f"torch._scaled_mm float8_e4m3fn: {gemm.tflops} TFLOP/s"))
        else:
            status: Status = "fail" if model.needs_fp8_hardware and gemm.error else "warn"
            checks.append(Check(name, status, f"FP8 GEMM not run: {gemm.error or 'skipped (--no-gemm)'}"))
    return checks


def _memory_checks(gpus: tuple[GpuFacts, ...], model: ModelSpec, nodes: int) -> list[Check]:
    """Do the weights fit with room left for the KV cache?"""
    if not gpus or not needs_gpu(model):
        return []
    total = sum(g.memory_bytes for g in gpus) * nodes
    where = f"{nodes} node(s) x {len(gpus)} GPU(s) = {total / 1e9:,.0f} GB"
    if model.weight_bytes > int(total * WEIGHTS_MAX_GPU_FRACTION):
        return [Check("gpu_memory", "fail",
                      f"{model.id} weights are {model.weight_bytes / 1e9:,.0f} GB; {where} of GPU memory leaves "
                      f"no room for the KV cache (weights may take at most {WEIGHTS_MAX_GPU_FRACTION:.0%}). "
                      "More GPUs or nodes are needed.")]
    return [Check("gpu_memory", "ok", f"weights {model.weight_bytes / 1e9:,.1f} GB of {where}")]


def _kernel_checks(kernels: KernelFacts, model: ModelSpec, engine: str, *, has_gpus: bool,
                   nodes: int) -> list[Check]:
    if not kernels.modules.get("engine"):
        return [Check("engine", "fail",
                      f"{engine} does not import: {kernels.errors.get('engine', 'not installed')}")]
    checks = [Check("engine", "ok", f"{engine} {kernels.version or ''}".strip())]
    required = (REQUIRED_MODULES_CPU if not has_gpus else
                REQUIRED_MODULES_GPU if engine == "vllm" else REQUIRED_MODULES_SGLANG_GPU)
    for role, present in sorted(kernels.modules.items()):
        if role == "engine":
            continue
        name = f"kernel:{role}"
        error = kernels.errors.get(role, "missing")
        if present:
            checks.append(Check(name, "ok", "imports"))
        elif role in required:
            checks.append(Check(name, "fail", f"does not import: {error}"))
        elif has_gpus and role in ("flashmla", "deep_gemm") and model.uses_mla:
            checks.append(Check(name, "warn", f"missing, slower fallback kernels: {error}"))
        elif has_gpus and role == "deep_ep" and nodes > 1:
            checks.append(Check(name, "warn", f"missing, expert all-to-all without DeepEP: {error}"))
        else:
            checks.append(Check(name, "skip", f"not needed here ({error})"))
    return checks


def _fabric_checks(net: NetworkFacts, nodes: int) -> list[Check]:
    checks: list[Check] = []
    if nodes > 1:
        devices = net.efa_devices or net.infiniband_devices
        if devices and not net.verbs_device_nodes:
            checks.append(Check("fabric", "warn", f"RDMA devices {', '.join(devices)} exist but no "
                                "/dev/infiniband/uverbs* is open to this process: in a container, pass "
                                "--device /dev/infiniband, or NCCL falls back to TCP sockets (slow)"))
        elif devices:
            providers = ", ".join(net.fabric_providers) or "fi_info not found"
            checks.append(Check("fabric", "ok", f"RDMA devices {', '.join(devices)}; libfabric providers: "
                                f"{providers}"))
        else:
            checks.append(Check("fabric", "warn", f"{nodes} nodes but no InfiniBand/EFA device in "
                                "/sys/class/infiniband: NCCL falls back to TCP sockets (slow)"))
    if net.nccl_env:
        checks.append(Check("nccl_env", "ok", " ".join(f"{k}={v}" for k, v in net.nccl_env.items())))
    return checks


def _disk_checks(disk: DiskFacts, model: ModelSpec) -> list[Check]:
    if model.is_local:
        return [Check("disk", "skip", f"weights already on disk at {model.hf_repo}")]
    missing = max(0, model.weight_bytes - disk.cached_bytes)
    needed = int(missing * DISK_HEADROOM)
    if disk.free_bytes < needed:
        return [Check("disk", "fail", f"{disk.path} has {disk.free_bytes / 1e9:,.0f} GB free; the weights "
                      f"still to download need {needed / 1e9:,.0f} GB")]
    return [Check("disk", "ok", f"{disk.free_bytes / 1e9:,.0f} GB free in {disk.path}, "
                  f"{missing / 1e9:,.1f} GB to download")]


def _plan_summary(plan: dict[str, Any]) -> str:
    parts = []
    if plan.get("gpu"):
        parts.append(f"{plan.get('nodes', 1)} node(s) x {plan.get('gpus_per_node')} {plan['gpu']}")
    parallel = plan.get("parallelism") or {k: plan[k] for k in ("tp", "pp", "dp", "ep") if k in plan}
    parts += [f"{k.upper()}{v}" for k, v in parallel.items() if isinstance(v, int) and v > 1]
    for key in ("kv_cache_dtype", "context", "max_concurrency"):
        if plan.get(key) not in (None, ""):
            parts.append(f"{key}={plan[key]}")
    return ", ".join(parts)


# --- the planner adapter -------------------------------------------------------------------------


def plan_for_box(model: ModelSpec, *, engine: EngineName, nodes: int, hardware_class: HardwareClass,
                 gpus: tuple[GpuFacts, ...], fabric: Fabric = "unknown") -> Any:
    """Ask the planner what it would run on the detected box (cloud "local")."""
    from r1nest import planner

    gpu_model = match_gpu_model(gpus[0]) if gpus else None
    if gpus and gpu_model is None:
        raise PlanError(f"{gpus[0].name} is not in r1nest's hardware table (r1nest.hardware.GPUS), "
                        "so the planner cannot size a deployment for it.",
                        [f"one of {', '.join(GPUS)}"])
    return planner.plan(
        model,
        "local",
        engine=engine,
        nodes=nodes,
        hardware_class=hardware_class,
        gpu=gpu_model.name if gpu_model else None,
        gpu_count=len(gpus),
        fabric=fabric,
    )


# --- rendering -----------------------------------------------------------------------------------

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def render(report: DoctorReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"r1nest doctor: {report.model.id} with {report.engine} on {report.nodes} node(s)")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for check in report.checks:
        table.add_row(check.name, f"[{_STYLE[check.status]}]{check.status}[/]", check.detail)
    for role, backend in report.backends.items():
        table.add_row(f"backend:{role}", "[dim]expected[/]", backend)
    for role, value in report.reported.items():
        if role in ("attention_backend", "weights_revision"):
            table.add_row(f"engine:{role}", "[dim]reported[/]", value)
    console.print(table)
    if report.ok:
        console.print(f"[green]This box can serve {report.model.id}.[/]")
    else:
        console.print(f"[bold red]This box cannot serve {report.model.id}:[/] {report.reason}")


@click.command(help="Preflight this box: GPUs, FP8, kernels, fabric, disk, and the planner's verdict.")
@click.option("--model", "model_name", default=None, help="catalog id or checkpoint directory")
@click.option("--engine", type=click.Choice(["vllm", "sglang"]), default=None)
@click.option("--nodes", type=click.IntRange(1, MAX_NODES), default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (stable schema)")
@click.option("--no-gemm", is_flag=True, help="skip the FP8 GEMM benchmark (facts only)")
def doctor(model_name: str | None, engine: str | None, nodes: int, as_json: bool, no_gemm: bool) -> None:
    from r1nest.gpu_probe import host_probes
    from r1nest.settings import load_settings

    settings = load_settings(model=model_name, engine=engine)
    report = run_doctor(settings.model, settings.engine, nodes, host_probes(), run_fp8_gemm=not no_gemm,
                        data_dir=Path(settings.data_dir).expanduser())
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        render(report)
    sys.exit(report.exit_code)


def run_doctor(model_name: str, engine: str, nodes: int, probes: Probes, *, run_fp8_gemm: bool = True,
               planner: Planner | None = plan_for_box, data_dir: Path | None = None) -> DoctorReport:
    """Probe the box, then diagnose. `data_dir`: r1nest serve's, for what its engine reported."""
    from r1nest.engines.launcher import read_observed
    from r1nest.gpu_probe import collect

    model = resolve_model(model_name)
    facts = collect(probes, engine=engine, hf_repo=None if model.is_local else model.hf_repo,
                    run_fp8_gemm=run_fp8_gemm)
    weights = None if model.is_local else read_weights_facts(Path(facts.disk.path), model.hf_repo)
    reported = read_observed(data_dir) if data_dir is not None else {}
    return diagnose(facts, model, engine=engine, nodes=nodes, planner=planner, weights=weights, reported=reported)


__all__ = ["Check", "DoctorReport", "diagnose", "doctor", "run_doctor"]
