"""What `r1nest serve` starts on this box: the planner's engine launch for its GPUs, or the CPU.

    launch = plan_launch(model, engine="vllm", max_model_len=None, local_gpus=detect_local_gpus())

`detect_local_gpus()` reads the NVIDIA GPUs with nvidia-smi ("H100:8", None without any);
`plan_launch()` asks the planner (`cloud="local"`; vLLM's CPU build when there is no GPU).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from r1nest.engines.base import EngineProfile
from r1nest.errors import ConfigError


@dataclass(frozen=True)
class Launch:
    """What serve decided before starting anything."""

    served_model: str
    engine: str
    hardware: str  # "CPU" or e.g. "local (8x H100)"
    profile: EngineProfile
    weight_bytes: int


def detect_local_gpus() -> str | None:
    """'H100:8' for this box's NVIDIA GPUs (nvidia-smi), or None when there are none."""
    if shutil.which("nvidia-smi") is None:
        return None
    from r1nest.doctor import match_gpu_model
    from r1nest.gpu_probe import _nvidia_smi_gpus

    gpus = _nvidia_smi_gpus()
    if not gpus:
        return None
    model = match_gpu_model(gpus[0])
    if model is None:
        raise ConfigError(f"this box's GPU ({gpus[0].name}) is not in r1nest's hardware table")
    return f"{model.name}:{len(gpus)}"


def plan_launch(model: str, *, engine: str, max_model_len: int | None, local_gpus: str | None) -> Launch:
    """The planner's launch of `model` (a catalog id or a checkpoint directory) on this box."""
    from r1nest.catalog import resolve_model
    from r1nest.planner import plan

    spec = resolve_model(model)
    chosen = plan(spec, "local", context=max_model_len, engine=engine,  # type: ignore[arg-type]
                  local_gpus=local_gpus, hardware_class=None if local_gpus else "cpu")
    return Launch(served_model=chosen.profile.served_model_name, engine=chosen.engine,
                  hardware=chosen.hardware, profile=chosen.profile, weight_bytes=spec.weight_bytes)
