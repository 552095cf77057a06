"""Canned boxes for `r1nest doctor` tests: facts as the probes would report them.

`fake_probes(facts)` wraps a BoxFacts in objects that satisfy the probe interfaces, so the whole
doctor (collect -> diagnose -> JSON) runs without torch, GPUs or nvidia-smi.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from r1nest.gpu_probe import (
    ENGINE_MODULES,
    BoxFacts,
    DiskFacts,
    Fp8GemmResult,
    GpuFacts,
    KernelFacts,
    NetworkFacts,
    Probes,
)

MIB = 1024 * 1024
TB = 10**12

# name, compute capability, memory as nvidia-smi reports it (MiB), FP8 dense TFLOP/s we pretend to measure
_GPU_KINDS = {
    "A100": ("NVIDIA A100-SXM4-80GB", (8, 0), 81_920, None),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), 81_559, 750.0),
    "H200": ("NVIDIA H200", (9, 0), 143_771, 780.0),
    "L40S": ("NVIDIA L40S", (8, 9), 46_068, 330.0),
}


def gpus(kind: str, count: int) -> tuple[GpuFacts, ...]:
    name, capability, memory_mib, tflops = _GPU_KINDS[kind]
    out = []
    for index in range(count):
        if tflops is None:
            gemm = Fp8GemmResult(ran=False, error="torch._scaled_mm: FP8 needs compute capability >= 8.9")
        else:
            gemm = Fp8GemmResult(ran=True, tflops=tflops, max_rel_error=0.002)
        out.append(GpuFacts(index, name, capability, memory_mib * MIB, f"sm{capability[0]}{capability[1]}", gemm))
    return tuple(out)


def kernels(engine: str = "vllm", *, missing: tuple[str, ...] = (), version: str = "0.30.0") -> KernelFacts:
    roles = ENGINE_MODULES[engine]
    return KernelFacts(
        engine,
        None if "engine" in missing else version,
        {role: role not in missing for role in roles},
        {role: f"ModuleNotFoundError: No module named '{roles[role]}'" for role in missing},
    )


def box(
    kind: str | None = None,
    count: int = 8,
    *,
    engine: str = "vllm",
    missing: tuple[str, ...] = (),
    free_bytes: int = 2 * TB,
    network: NetworkFacts | None = None,
) -> BoxFacts:
    """A box with `count` GPUs of `kind` ("A100", "H100", "H200", "L40S"), or none for kind=None."""
    if kind is None:
        # the CPU build of vLLM has no FlashMLA / DeepGEMM / DeepEP
        missing = tuple(set(missing) | {"flashmla", "deep_gemm", "deep_ep", "flash_attn", "moe_ops", "ray", "flashinfer"})
    return BoxFacts(
        gpus=gpus(kind, count) if kind else (),
        kernels=kernels(engine, missing=missing),
        network=network or NetworkFacts(),
        disk=DiskFacts("/data/hf", free_bytes, 0),
        driver_version="580.65.06" if kind else None,
        torch_version="2.11.0+cu130" if kind else "2.13.0+cpu",
        cuda_version="13.0" if kind else None,
    )


@dataclass
class _Probe:
    facts: BoxFacts

    def gpus(self, *, run_fp8_gemm: bool) -> tuple[GpuFacts, ...]:
        if run_fp8_gemm:
            return self.facts.gpus
        return tuple(replace(g, fp8_gemm=Fp8GemmResult(ran=False)) for g in self.facts.gpus)

    def versions(self) -> dict[str, str | None]:
        facts = self.facts
        return {"driver_version": facts.driver_version, "torch_version": facts.torch_version,
                "cuda_version": facts.cuda_version}

    def kernels(self, engine: str) -> KernelFacts:
        return self.facts.kernels

    def network(self) -> NetworkFacts:
        return self.facts.network

    def disk(self, hf_repo: str | None) -> DiskFacts:
        return self.facts.disk


def fake_probes(facts: BoxFacts) -> Probes:
    probe = _Probe(facts)
    return Probes(gpu=probe, kernel=probe, network=probe, disk=probe)
