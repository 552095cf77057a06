"""Hardware tables: GPU models, AWS GPU instance types and Modal GPU strings, with prices.

Prices are integers (micro-US-dollars per hour) so that plans compare and add exactly.
- AWS: on-demand Linux list prices in us-east-1 from the EC2 On-Demand pricing page
  (https://aws.amazon.com/ec2/pricing/on-demand/), P-family prices after AWS's June 2025 reduction
  of P4/P5 on-demand rates (https://aws.amazon.com/about-aws/whats-new/2025/06/pricing-usage-model-ec2-instances-nvidia-gpus/).
  Read 2025-06/2026-05; prices change, so `r1nest plan` shows them as estimates.
- Modal: per-second GPU prices from https://modal.com/pricing (read 2026-05), times 3600. CPU and
  memory of a Modal container are billed on top and are not included.
GPU memory is what the driver reports (nvidia-smi "Total", MiB), not the marketing figure:
that is what `--gpu-memory-utilization` is a fraction of.
Instance shapes (GPUs, vCPUs, memory, EFA interfaces): the EC2 accelerated-computing instance
specifications (https://docs.aws.amazon.com/ec2/latest/instancetypes/ac.html).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from r1nest.errors import ConfigError

HardwareClass = Literal["hopper", "blackwell", "mi300x", "ampere", "ada", "cpu"]
HARDWARE_CLASSES: tuple[HardwareClass, ...] = ("hopper", "blackwell", "mi300x", "ampere", "ada", "cpu")

MIB = 1024 * 1024
GIB = 1024 * MIB
MICRO_USD = 1_000_000


@dataclass(frozen=True)
class GpuModel:
    name: str
    memory_bytes: int  # as the driver reports it
    nominal_gb: int  # the vendor's figure
    hardware_class: HardwareClass
    compute_capability: tuple[int, int]  # (0, 0) for AMD
    fp8: bool  # FP8 tensor cores: compute capability >= 8.9 (or MI300X)

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


GPUS: dict[str, GpuModel] = {
    g.name: g
    for g in (
        GpuModel("A10G", 23_028 * MIB, 24, "ampere", (8, 6), False),
        GpuModel("L4", 23_034 * MIB, 24, "ada", (8, 9), True),
        GpuModel("L40S", 46_068 * MIB, 48, "ada", (8, 9), True),
        GpuModel("A100-40GB", 40_960 * MIB, 40, "ampere", (8, 0), False),
        GpuModel("A100-80GB", 81_920 * MIB, 80, "ampere", (8, 0), False),
        GpuModel("H100", 81_559 * MIB, 80, "hopper", (9, 0), True),
        GpuModel("H200", 143_771 * MIB, 141, "hopper", (9, 0), True),
        GpuModel("B200", 183_359 * MIB, 180, "blackwell", (10, 0), True),
        # AMD Instinct MI300X: 192 GB HBM3; no AWS or Modal offering, used for local plans.
        GpuModel("MI300X", 196_592 * MIB, 192, "mi300x", (0, 0), True),
    )
}


@dataclass(frozen=True)
class AwsInstanceType:
    name: str
    gpu: str  # key of GPUS
    gpu_count: int
    vcpus: int
    memory_gib: int
    efa_interfaces: int  # 0: no EFA
    network_gbps: int
    price_microusd_per_hour: int  # on-demand, Linux, us-east-1
    quota_family: Literal["G", "P"]  # "Running On-Demand G and VT instances" / "... P instances"
    price_note: str = ""
    on_demand: bool = True  # False: mainly sold as Capacity Blocks; planned only when asked for

    @property
    def gpu_model(self) -> GpuModel:
        return GPUS[self.gpu]

    @property
    def family(self) -> str:
        return self.name.split(".")[0]


def _usd(dollars: str) -> int:
    """'16.288' -> 16_288_000 micro-dollars, exactly (no float rounding)."""
    whole, _, frac = dollars.partition(".")
    return int(whole) * MICRO_USD + int((frac + "000000")[:6])


_P_CUT = "after the June 2025 P4/P5 price reduction"
AWS_INSTANCE_TYPES: dict[str, AwsInstanceType] = {
    t.name: t
    for t in (
        # g5: NVIDIA A10G 24 GB (Ampere, no FP8)
        AwsInstanceType("g5.xlarge", "A10G", 1, 4, 16, 0, 10, _usd("1.006"), "G"),
        AwsInstanceType("g5.2xlarge", "A10G", 1, 8, 32, 0, 10, _usd("1.212"), "G"),
        AwsInstanceType("g5.12xlarge", "A10G", 4, 48, 192, 1, 40, _usd("5.672"), "G"),
        AwsInstanceType("g5.48xlarge", "A10G", 8, 192, 768, 1, 100, _usd("16.288"), "G"),
        # g6: NVIDIA L4 24 GB (Ada)
        AwsInstanceType("g6.xlarge", "L4", 1, 4, 16, 0, 10, _usd("0.8048"), "G"),
        AwsInstanceType("g6.2xlarge", "L4", 1, 8, 32, 0, 10, _usd("0.9776"), "G"),
        AwsInstanceType("g6.12xlarge", "L4", 4, 48, 192, 1, 40, _usd("4.6016"), "G"),
        AwsInstanceType("g6.48xlarge", "L4", 8, 192, 768, 1, 100, _usd("13.3504"), "G"),
        # g6e: NVIDIA L40S 48 GB (Ada)
        AwsInstanceType("g6e.xlarge", "L40S", 1, 4, 32, 0, 20, _usd("1.861"), "G"),
        AwsInstanceType("g6e.2xlarge", "L40S", 1, 8, 64, 0, 20, _usd("2.24208"), "G"),
        AwsInstanceType("g6e.12xlarge", "L40S", 4, 48, 384, 1, 100, _usd("10.49264"), "G"),
        AwsInstanceType("g6e.48xlarge", "L40S", 8, 192, 1536, 4, 400, _usd("30.13118"), "G"),
        # p4d / p4de: NVIDIA A100 40 GB / 80 GB (Ampere, no FP8), NVSwitch, 4 EFA
        AwsInstanceType("p4d.24xlarge", "A100-40GB", 8, 96, 1152, 4, 400, _usd("21.96"), "P", _P_CUT),
        AwsInstanceType("p4de.24xlarge", "A100-80GB", 8, 96, 1152, 4, 400, _usd("27.447"), "P", _P_CUT),
        # p5 / p5e / p5en: H100 80 GB / H200 141 GB (Hopper), 3200 Gbps EFA
        AwsInstanceType("p5.48xlarge", "H100", 8, 192, 2048, 32, 3200, _usd("55.04"), "P", _P_CUT),
        AwsInstanceType("p5e.48xlarge", "H200", 8, 192, 2048, 32, 3200, _usd("59.584"), "P",
                        "estimate: sold mainly as EC2 Capacity Blocks", on_demand=False),
        AwsInstanceType("p5en.48xlarge", "H200", 8, 192, 2048, 16, 3200, _usd("63.296"), "P", _P_CUT),
        # p6-b200: B200 180 GB (Blackwell), 8 x 400 Gbps EFAv4
        AwsInstanceType("p6-b200.48xlarge", "B200", 8, 192, 2048, 8, 3200, _usd("113.9328"), "P",
                        "on-demand list price at launch (2025-05)"),
    )
}


@dataclass(frozen=True)
class ModalGpu:
    name: str  # Modal's GPU string without the count, e.g. "H200"
    gpu: str  # key of GPUS
    price_microusd_per_gpu_hour: int

    @property
    def gpu_model(self) -> GpuModel:
        return GPUS[self.gpu]

    def gpu_string(self, count: int) -> str:
        if not 1 <= count <= MODAL_MAX_GPUS:
            raise ConfigError(f"Modal offers 1 to {MODAL_MAX_GPUS} GPUs per container, not {count}")
        return self.name if count == 1 else f"{self.name}:{count}"


MODAL_MAX_GPUS = 8
MODAL_GPU_COUNTS = (1, 2, 4, 8)
# https://modal.com/pricing, per second: L4 $0.000222, L40S $0.000542, A100 80GB $0.000694,
# H100 $0.001097, H200 $0.001261, B200 $0.001736 (read 2026-05).
MODAL_GPUS: dict[str, ModalGpu] = {
    g.name: g
    for g in (
        ModalGpu("L4", "L4", 222 * 3600),
        ModalGpu("L40S", "L40S", 542 * 3600),
        ModalGpu("A100-80GB", "A100-80GB", 694 * 3600),
        ModalGpu("H100", "H100", 1097 * 3600),
        ModalGpu("H200", "H200", 1261 * 3600),
        ModalGpu("B200", "B200", 1736 * 3600),
    )
}


def get_instance_type(name: str) -> AwsInstanceType:
    spec = AWS_INSTANCE_TYPES.get(name.strip().lower())
    if spec is None:
        raise ConfigError(
            f"unknown or unsupported instance type {name!r}; known: {', '.join(AWS_INSTANCE_TYPES)}"
        )
    return spec


def parse_gpu_string(text: str) -> tuple[str, int]:
    """'H200:8' -> ('H200', 8); 'L4' -> ('L4', 1). Names are GPUS keys (Modal's spelling)."""
    name, _, count_text = text.strip().partition(":")
    canonical = {k.lower(): k for k in GPUS}.get(name.lower())
    if canonical is None:
        raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    try:
        count = int(count_text) if count_text else 1
    except ValueError:
        raise ConfigError(f"bad GPU count in {text!r}") from None
    if not 1 <= count <= 64:
        raise ConfigError(f"GPU count must be 1..64, not {count}")
    return canonical, count


def format_usd_per_hour(microusd: int) -> str:
    return f"${microusd / MICRO_USD:,.2f}/h"
