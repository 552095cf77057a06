"""Tiny random-weight checkpoints of the real architectures, for tests, demos and benchmarks.

`write_tiny_model(out_dir, arch=...)` writes, from a fixed seed and with no hub download:

- `config.json` of the real architecture (`DeepseekV3ForCausalLM`: MLA + MoE with noaux_tc
  routing; or `Qwen2ForCausalLM`, the distills' architecture) with dimensions the vLLM CPU
  backend accepts (MLA latent 512 + rope 64 = 576, the one size its CPU MLA kernel compiles for;
  Qwen2 head size 64);
- `model.safetensors` with the checkpoint's real tensor names (DeepSeek's FP8 layout with
  `--fp8`: float8_e4m3fn Linear weights with float32 128x128 block `weight_scale_inv`);
- a small byte-level BPE tokenizer trained here on a built-in corpus, with DeepSeek-R1's special
  tokens and chat template (generation prompt `<｜Assistant｜><think>\\n`).

The weights are random, so the model talks nonsense, except along one planted path: the
embeddings are large random vectors that dominate the residual stream, and `lm_head` has rows
that map the embedding of each token of a short script to the next one. After the chat
template's `<think>\\n` the model therefore writes a few reasoning words, `</think>`, then
content that cycles until `max_tokens`, even when sampling at temperature 0.6. Tests can count
on both `reasoning_content` and `content` being non-empty.

torch, safetensors and tokenizers are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Arch = Literal["deepseek_v3", "qwen2"]
ARCHES: tuple[Arch, ...] = ("deepseek_v3", "qwen2")
DEFAULT_SEED = 0

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT)
THINK_TOKENS = (THINK_START, THINK_END)

# DeepSeek-R1's chat template (tokenizer_config.json of deepseek-ai/DeepSeek-R1 after its
# January 2025 update): system prompts go first without a role tag, earlier reasoning is cut
# from assistant turns, and the generation prompt opens the reasoning block with `<think>\n`.
R1_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

# The planted script: the reasoning the model "thinks" after `<think>\n`, then its answer.
# Every token of the path must be distinct (the next token depends on the current one only);
# make_transitions() refuses a script that breaks this.
SCRIPT_REASONING = "Okay, the user greets me so I should reply briefly."
SCRIPT_CONTENT = "Hello from a tiny random model!"

# A small built-in corpus: enough text for a few hundred BPE merges, including the script.
CORPUS = """
DeepSeek-R1 is a reasoning model. It thinks first, inside a reasoning block, and then answers.
The reasoning is returned as reasoning_content and the answer as content.
Okay, the user greets me so I should reply briefly. Hello from a tiny random model!
A metered API counts prompt tokens and completion tokens and charges credits for each request.
Every key has a balance. The gateway reserves credits before a request and settles them after it.
The engine runs on a GPU, or on a CPU for tests, and streams tokens back as server-sent events.
Mixture of experts models route each token to a few experts; multi-head latent attention keeps a
small cache per token. FP8 weights halve the memory of BF16 weights.
What is the capital of France? The capital of France is Paris.
Write a short poem about the sea. The sea is wide and blue, the waves come and go.
Explain why the sky is blue. Sunlight scatters in the air, and blue light scatters the most.
How many tokens per second can one server produce? It depends on the batch and the model size.
def add(a, b):
    return a + b
print(add(2, 3))
1 2 3 4 5 6 7 8 9 10 100 1000
""".strip()


@dataclass(frozen=True)
class TinyShape:
    """Dimensions of one tiny architecture (names follow the Hugging Face config keys)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    extra: dict[str, Any]


DEEPSEEK_V3_SHAPE = TinyShape(
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=512,
    extra={
        # MLA: the CPU MLA kernel compiles only for kv_lora_rank 512 + qk_rope_head_dim 64.
        "q_lora_rank": 256,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        # MoE: layer 0 dense, layer 1 routed (8 experts, top-2 of 2 groups) + 1 shared expert.
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "moe_intermediate_size": 128,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    },
)

QWEN2_SHAPE = TinyShape(
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,  # head size 64, one the CPU attention backend accepts
    intermediate_size=512,
    extra={"num_key_value_heads": 2},
)

FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
EMBED_STD = 1.0  # large: the token's own embedding dominates the residual stream
WEIGHT_STD = 0.02
# The tiny models' native context: long enough for the references' examples (NVIDIA asks for
# max_tokens 4096 on top of the prompt); vLLM's CPU KV cache holds it easily (MLA: 2.3 KB/token).
TINY_CONTEXT = 16_384
PATH_LOGIT_GAIN = 2.0  # logit margin of the planted path, in units of sqrt(hidden_size)

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# config.json


def model_config(arch: Arch, *, vocab_size: int, bos_id: int, eos_id: int, fp8: bool = False) -> dict[str, Any]:
    """The Hugging Face config.json of the tiny model (pure)."""
    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHES)}")
    if fp8 and arch != "deepseek_v3":
        raise ValueError("--fp8 is DeepSeek's FP8 checkpoint layout: use it with --arch deepseek_v3")
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "max_position_embeddings": TINY_CONTEXT,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "initializer_range": WEIGHT_STD,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
    }
    if arch == "deepseek_v3":
        shape = DEEPSEEK_V3_SHAPE
        config = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **common,
            "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size,
            "num_hidden_layers": shape.num_hidden_layers,
            "num_attention_heads": shape.num_attention_heads,
            "num_key_value_heads": shape.num_attention_heads,
            **shape.extra,
            "num_nextn_predict_layers": 0,
            "rope_theta": 10000,
            "rope_scaling": None,
            "attention_bias": False,
        }
        if fp8:
            config["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            }
        return config
    shape = QWEN2_SHAPE
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **common,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        **shape.extra,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": shape.num_hidden_layers,
    }


# ---------------------------------------------------------------------------------------------
# tensor layout


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes, as the real checkpoints of the architecture name them (pure)."""
    h, v = config["hidden_size"], config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}

    def mlp(prefix: str, inner: int) -> None:
        shapes[f"{prefix}.gate_proj.weight"] = (inner, h)
        shapes[f"{prefix}.up_proj.weight"] = (inner, h)
        shapes[f"{prefix}.down_proj.weight"] = (h, inner)

    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        if config["model_type"] == "deepseek_v3":
            heads = config["num_attention_heads"]
            nope, rope, vdim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
            q_lora, kv_lora = config["q_lora_rank"], config["kv_lora_rank"]
            a = f"{p}.self_attn"
            shapes[f"{a}.q_a_proj.weight"] = (q_lora, h)
            shapes[f"{a}.q_a_layernorm.weight"] = (q_lora,)
            shapes[f"{a}.q_b_proj.weight"] = (heads * (nope + rope), q_lora)
            shapes[f"{a}.kv_a_proj_with_mqa.weight"] = (kv_lora + rope, h)
            shapes[f"{a}.kv_a_layernorm.weight"] = (kv_lora,)
            shapes[f"{a}.kv_b_proj.weight"] = (heads * (nope + vdim), kv_lora)
            shapes[f"{a}.o_proj.weight"] = (h, heads * vdim)
            if i < config["first_k_dense_replace"]:
                mlp(f"{p}.mlp", config["intermediate_size"])
            else:
                experts = config["n_routed_experts"]
                shapes[f"{p}.mlp.gate.weight"] = (experts, h)
                shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (experts,)
                for e in range(experts):
                    mlp(f"{p}.mlp.experts.{e}", config["moe_intermediate_size"])
                mlp(f"{p}.mlp.shared_experts", config["moe_intermediate_size"] * config["n_shared_experts"])
        else:
            heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
            head_dim = h // heads
            a = f"{p}.self_attn"
            shapes[f"{a}.q_proj.weight"] = (heads * head_dim, h)
            shapes[f"{a}.q_proj.bias"] = (heads * head_dim,)
            shapes[f"{a}.k_proj.weight"] = (kv_heads * head_dim, h)
            shapes[f"{a}.k_proj.bias"] = (kv_heads * head_dim,)
            shapes[f"{a}.v_proj.weight"] = (kv_heads * head_dim, h)
            shapes[f"{a}.v_proj.bias"] = (kv_heads * head_dim,)
            shapes[f"{a}.o_proj.weight"] = (h, heads * head_dim)
            mlp(f"{p}.mlp", config["intermediate_size"])
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def fp8_quantized(name: str) -> bool:
    """Whether DeepSeek's FP8 checkpoint stores this tensor as float8 with a block scale (pure).

    Quantized: every attention, MLP and expert Linear. Kept in high precision: embeddings,
    norms, the router (`mlp.gate.weight`, `e_score_correction_bias`) and `lm_head`.
    """
    if not name.endswith(".weight") or name.startswith(("model.embed_tokens", "lm_head", "model.norm")):
        return False
    if "layernorm" in name or name.endswith("mlp.gate.weight"):
        return False
    return ".self_attn." in name or ".mlp." in name


def scale_inv_shape(weight_shape: tuple[int, ...], block: int = FP8_BLOCK) -> tuple[int, int]:
    out_features, in_features = weight_shape
    return (math.ceil(out_features / block), math.ceil(in_features / block))


def make_transitions(path: list[int]) -> dict[int, int]:
    """token -> next token along the planted path; the last token loops back (pure).

    `path` is the token sequence; the content part cycles, so the caller passes the loop target
    as the path's last element. A token may appear once as a source only.
    """
    transitions: dict[int, int] = {}
    for current, following in zip(path, path[1:]):
        if current in transitions and transitions[current] != following:
            raise ValueError(f"token {current} appears twice in the planted script with different successors")
        transitions[current] = following
    return transitions


# ---------------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer(vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer trained on CORPUS, with R1's special and thinking tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # "\n\n" on its own, so that the paragraph break of R1's "</think>\n\n" becomes one token.
    tokenizer.train_from_iterator([*CORPUS.splitlines(), "\n\n", "\n\n"], trainer=trainer)
    # As in R1's tokenizer: the thinking tags are added tokens, not special ones, so they stay in
    # the decoded text where the deepseek_r1 reasoning parser looks for them.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tokenizer


def tokenizer_config(max_length: int = TINY_CONTEXT) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "legacy": True,
        "chat_template": R1_CHAT_TEMPLATE,
    }


def planted_path(tokenizer: Any) -> list[int]:
    """Token ids: `\\n` (end of the generation prompt), reasoning, `</think>`, `\\n\\n`, content,
    and `\\n\\n` again: the answer then repeats, one paragraph after another."""

    def ids(text: str) -> list[int]:
        encoded: list[int] = tokenizer.encode(text, add_special_tokens=False).ids
        return encoded

    paragraph_break = ids("\n\n")
    return ids("\n") + ids(SCRIPT_REASONING) + [tokenizer.token_to_id(THINK_END)] + paragraph_break + ids(SCRIPT_CONTENT) + paragraph_break


# ---------------------------------------------------------------------------------------------
# weights


def make_weights(config: dict[str, Any], transitions: dict[int, int], *, seed: int) -> dict[str, Any]:
    """Random tensors (float32) for every checkpoint name, with the planted path in lm_head."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in tensor_shapes(config).items():
        if name.endswith("norm.weight") or "layernorm" in name:
            tensors[name] = torch.ones(shape)
        elif name.endswith(("e_score_correction_bias", ".bias")):
            tensors[name] = torch.zeros(shape)
        else:
            std = EMBED_STD if name == "model.embed_tokens.weight" else WEIGHT_STD
            tensors[name] = torch.randn(shape, generator=generator) * std
    embed = tensors["model.embed_tokens.weight"]
    lm_head = tensors["lm_head.weight"]
    for current, following in transitions.items():
        direction = embed[current] / embed[current].norm()
        lm_head[following] += PATH_LOGIT_GAIN * direction
    # The final RMSNorm gives the hidden state a norm of sqrt(hidden); the planted logit is then
    # about PATH_LOGIT_GAIN * sqrt(hidden) (32 for hidden 256), other rows about +-PATH_LOGIT_GAIN.
    return tensors


def quantize_fp8_blockwise(weight: Any, block: int = FP8_BLOCK) -> tuple[Any, Any]:
    """(float8_e4m3fn weight, float32 weight_scale_inv) with one scale per block x block tile.

    DeepSeek's convention: dequantized = fp8 * scale_inv, scale_inv = amax(tile) / 448.
    """
    import torch

    out_features, in_features = weight.shape
    rows, cols = scale_inv_shape((out_features, in_features), block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32)
    padded[:out_features, :in_features] = weight.float()
    tiles = padded.view(rows, block, cols, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    quantized = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    quantized = quantized.view(rows * block, cols * block)[:out_features, :in_features]
    return quantized.to(torch.float8_e4m3fn).contiguous(), scale_inv.contiguous()


def dequantize_fp8_blockwise(quantized: Any, scale_inv: Any, block: int = FP8_BLOCK) -> Any:
    scale = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)
    out_features, in_features = quantized.shape
    return quantized.float() * scale[:out_features, :in_features]


def to_checkpoint(tensors: dict[str, Any], *, fp8: bool) -> dict[str, Any]:
    """BF16 everywhere; with fp8, DeepSeek's layout (float8 Linear weights + float32 scale_inv,
    float32 router bias)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if fp8 and fp8_quantized(name):
            out[name], out[name + "_scale_inv"] = quantize_fp8_blockwise(tensor)
        elif fp8 and name.endswith("e_score_correction_bias"):
            out[name] = tensor.float().contiguous()
        else:
            out[name] = tensor.to(torch.bfloat16).contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# the whole checkpoint


def write_tiny_model(
    out_dir: Path, *, arch: Arch = "deepseek_v3", fp8: bool = False, seed: int = DEFAULT_SEED,
    progress: Progress = _quiet,
) -> Path:
    """Write a complete tiny checkpoint into out_dir (created; existing files are replaced)."""
    from safetensors.torch import save_file

    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHES)}")
    if fp8 and arch != "deepseek_v3":
        raise ValueError("--fp8 is DeepSeek's FP8 checkpoint layout: use it with --arch deepseek_v3")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    progress("training the byte-level BPE tokenizer on the built-in corpus")
    tokenizer = build_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}, indent=2, ensure_ascii=False) + "\n"
    )

    config = model_config(
        arch, vocab_size=tokenizer.get_vocab_size(), bos_id=tokenizer.token_to_id(BOS),
        eos_id=tokenizer.token_to_id(EOS), fp8=fp8,
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                    "do_sample": True, "temperature": 0.6, "top_p": 0.95}, indent=2) + "\n"
    )

    progress(f"generating random {arch} weights (seed {seed})")
    transitions = make_transitions(planted_path(tokenizer))
    tensors = make_weights(config, transitions, seed=seed)
    if fp8:
        progress("quantizing Linear weights to FP8 (128x128 blocks)")
    checkpoint = to_checkpoint(tensors, fp8=fp8)
    progress(f"writing {len(checkpoint)} tensors to {out_dir / 'model.safetensors'}")
    save_file(checkpoint, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
