"""The tiny checkpoints: real architecture configs, deterministic weights, R1 tokenizer, FP8 layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from r1nest import tinymodel

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.write_tiny_model(tmp_path_factory.mktemp("v3"), arch="deepseek_v3")


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.write_tiny_model(tmp_path_factory.mktemp("fp8"), arch="deepseek_v3", fp8=True)


def test_deepseek_v3_config_is_mla_moe_with_dims_the_cpu_backend_accepts(v3_dir: Path) -> None:
    config = json.loads((v3_dir / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["model_type"] == "deepseek_v3"
    # the CPU MLA decode kernel compiles only for a 576-wide latent
    assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == 576
    assert config["topk_method"] == "noaux_tc" and config["scoring_func"] == "sigmoid"
    assert config["n_routed_experts"] > config["num_experts_per_tok"] >= 2
    assert config["n_routed_experts"] % config["n_group"] == 0
    assert config["first_k_dense_replace"] < config["num_hidden_layers"]  # at least one MoE layer
    assert "quantization_config" not in config


def test_qwen2_config_head_size_is_one_cpu_attention_accepts(tmp_path: Path) -> None:
    tinymodel.write_tiny_model(tmp_path, arch="qwen2")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    head_size = config["hidden_size"] // config["num_attention_heads"]
    assert head_size in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
    tensors = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert set(tensors) == set(tinymodel.tensor_shapes(config))
    assert "model.layers.0.self_attn.q_proj.bias" in tensors  # Qwen2 has q/k/v biases


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path, v3_dir: Path) -> None:
    again = tinymodel.write_tiny_model(tmp_path / "again", arch="deepseek_v3")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert _sha256(again / name) == _sha256(v3_dir / name), name
    other = tinymodel.write_tiny_model(tmp_path / "other", arch="deepseek_v3", seed=7)
    assert _sha256(other / "model.safetensors") != _sha256(v3_dir / "model.safetensors")
    assert _sha256(other / "tokenizer.json") == _sha256(v3_dir / "tokenizer.json")


def test_checkpoint_names_and_shapes_follow_the_deepseek_layout(v3_dir: Path) -> None:
    config = json.loads((v3_dir / "config.json").read_text())
    tensors = safetensors_torch.load_file(str(v3_dir / "model.safetensors"))
    expected = tinymodel.tensor_shapes(config)
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in tensors
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in tensors
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in tensors
    assert "model.layers.0.mlp.gate_proj.weight" in tensors  # first_k_dense_replace
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert config["vocab_size"] == tensors["model.embed_tokens.weight"].shape[0]


def test_tokenizer_has_r1_specials_and_chat_template(v3_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(v3_dir / "tokenizer.json"))
    for token in (*tinymodel.SPECIAL_TOKENS, *tinymodel.THINK_TOKENS):
        assert tok.token_to_id(token) is not None, token
        assert tok.encode(f"a{token}b", add_special_tokens=False).tokens.count(token) == 1
    tok_config = json.loads((v3_dir / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == tinymodel.BOS and tok_config["eos_token"] == tinymodel.EOS

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment().from_string(tok_config["chat_template"])
    prompt = template.render(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello"},
                  {"role": "user", "content": "Again"}],
        bos_token=tinymodel.BOS, add_generation_prompt=True,
    )
    assert prompt == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>\n\nHello<｜end▁of▁sentence｜>"
        "<｜User｜>Again<｜Assistant｜><think>\n"
    )


def test_planted_script_tokens_are_distinct() -> None:
    tok = tinymodel.build_tokenizer()
    transitions = tinymodel.make_transitions(tinymodel.planted_path(tok))
    assert transitions[tok.token_to_id(tinymodel.THINK_END)] == tok.encode("\n\n").ids[0]
    with pytest.raises(ValueError, match="twice"):
        tinymodel.make_transitions([1, 2, 1, 3])


def test_transformers_generation_yields_reasoning_then_content(v3_dir: Path) -> None:
    """The real DeepSeek-V3 modelling code, sampling at R1's temperature: the planted path holds."""
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(v3_dir), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(str(v3_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<｜Assistant｜><think>\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    torch.manual_seed(1)
    out = model.generate(ids, max_new_tokens=24, do_sample=True, temperature=0.6, top_p=0.95)
    text = tok.decode(out[0][ids.shape[1]:])
    reasoning, sep, content = text.partition("</think>")
    assert sep and reasoning.strip() == tinymodel.SCRIPT_REASONING
    assert content.startswith("\n\nHello")


def test_fp8_layout_matches_deepseek_checkpoints(fp8_dir: Path) -> None:
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
    }
    tensors = safetensors_torch.load_file(str(fp8_dir / "model.safetensors"))
    quantized = [n for n in tensors if tensors[n].dtype == torch.float8_e4m3fn]
    assert quantized and all(tinymodel.fp8_quantized(n) for n in quantized)
    for name in quantized:
        scale = tensors[name + "_scale_inv"]
        assert scale.dtype == torch.float32
        out_features, in_features = tensors[name].shape
        assert tuple(scale.shape) == (-(-out_features // 128), -(-in_features // 128)), name
    # kv_a_proj_with_mqa is 576 wide: the last row block is partial, as in R1
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 2)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.kv_a_layernorm.weight"):
        assert tensors[name].dtype == torch.bfloat16, name
        assert name + "_scale_inv" not in tensors
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv" in tensors
    assert "model.layers.1.mlp.shared_experts.down_proj.weight_scale_inv" in tensors


def test_fp8_dequantizes_to_the_bf16_weights(v3_dir: Path, fp8_dir: Path) -> None:
    bf16 = safetensors_torch.load_file(str(v3_dir / "model.safetensors"))
    fp8 = safetensors_torch.load_file(str(fp8_dir / "model.safetensors"))
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    restored = tinymodel.dequantize_fp8_blockwise(fp8[name], fp8[name + "_scale_inv"])
    reference = bf16[name].float()
    relative = (restored - reference).norm() / reference.norm()
    assert relative < 0.05  # e4m3 has 3 mantissa bits: a few percent, not a different tensor


def test_cli_refuses_fp8_for_qwen2(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from r1nest.dev import dev

    result = CliRunner().invoke(dev, ["tiny-model", "--arch", "qwen2", "--fp8", str(tmp_path / "m")])
    assert result.exit_code != 0
    assert "deepseek_v3" in str(result.exception) or "deepseek_v3" in result.output
    assert not (tmp_path / "m" / "model.safetensors").exists()
