"""What `r1nest doctor` measures on this box: facts, and the probes that collect them.

    BoxFacts                 everything the verdict needs, plain frozen values
    ├── GpuFacts  (per GPU)  name, compute capability, memory, FP8 GEMM result
    ├── KernelFacts          which engine / kernel modules import
    ├── NetworkFacts         InfiniBand / EFA devices, libfabric providers, NCCL_* / FI_* variables
    └── DiskFacts            free space where the weights go, bytes already cached

The probes are the I/O edge (torch, nvidia-smi, a child Python for imports, the filesystem);
`r1nest.doctor` turns facts into a verdict without touching any of them, so tests feed it
fake facts (`r1nest.testing.fake_box`).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

# The FP8 GEMM that proves the tensor cores work: an M x K by K x N product, timed.
FP8_GEMM_SIZE = 8192  # M = N = K; 2 * 8192^3 = 1.1 TFLOP per call, ~1.5 ms on an H100
FP8_GEMM_WARMUP_CALLS = 3
FP8_GEMM_TIMED_CALLS = 20
FP8_CHECK_SIZE = 256  # a small product compared with float32 to catch garbage results
FP8_CHECK_MAX_REL_ERROR = 0.05
NVIDIA_SMI_TIMEOUT_S = 20.0
FI_INFO_TIMEOUT_S = 20.0
IMPORT_PROBE_TIMEOUT_S = 180.0  # importing vLLM cold takes tens of seconds on a slow disk

# Modules whose import says a kernel family is there; none of them allocates GPU memory.
# "a|b": either module will do (the engine falls back from one to the other);
# "module:attr": the module imports and has that attribute (an op compiled into a kernel library).
ENGINE_MODULES: dict[str, dict[str, str]] = {
    "vllm": {
        "engine": "vllm",
        "custom_ops": "@vllm_ops",  # the platform's own loader: the CPU build picks an AVX variant
        "moe_ops": "vllm._moe_C",
        "fused_moe": "vllm.model_executor.layers.fused_moe",
        "flashmla": "vllm._flashmla_C",
        "flash_attn": "vllm.vllm_flash_attn",
        "deep_gemm": "deep_gemm|vllm.third_party.deep_gemm",  # vLLM prefers the external package
        "deep_ep": "deep_ep",
        "flashinfer": "flashinfer",
        "ray": "ray",
    },
    "sglang": {
        "engine": "sglang",
        "sgl_kernel": "sgl_kernel",
        "fused_moe": "sglang.srt.layers.moe.fused_moe_triton",
        "flashmla": "sgl_kernel:flash_mla_with_kvcache",
        "deep_gemm": "deep_gemm",
        "deep_ep": "deep_ep",
        "flashinfer": "flashinfer",
    },
}


@dataclass(frozen=True)
class Fp8GemmResult:
    ran: bool
    tflops: float | None = None
    max_rel_error: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class GpuFacts:
    index: int
    name: str
    compute_capability: tuple[int, int] | None  # None on ROCm
    memory_bytes: int
    arch: str | None = None  # e.g. "gfx942" on ROCm, "sm90" on CUDA
    fp8_gemm: Fp8GemmResult = field(default_factory=lambda: Fp8GemmResult(ran=False))


@dataclass(frozen=True)
class KernelFacts:
    engine: str
    version: str | None
    modules: dict[str, bool]  # role -> importable
    errors: dict[str, str] = field(default_factory=dict)  # role -> first line of the ImportError


@dataclass(frozen=True)
class NetworkFacts:
    infiniband_devices: tuple[str, ...] = ()  # /sys/class/infiniband: what the host has
    efa_devices: tuple[str, ...] = ()
    verbs_device_nodes: tuple[str, ...] = ()  # /dev/infiniband/uverbs*: what this process may open
    fabric_providers: tuple[str, ...] = ()  # from `fi_info -l`, empty when fi_info is absent
    nccl_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DiskFacts:
    path: str
    free_bytes: int
    cached_bytes: int = 0  # bytes of this model already in the cache (0 when unknown)


@dataclass(frozen=True)
class BoxFacts:
    gpus: tuple[GpuFacts, ...]
    kernels: KernelFacts
    network: NetworkFacts
    disk: DiskFacts
    driver_version: str | None = None
    torch_version: str | None = None
    cuda_version: str | None = None


class GpuProbe(Protocol):
    def gpus(self, *, run_fp8_gemm: bool) -> tuple[GpuFacts, ...]: ...
    def versions(self) -> dict[str, str | None]: ...  # driver_version, torch_version, cuda_version


class KernelProbe(Protocol):
    def kernels(self, engine: str) -> KernelFacts: ...


class NetworkProbe(Protocol):
    def network(self) -> NetworkFacts: ...


class DiskProbe(Protocol):
    def disk(self, hf_repo: str | None) -> DiskFacts: ...


@dataclass(frozen=True)
class Probes:
    gpu: GpuProbe
    kernel: KernelProbe
    network: NetworkProbe
    disk: DiskProbe


def collect(probes: Probes, *, engine: str, hf_repo: str | None, run_fp8_gemm: bool = True) -> BoxFacts:
    versions = probes.gpu.versions()
    return BoxFacts(
        gpus=probes.gpu.gpus(run_fp8_gemm=run_fp8_gemm),
        kernels=probes.kernel.kernels(engine),
        network=probes.network.network(),
        disk=probes.disk.disk(hf_repo),
        driver_version=versions.get("driver_version"),
        torch_version=versions.get("torch_version"),
        cuda_version=versions.get("cuda_version"),
    )


def _torch_attr(dotted: str) -> str | None:
    try:
        import torch
    except ImportError:
        return None
    value: object = torch
    for part in dotted.split("."):
        value = getattr(value, part, None)
    return None if value is None else str(value)


# --- GPUs -------------------------------------------------------------------------------------


class TorchGpuProbe:
    """GPUs as torch sees them, with a real FP8 GEMM on each; nvidia-smi when torch has no CUDA."""

    def gpus(self, *, run_fp8_gemm: bool) -> tuple[GpuFacts, ...]:
        try:
            import torch
        except ImportError:
            return _nvidia_smi_gpus()
        if not torch.cuda.is_available():
            return _nvidia_smi_gpus()
        found = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            is_rocm = getattr(torch.version, "hip", None) is not None
            capability = None if is_rocm else (int(props.major), int(props.minor))
            arch = getattr(props, "gcnArchName", None) if is_rocm else f"sm{props.major}{props.minor}"
            gemm = fp8_gemm(torch.device("cuda", index)) if run_fp8_gemm else Fp8GemmResult(ran=False)
            found.append(GpuFacts(index, str(props.name), capability, int(props.total_memory), arch, gemm))
        return tuple(found)

    def versions(self) -> dict[str, str | None]:
        rows = _run_nvidia_smi(["--query-gpu=driver_version", "--format=csv,noheader"])
        return {
            "driver_version": rows[0].strip() if rows else None,
            "torch_version": _torch_attr("__version__"),
            "cuda_version": _torch_attr("version.cuda"),
        }


def fp8_gemm(device: torch.device | str, *, size: int = FP8_GEMM_SIZE, calls: int = FP8_GEMM_TIMED_CALLS) -> Fp8GemmResult:
    """Run `torch._scaled_mm` on FP8 e4m3 inputs on `device`: correctness first, then TFLOP/s."""
    import time

    import torch

    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return Fp8GemmResult(ran=False, error=f"torch {torch.__version__} has no FP8 matmul")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        return Fp8GemmResult(ran=False, error=_first_line(str(exc)))
    on_gpu = device.type == "cuda"
    # MI300 (gfx942) implements the "fnuz" variant of e4m3; NVIDIA GPUs the OCP one
    fp8 = torch.float8_e4m3fnuz if on_gpu and getattr(torch.version, "hip", None) else torch.float8_e4m3fn

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(device)

    try:
        rel_error = _fp8_check(device, fp8)
        a = torch.randn(size, size, device=device).to(fp8)
        b = torch.randn(size, size, device=device).to(fp8).t()  # column-major, as _scaled_mm requires
        one = torch.tensor(1.0, device=device)
        for _ in range(FP8_GEMM_WARMUP_CALLS):
            torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        sync()
        started = time.perf_counter()
        for _ in range(calls):
            torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        sync()
        elapsed_s = max(time.perf_counter() - started, 1e-9)
        del a, b
        if on_gpu:
            torch.cuda.empty_cache()
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:  # arch, build, OOM
        return Fp8GemmResult(ran=False, error=_first_line(str(exc)))
    tflops = 2.0 * size**3 * calls / elapsed_s / 1e12
    return Fp8GemmResult(ran=True, tflops=float(f"{tflops:.4g}"), max_rel_error=round(rel_error, 4))


def _fp8_check(device: torch.device, fp8: torch.dtype) -> float:
    import torch

    size = FP8_CHECK_SIZE
    a = torch.randn(size, size, device=device).to(fp8)
    b = torch.randn(size, size, device=device).to(fp8).t()
    scale_a = torch.tensor(0.5, device=device)
    scale_b = torch.tensor(2.0, device=device)
    got = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32)
    want = (a.float() * 0.5) @ (b.float() * 2.0)
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


def _run_nvidia_smi(args: list[str]) -> list[str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        done = subprocess.run(
            [exe, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def _nvidia_smi_gpus() -> tuple[GpuFacts, ...]:
    rows = _run_nvidia_smi(
        ["--query-gpu=index,name,compute_cap,memory.total", "--format=csv,noheader,nounits"]
    )
    return tuple(gpu for gpu in (parse_nvidia_smi_row(row) for row in rows) if gpu is not None)


def parse_nvidia_smi_row(row: str) -> GpuFacts | None:
    """`0, NVIDIA H100 80GB HBM3, 9.0, 81559` -> GpuFacts (memory in MiB); None if malformed."""
    parts = [p.strip() for p in row.split(",")]
    if len(parts) != 4:
        return None
    index, name, capability, memory_mib = parts
    try:
        major, minor = (int(x) for x in capability.split("."))
        return GpuFacts(
            int(index), name, (major, minor), int(float(memory_mib)) * 1024 * 1024,
            f"sm{major}{minor}",
            Fp8GemmResult(ran=False, error="torch cannot use these GPUs (no CUDA build of torch, or a "
                                           "driver too old for it)"),
        )
    except ValueError:
        return None


# --- engine kernels ----------------------------------------------------------------------------

_IMPORT_SCRIPT = r"""
import importlib, json, sys


def vllm_ops():
    from vllm.platforms import current_platform
    current_platform.import_kernels()
    import torch
    torch.ops._C.rms_norm  # raises when no custom-op library was loaded
    return importlib.import_module("vllm")


def check(spec):
    if spec == "@vllm_ops":
        return vllm_ops()
    error = None
    for name in spec.split("|"):
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
            if attr and not hasattr(module, attr):
                raise ImportError(module_name + " has no " + attr)
            return module
        except BaseException as exc:  # a broken extension raises anything, even SystemExit
            error = error or exc
    raise error


for role, spec in json.loads(sys.argv[1]).items():
    print("R1NEST-TRY " + role, flush=True)
    try:
        module = check(spec)
        version = getattr(module, "__version__", None) if role == "engine" else None
        print("R1NEST-OK " + json.dumps([role, version]), flush=True)
    except BaseException as exc:
        message = (type(exc).__name__ + ": " + str(exc)).strip().splitlines()[0][:300]
        print("R1NEST-ERR " + json.dumps([role, message]), flush=True)
"""


class SubprocessKernelProbe:
    """Imports the engine's kernel modules in a child Python: a crash there cannot take us down.

    A module that kills the child (SIGILL from a kernel built for another CPU, a segfault in a
    CUDA extension) is reported as such and the child is restarted for the roles left.
    """

    def __init__(
        self,
        python: str = sys.executable,
        timeout_s: float = IMPORT_PROBE_TIMEOUT_S,
        table: dict[str, dict[str, str]] | None = None,
        child_env: dict[str, str] | None = None,
    ) -> None:
        self.python = python
        self.timeout_s = timeout_s
        self.table = table or ENGINE_MODULES
        self.child_env = child_env  # None: inherit ours

    def kernels(self, engine: str) -> KernelFacts:
        pending = dict(self.table[engine])
        modules: dict[str, bool] = {}
        errors: dict[str, str] = {}
        version: str | None = None
        for _ in range(len(pending)):  # at most one restart per role
            if not pending:
                break
            try:
                done = subprocess.run(
                    [self.python, "-c", _IMPORT_SCRIPT, json.dumps(pending)],
                    capture_output=True, text=True, timeout=self.timeout_s, check=False,
                    env=self.child_env,
                )
                stdout, returncode, stderr = done.stdout, done.returncode, done.stderr
            except subprocess.TimeoutExpired as exc:
                stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                returncode, stderr = None, f"took longer than {self.timeout_s:.0f} s"
            except OSError as exc:
                stdout, returncode, stderr = "", None, str(exc)
            trying = None
            for line in stdout.splitlines():
                tag, _, payload = line.partition(" ")
                if tag == "R1NEST-TRY":
                    trying = payload
                elif tag in ("R1NEST-OK", "R1NEST-ERR"):
                    role, value = json.loads(payload)
                    modules[role] = tag == "R1NEST-OK"
                    if tag == "R1NEST-OK" and role == "engine":
                        version = value
                    if tag == "R1NEST-ERR":
                        errors[role] = value
                    pending.pop(role, None)
                    trying = None
            if trying is None:
                break  # the child finished (or never started a role: nothing more to learn)
            modules[trying] = False
            errors[trying] = f"the import killed Python ({_exit_reason(returncode, stderr)})"
            pending.pop(trying, None)
        for role in pending:
            modules.setdefault(role, False)
            errors.setdefault(role, "not checked")
        return KernelFacts(engine, version, {r: modules[r] for r in self.table[engine]}, errors)


def _exit_reason(returncode: int | None, stderr: str) -> str:
    if returncode is not None and returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return _last_line(stderr) or f"exit status {returncode}"


# --- network -------------------------------------------------------------------------------------


class HostNetworkProbe:
    def __init__(self, sys_root: Path = Path("/")) -> None:
        self.sys_root = sys_root

    def network(self) -> NetworkFacts:
        from r1nest.settings import environ_with_prefixes

        ib_dir = self.sys_root / "sys/class/infiniband"
        ib = tuple(sorted(p.name for p in ib_dir.iterdir())) if ib_dir.is_dir() else ()
        efa = tuple(name for name in ib if name.startswith("rdmap") or "efa" in name)
        dev_dir = self.sys_root / "dev/infiniband"
        nodes = tuple(sorted(p.name for p in dev_dir.glob("uverbs*"))) if dev_dir.is_dir() else ()
        return NetworkFacts(
            infiniband_devices=ib,
            efa_devices=efa,
            verbs_device_nodes=nodes,
            fabric_providers=_fabric_providers(),
            nccl_env=environ_with_prefixes("NCCL_", "FI_", "GLOO_SOCKET_IFNAME"),
        )


def _fabric_providers() -> tuple[str, ...]:
    exe = shutil.which("fi_info") or next(
        (p for p in ("/opt/amazon/efa/bin/fi_info",) if Path(p).exists()), None
    )
    if exe is None:
        return ()
    try:
        done = subprocess.run([exe, "-l"], capture_output=True, text=True, timeout=FI_INFO_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return parse_fi_info_list(done.stdout)


def parse_fi_info_list(text: str) -> tuple[str, ...]:
    """`fi_info -l` prints `efa:` / `version: 1.0` pairs; keep the provider names."""
    return tuple(line.strip().rstrip(":") for line in text.splitlines() if line.strip().endswith(":"))


# --- disk ----------------------------------------------------------------------------------------


def hf_cache_dir() -> Path:
    try:
        from huggingface_hub import constants
    except ImportError:
        return Path.home() / ".cache" / "huggingface" / "hub"
    return Path(constants.HF_HUB_CACHE)


class HfCacheDiskProbe:
    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir

    def disk(self, hf_repo: str | None) -> DiskFacts:
        cache = self.cache_dir or hf_cache_dir()
        existing = cache
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent  # the cache may not exist yet: measure where it will be
        free = shutil.disk_usage(existing).free
        cached = 0
        if hf_repo:
            repo_dir = cache / ("models--" + hf_repo.replace("/", "--"))
            if repo_dir.is_dir():
                cached = sum(p.stat().st_size for p in repo_dir.rglob("*") if p.is_file() and not p.is_symlink())
        return DiskFacts(str(cache), free, cached)


def host_probes() -> Probes:
    return Probes(TorchGpuProbe(), SubprocessKernelProbe(), HostNetworkProbe(), HfCacheDiskProbe())


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def _last_line(text: str) -> str:
    """The last line of a child's stderr: where a traceback says what went wrong."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
