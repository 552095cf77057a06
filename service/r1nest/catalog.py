"""The model catalog: the DeepSeek-R1 family and its six distills, as plain numbers with sources.

Every figure below says where it comes from. "config.json" means the model repository's own
`config.json` on Hugging Face (for the distills, the distill repository, whose shapes are those of
its base model); "card" means the model card (README) of that repository.

KV cache bytes per token (what the planner divides free GPU memory by):
- MLA (DeepSeek-V3 architecture) caches one compressed latent per layer and token:
  (kv_lora_rank + qk_rope_head_dim) x layers x dtype bytes = (512 + 64) x 61 x 2 = 70,272 B in
  BF16, 35,136 B in FP8.
- GQA (Qwen2 / Llama distills) caches K and V for every KV head:
  2 x layers x kv_heads x head_dim x dtype bytes.

Weights revision: every Hub entry is pinned to one commit of its model repository (a 40-hex sha,
passed to the engine as `--revision` and to every download), so a deployment serves the same
bytes next month as today. An entry whose commit no public record establishes says so: its
revision is UNPINNED and `revision_source` says why; the engine then loads the repository's main
branch and the launcher and `r1nest doctor` record the commit that was actually downloaded.

`local_model(path)` derives the same description from a checkpoint directory's `config.json` (the
tiny random-weight test models that `r1nest dev tiny-model` writes).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from r1nest.errors import ConfigError

Architecture = Literal["deepseek_v3", "qwen2", "llama"]
WeightDtype = Literal["fp8", "bf16", "fp16", "fp32"]
KvDtype = Literal["auto", "bf16", "fp16", "fp32", "fp8"]

DTYPE_BYTES: dict[str, int] = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}

# DeepSeek's usage recommendations (R1 README "Usage Recommendations"; NVIDIA NIM card).
DEEPSEEK_TEMPERATURE = 0.6
DEEPSEEK_TOP_P = 0.95

# A Hugging Face commit: what `revision` pins. UNPINNED marks an entry without a citable commit.
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
UNPINNED = "unpinned"


@dataclass(frozen=True)
class ModelSpec:
    """One servable model: identity, shapes, memory, chat conventions, licence."""

    id: str
    hf_repo: str  # Hugging Face repo id, or a local directory for local_model()
    architecture: Architecture
    params_total: int
    params_active: int  # == params_total for dense models
    weight_dtype: WeightDtype
    weight_bytes: int  # bytes of the checkpoint's weight files, i.e. what must sit in GPU memory
    num_layers: int
    num_attention_heads: int
    native_context: int  # max_position_embeddings of config.json
    # attention cache shape: MLA (kv_lora_rank, qk_rope_head_dim) or GQA (num_kv_heads, head_dim)
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    # MoE (0 for dense models)
    n_routed_experts: int = 0
    experts_per_token: int = 0
    expert_weight_fraction: float = 0.0  # share of weight_bytes in routed experts (EP shards these)
    mtp_layers: int = 0  # num_nextn_predict_layers: the MTP head used for speculative decoding
    # conventions
    base_model: str = ""
    default_context: int = 32_768
    reasoning_parser_vllm: str = "deepseek_r1"
    reasoning_parser_sglang: str = "deepseek-r1"
    tool_call_parser_vllm: str | None = None
    tool_call_parser_sglang: str | None = None
    tool_chat_template: str | None = None  # file name of the engines' tool-aware chat template
    forces_think_prefix: bool = True  # the chat template appends "<think>\n" to the prompt
    system_prompt_supported: bool = False
    temperature: float = DEEPSEEK_TEMPERATURE
    top_p: float = DEEPSEEK_TOP_P
    licence: str = "MIT"
    notes: str = ""
    sources: tuple[str, ...] = field(default_factory=tuple)
    is_local: bool = False
    # weights revision: a 40-hex Hub commit, UNPINNED, or "" for a local checkpoint directory
    revision: str = ""
    revision_source: str = ""  # where the commit is recorded; for UNPINNED, why there is none

    @property
    def revision_pinned(self) -> bool:
        return bool(COMMIT_RE.match(self.revision))

    @property
    def engine_revision(self) -> str | None:
        """What the engine's --revision and every download get: the commit, or None (main)."""
        return self.revision if self.revision_pinned else None

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def family(self) -> Literal["r1", "distill", "local"]:
        if self.is_local:
            return "local"
        return "r1" if self.architecture == "deepseek_v3" else "distill"

    @property
    def needs_fp8_hardware(self) -> bool:
        """FP8 block-quantized checkpoints need FP8 tensor cores (compute capability >= 8.9)."""
        return self.weight_dtype == "fp8"

    def kv_bytes_per_token(self, kv_dtype: KvDtype = "auto") -> int:
        """KV cache bytes one token occupies across all layers (whole model, unsharded)."""
        if kv_dtype == "auto":
            kv_dtype = "bf16" if self.weight_dtype == "fp8" else self.weight_dtype
        dtype_bytes = DTYPE_BYTES[kv_dtype]
        if self.uses_mla:
            return (self.kv_lora_rank + self.qk_rope_head_dim) * self.num_layers * dtype_bytes
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


# --- the R1 family ---------------------------------------------------------------------------
# Shapes: deepseek-ai/DeepSeek-R1 config.json (architecture DeepseekV3ForCausalLM): 61 layers,
# 128 heads, kv_lora_rank 512, qk_rope_head_dim 64, 256 routed experts + 1 shared, 8 per token,
# num_nextn_predict_layers 1, max_position_embeddings 163840 (the card says 128K context).
# Parameters: card, 671B total / 37B activated (685B on the Hub incl. the 14B MTP module).
# Weight bytes: 688,586,727,753 B of FP8 (e4m3, 128x128 block scales) safetensors in the
# DeepSeek-V3 repository; R1, R1-0528 and R1-Zero ship the same tensor layout ("~0.69 TB").
# Expert share: 58 MoE layers x 256 experts x 3 x 7168 x 2048 = 653.9B of 671B params (97.4%).
_R1_SHAPES = dict(
    architecture="deepseek_v3",
    params_total=671_000_000_000,
    params_active=37_000_000_000,
    weight_dtype="fp8",
    weight_bytes=688_586_727_753,
    num_layers=61,
    num_attention_heads=128,
    native_context=163_840,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    n_routed_experts=256,
    experts_per_token=8,
    expert_weight_fraction=0.974,
    mtp_layers=1,
    base_model="DeepSeek-V3-Base",
    default_context=65_536,
    licence="MIT (code and weights; commercial use and distillation allowed)",
)
_R1_SOURCES = (
    "https://huggingface.co/deepseek-ai/DeepSeek-R1 (card, config.json)",
    "https://github.com/deepseek-ai/DeepSeek-R1 (README: models, usage recommendations)",
)

# --- weights revisions -----------------------------------------------------------------------
# Each commit below is one the Hub served as the repository's main branch: the Hub names a
# downloaded snapshot directory after its commit (hub/models--<org>--<name>/snapshots/<sha>), and
# each of these shas is recorded that way, or as an explicit `revision=` pin, by several unrelated
# public projects (docs/models.md, "Weights revisions", lists them). For DeepSeek-R1 the Hub's own
# model metadata (`sha`) is recorded too. None of them is typed from memory.


def _snapshot_source(repo: str, revision: str) -> str:
    return (f"https://huggingface.co/{repo}/commit/{revision} (the snapshot the Hub served for main, "
            "recorded by independent public projects)")


# --- the distills ----------------------------------------------------------------------------
# Shapes: each distill's config.json (= its base model's): layers, attention heads, KV heads,
# head_dim = hidden_size / heads = 128 for all six; max_position_embeddings 131072.
# Parameter counts: the Hub's safetensors metadata ("Model size") of each distill repository.
# Weights are BF16: weight_bytes = 2 x params (the Hub's file sizes agree within 1%).
# Bases and licences: R1 README "DeepSeek-R1-Distill Models" and "License" (the distills are MIT
# with the upstream licence of their base: Qwen2.5 is Apache-2.0, Llama 3.1 / 3.3 their community
# licences).


def _distill(
    id: str,
    repo: str,
    architecture: Architecture,
    params: int,
    layers: int,
    heads: int,
    kv_heads: int,
    base: str,
    licence: str,
    revision: str,
) -> ModelSpec:
    return ModelSpec(
        id=id,
        hf_repo=repo,
        architecture=architecture,
        params_total=params,
        params_active=params,
        weight_dtype="bf16",
        weight_bytes=2 * params,
        num_layers=layers,
        num_attention_heads=heads,
        native_context=131_072,
        num_kv_heads=kv_heads,
        head_dim=128,
        base_model=base,
        default_context=32_768,
        licence=licence,
        notes="dense; same usage as its base model; DeepSeek's sampling recommendations apply",
        sources=(
            f"https://huggingface.co/{repo} (card, config.json)",
            "https://github.com/deepseek-ai/DeepSeek-R1 (README: distilled models, licence)",
        ),
        revision=revision,
        revision_source=_snapshot_source(repo, revision),
    )


_QWEN_LICENCE = "MIT; derived from {base} (Apache-2.0)"
_LLAMA_LICENCE = "MIT; derived from {base}: subject to the {licence}"

MODELS: dict[str, ModelSpec] = {
    m.id: m
    for m in (
        ModelSpec(
            id="deepseek-r1",
            hf_repo="deepseek-ai/DeepSeek-R1",
            revision="56d4cbbb4d29f4355bab4b9a39ccb717a14ad5ad",
            revision_source=(
                "https://huggingface.co/deepseek-ai/DeepSeek-R1/commit/56d4cbbb4d29f4355bab4b9a39ccb717a14ad5ad "
                "(what the Hub's model metadata reports as main, `sha`; also pinned by independent public "
                "projects)"
            ),
            forces_think_prefix=True,
            notes=(
                "The chat template ends the prompt with '<think>\\n' so the model always reasons; "
                "the output then has no opening <think> tag and the reasoning parser expects that. "
                "No system prompt: fold it into the first user turn."
            ),
            sources=_R1_SOURCES,
            **_R1_SHAPES,  # type: ignore[arg-type]
        ),
        ModelSpec(
            id="deepseek-r1-0528",
            hf_repo="deepseek-ai/DeepSeek-R1-0528",
            revision="4236a6af538feda4548eca9ab308586007567f52",
            revision_source=_snapshot_source("deepseek-ai/DeepSeek-R1-0528",
                                             "4236a6af538feda4548eca9ab308586007567f52"),
            forces_think_prefix=False,
            system_prompt_supported=True,
            tool_call_parser_vllm="deepseek_v3",
            tool_call_parser_sglang="deepseekv3",
            tool_chat_template="tool_chat_template_deepseekr1.jinja",
            notes=(
                "Card: system prompts are supported and '<think>\\n' need not be forced. "
                "JSON output and function calling: serve with the tool-call parser and the "
                "engines' DeepSeek-R1 tool chat template."
            ),
            sources=(
                "https://huggingface.co/deepseek-ai/DeepSeek-R1-0528 (card, config.json)",
                "https://docs.vllm.ai/en/latest/features/tool_calling.html (DeepSeek-V3 / R1-0528)",
            ),
            **_R1_SHAPES,  # type: ignore[arg-type]
        ),
        ModelSpec(
            id="deepseek-r1-zero",
            hf_repo="deepseek-ai/DeepSeek-R1-Zero",
            revision=UNPINNED,
            revision_source=(
                "no public record shows which commit the Hub serves as main: the only commit seen is "
                "9cc4dfb (a README revision, through a Hub mirror), with nothing to say it is the "
                "newest or that it carries the final weights and tokenizer. The engine loads main; the "
                "launcher and `r1nest doctor` record the commit actually downloaded"
            ),
            forces_think_prefix=False,
            notes=(
                "Research model (RL without SFT): the card warns of endless repetition, poor "
                "readability and language mixing. Same architecture and tags as R1."
            ),
            sources=(
                "https://huggingface.co/deepseek-ai/DeepSeek-R1-Zero (card, config.json)",
            ),
            **_R1_SHAPES,  # type: ignore[arg-type]
        ),
        # Qwen2.5-Math-1.5B: 28 layers, 12 heads, 2 KV heads; 1.78B params (untied embeddings)
        _distill("deepseek-r1-distill-qwen-1.5b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
                 "qwen2", 1_777_088_000, 28, 12, 2, "Qwen2.5-Math-1.5B",
                 _QWEN_LICENCE.format(base="Qwen2.5-Math-1.5B"),
                 "ad9f0ae0864d7fbcd1cd905e3c6c5b069cc8b562"),
        # Qwen2.5-Math-7B: 28 layers, 28 heads, 4 KV heads; 7.62B params
        _distill("deepseek-r1-distill-qwen-7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
                 "qwen2", 7_615_616_512, 28, 28, 4, "Qwen2.5-Math-7B",
                 _QWEN_LICENCE.format(base="Qwen2.5-Math-7B"),
                 "916b56a44061fd5cd7d6a8fb632557ed4f724f60"),
        # Llama-3.1-8B: 32 layers, 32 heads, 8 KV heads; 8.03B params
        _distill("deepseek-r1-distill-llama-8b", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
                 "llama", 8_030_261_248, 32, 32, 8, "Llama-3.1-8B",
                 _LLAMA_LICENCE.format(base="Llama-3.1-8B", licence="Llama 3.1 Community License"),
                 "6a6f4aa4197940add57724a7707d069478df56b1"),
        # Qwen2.5-14B: 48 layers, 40 heads, 8 KV heads; 14.8B params
        _distill("deepseek-r1-distill-qwen-14b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
                 "qwen2", 14_770_033_664, 48, 40, 8, "Qwen2.5-14B",
                 _QWEN_LICENCE.format(base="Qwen2.5-14B"),
                 "1df8507178afcc1bef68cd8c393f61a886323761"),
        # Qwen2.5-32B: 64 layers, 40 heads, 8 KV heads; 32.8B params
        _distill("deepseek-r1-distill-qwen-32b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
                 "qwen2", 32_763_876_352, 64, 40, 8, "Qwen2.5-32B",
                 _QWEN_LICENCE.format(base="Qwen2.5-32B"),
                 "711ad2ea6aa40cfca18895e8aca02ab92df1a746"),
        # Llama-3.3-70B-Instruct: 80 layers, 64 heads, 8 KV heads; 70.6B params
        _distill("deepseek-r1-distill-llama-70b", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
                 "llama", 70_553_706_496, 80, 64, 8, "Llama-3.3-70B-Instruct",
                 _LLAMA_LICENCE.format(base="Llama-3.3-70B-Instruct",
                                       licence="Llama 3.3 Community License"),
                 "b1c0b44b4369b597ad119a196caf79a9c40e141e"),
    )
}


def revision_problem(spec: ModelSpec) -> str | None:
    """Why `spec`'s weights revision is not acceptable, or None.

    A Hub entry needs a 40-hex commit with the place it is recorded, or UNPINNED with the reason;
    a local checkpoint directory has no revision.
    """
    if spec.is_local:
        return None if not spec.revision else f"{spec.id}: a local checkpoint has no Hub revision"
    if spec.revision_pinned:
        return None if spec.revision_source.strip() else f"{spec.id}: pinned to {spec.revision} without a source"
    if spec.revision == UNPINNED:
        return None if spec.revision_source.strip() else f"{spec.id}: unpinned without a reason"
    if not spec.revision:
        return f"{spec.id}: no weights revision (a 40-hex Hub commit, or {UNPINNED!r} with the reason)"
    return f"{spec.id}: revision {spec.revision!r} is neither a 40-hex Hub commit nor {UNPINNED!r}"


def get_model(model_id: str) -> ModelSpec:
    """The catalog entry for an id (case-insensitive); ConfigError listing the known ids."""
    spec = MODELS.get(model_id.strip().lower())
    if spec is None:
        raise ConfigError(
            f"unknown model {model_id!r}; known models: {', '.join(MODELS)} "
            "(or a local checkpoint directory)"
        )
    return spec


def resolve_model(model: str | ModelSpec) -> ModelSpec:
    """A catalog id, a checkpoint directory, or an already resolved spec."""
    if isinstance(model, ModelSpec):
        return model
    if model.strip().lower() in MODELS:
        return get_model(model)
    if Path(model).is_dir():
        return local_model(model)
    return get_model(model)  # raises with the list of ids


# --- local checkpoints -------------------------------------------------------------------------

_ARCHITECTURES: dict[str, Architecture] = {"deepseek_v3": "deepseek_v3", "qwen2": "qwen2", "llama": "llama"}
_TORCH_DTYPES: dict[str, WeightDtype] = {
    "bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float": "fp32", "half": "fp16",
}
MAX_CONFIG_BYTES = 1024 * 1024


def local_model(path: str | Path) -> ModelSpec:
    """A ModelSpec for a checkpoint directory (id = the directory name), from its config.json."""
    directory = Path(path).expanduser().resolve()
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{directory} is not a model checkpoint: no config.json")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{config_path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {config_path}: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} is not a JSON object")
    weight_bytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return spec_from_config(config, model_id=directory.name, location=str(directory),
                            weight_bytes=weight_bytes)


def spec_from_config(
    config: dict[str, Any], *, model_id: str, location: str, weight_bytes: int
) -> ModelSpec:
    """Pure part of local_model(): a Hugging Face config dict -> ModelSpec."""
    model_type = str(config.get("model_type", ""))
    architecture = _ARCHITECTURES.get(model_type)
    if architecture is None:
        raise ConfigError(
            f"unsupported model_type {model_type!r} in {location}; "
            f"supported: {', '.join(_ARCHITECTURES)}"
        )
    weight_dtype = _weight_dtype(config)
    layers = _config_int(config, location, "num_hidden_layers")
    heads = _config_int(config, location, "num_attention_heads")
    hidden = _config_int(config, location, "hidden_size")
    context = _config_int(config, location, "max_position_embeddings", 4096)
    params = weight_bytes // DTYPE_BYTES[weight_dtype] if weight_bytes else 0
    common: dict[str, Any] = dict(
        id=model_id,
        hf_repo=location,
        architecture=architecture,
        params_total=params,
        weight_dtype=weight_dtype,
        weight_bytes=weight_bytes,
        num_layers=layers,
        num_attention_heads=heads,
        native_context=context,
        default_context=context,  # the checkpoint's own; the CPU plan caps it by KV memory
        is_local=True,
        licence="local checkpoint",
        sources=(f"{location}/config.json",),
    )
    if architecture == "deepseek_v3":
        return ModelSpec(**_mla_moe_fields(config, location, params), **common)
    return ModelSpec(**_dense_fields(config, location, params, heads, hidden, architecture), **common)


def _config_int(config: dict[str, Any], location: str, key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{location}/config.json: {key} must be a non-negative integer")
    return value


def _weight_dtype(config: dict[str, Any]) -> WeightDtype:
    """FP8 for a checkpoint quantized by the fp8 method, else its torch dtype (default bf16)."""
    quant = config.get("quantization_config") or {}
    if isinstance(quant, dict) and quant.get("quant_method") == "fp8":
        return "fp8"
    torch_dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return _TORCH_DTYPES.get(torch_dtype, "bf16")


def _mla_moe_fields(config: dict[str, Any], location: str, params: int) -> dict[str, Any]:
    """A DeepSeek-V3-architecture checkpoint: MLA's latent sizes, the routed experts, MTP layers."""
    routed = _config_int(config, location, "n_routed_experts", 0)
    per_token = _config_int(config, location, "num_experts_per_tok", 0)
    active = params
    if routed:
        active = max(1, params * per_token // routed) if params else 0
    return dict(
        params_active=active,
        kv_lora_rank=_config_int(config, location, "kv_lora_rank"),
        qk_rope_head_dim=_config_int(config, location, "qk_rope_head_dim"),
        n_routed_experts=routed,
        experts_per_token=per_token,
        expert_weight_fraction=0.9 if routed else 0.0,
        mtp_layers=_config_int(config, location, "num_nextn_predict_layers", 0),
        notes="local DeepSeek-V3-architecture checkpoint (MLA + MoE)",
    )


def _dense_fields(config: dict[str, Any], location: str, params: int, heads: int, hidden: int,
                  architecture: Architecture) -> dict[str, Any]:
    """A dense checkpoint with grouped-query attention: its KV heads and head size."""
    head_dim = config.get("head_dim") or (hidden // heads if heads else 0)
    return dict(
        params_active=params,
        num_kv_heads=_config_int(config, location, "num_key_value_heads", heads),
        head_dim=int(head_dim),
        notes=f"local {architecture} checkpoint (dense, GQA)",
    )

