"""Engine launch profiles (vLLM, SGLang) and the argv / env builders every launcher uses."""

from r1nest.engines.base import (
    EngineName,
    EngineProfile,
    Mode,
    engine_argv,
    engine_env,
    engine_secret_files,
    health_path,
)

__all__ = [
    "EngineName",
    "EngineProfile",
    "Mode",
    "build_profile",
    "engine_argv",
    "engine_env",
    "engine_secret_files",
    "health_path",
]


def build_profile(engine: EngineName, model, **layout) -> EngineProfile:  # type: ignore[no-untyped-def]
    """The engine's profile for a model and a layout (see vllm_profile / sglang_profile)."""
    if engine == "vllm":
        from r1nest.engines.vllm import vllm_profile

        return vllm_profile(model, **layout)
    from r1nest.engines.sglang import sglang_profile

    return sglang_profile(model, **layout)
