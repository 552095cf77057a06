"""Catalog numbers against published figures, and local checkpoints read from config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1nest.catalog import MODELS, get_model, local_model, resolve_model
from r1nest.errors import ConfigError

R1_FAMILY = ("deepseek-r1", "deepseek-r1-0528", "deepseek-r1-zero")
DISTILLS = {
    # id: (hf repo, architecture, layers, kv heads, KV bytes/token in BF16)
    "deepseek-r1-distill-qwen-1.5b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "qwen2", 28, 2, 28_672),
    "deepseek-r1-distill-qwen-7b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "qwen2", 28, 4, 57_344),
    "deepseek-r1-distill-llama-8b": ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "llama", 32, 8, 131_072),
    "deepseek-r1-distill-qwen-14b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "qwen2", 48, 8, 196_608),
    "deepseek-r1-distill-qwen-32b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "qwen2", 64, 8, 262_144),
    "deepseek-r1-distill-llama-70b": ("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "llama", 80, 8, 327_680),
}


def test_the_catalog_is_the_r1_family_and_six_distills() -> None:
    assert set(MODELS) == set(R1_FAMILY) | set(DISTILLS)


@pytest.mark.parametrize("model_id", R1_FAMILY)
def test_r1_mla_kv_bytes_per_token(model_id: str) -> None:
    spec = get_model(model_id)
    # (kv_lora_rank 512 + qk_rope_head_dim 64) x 61 layers x bytes
    assert spec.kv_bytes_per_token("bf16") == 70_272
    assert spec.kv_bytes_per_token("auto") == 70_272  # FP8 weights, BF16 activations
    assert spec.kv_bytes_per_token("fp8") == 35_136
    assert spec.uses_mla and spec.is_moe and spec.weight_dtype == "fp8"
    assert spec.params_total == 671_000_000_000 and spec.params_active == 37_000_000_000
    assert 0.68e12 < spec.weight_bytes < 0.70e12  # "~0.69 TB"
    assert spec.reasoning_parser_vllm == "deepseek_r1" and spec.reasoning_parser_sglang == "deepseek-r1"
    assert spec.licence.startswith("MIT")


@pytest.mark.parametrize("model_id", sorted(DISTILLS))
def test_distill_gqa_kv_bytes_per_token(model_id: str) -> None:
    repo, arch, layers, kv_heads, kv_bf16 = DISTILLS[model_id]
    spec = get_model(model_id)
    assert spec.hf_repo == repo and spec.architecture == arch
    assert spec.num_layers == layers and spec.num_kv_heads == kv_heads and spec.head_dim == 128
    assert spec.kv_bytes_per_token("bf16") == 2 * layers * kv_heads * 128 * 2 == kv_bf16
    assert spec.kv_bytes_per_token("fp8") == kv_bf16 // 2
    assert spec.weight_dtype == "bf16" and spec.weight_bytes == 2 * spec.params_total
    assert not spec.is_moe and spec.native_context == 131_072
    expected_licence = "Llama 3" if arch == "llama" else "Apache-2.0"
    assert expected_licence in spec.licence


def test_chat_conventions() -> None:
    assert get_model("deepseek-r1").forces_think_prefix
    assert not get_model("deepseek-r1").system_prompt_supported
    r0528 = get_model("deepseek-r1-0528")
    assert r0528.system_prompt_supported and r0528.tool_call_parser_vllm == "deepseek_v3"
    assert r0528.tool_call_parser_sglang == "deepseekv3"
    for spec in MODELS.values():
        assert (spec.temperature, spec.top_p) == (0.6, 0.95)
        assert spec.sources


def test_unknown_model_lists_the_known_ids() -> None:
    with pytest.raises(ConfigError) as info:
        get_model("deepseek-r2")
    assert "deepseek-r1-distill-qwen-7b" in str(info.value)
    assert get_model(" DeepSeek-R1 ").id == "deepseek-r1"


def _write_checkpoint(directory: Path, config: dict, weight_bytes: int = 4096) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(b"\0" * weight_bytes)
    return directory


def test_local_deepseek_v3_checkpoint(tmp_path: Path) -> None:
    from r1nest.tinymodel import model_config

    config = model_config("deepseek_v3", vocab_size=1024, bos_id=0, eos_id=1, fp8=True)
    path = _write_checkpoint(tmp_path / "tiny-r1", config)
    spec = local_model(path)
    assert spec.id == "tiny-r1" and spec.hf_repo == str(path.resolve()) and spec.is_local
    assert spec.architecture == "deepseek_v3" and spec.uses_mla and spec.is_moe
    assert spec.weight_dtype == "fp8" and spec.weight_bytes == 4096
    layers = config["num_hidden_layers"]
    assert spec.kv_bytes_per_token("bf16") == (512 + 64) * layers * 2
    assert resolve_model(str(path)).id == "tiny-r1"


def test_local_qwen2_checkpoint(tmp_path: Path) -> None:
    from r1nest.tinymodel import model_config

    config = model_config("qwen2", vocab_size=1024, bos_id=0, eos_id=1)
    spec = local_model(_write_checkpoint(tmp_path / "tiny-qwen", config))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    assert spec.architecture == "qwen2" and not spec.uses_mla and spec.weight_dtype == "bf16"
    assert spec.kv_bytes_per_token("bf16") == 2 * config["num_hidden_layers"] * kv_heads * head_dim * 2


@pytest.mark.parametrize(
    "config,message",
    [
        ({"model_type": "mistral"}, "unsupported model_type"),
        ({"model_type": "qwen2", "num_hidden_layers": "2"}, "num_hidden_layers"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_local_checkpoints_are_clear_errors(tmp_path: Path, config: object, message: str) -> None:
    path = tmp_path / "bad"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        local_model(path)


def test_a_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        local_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        local_model(tmp_path)


# --- weights revisions ---------------------------------------------------------------------------


def test_every_catalog_entry_pins_a_commit_or_says_why_not() -> None:
    from r1nest.catalog import revision_problem

    problems = [p for p in (revision_problem(spec) for spec in MODELS.values()) if p]
    assert not problems, problems
    for spec in MODELS.values():
        if spec.revision_pinned:
            assert f"/commit/{spec.revision}" in spec.revision_source, spec.id  # where it is recorded


@pytest.mark.parametrize(
    "change,message",
    [
        ({"revision": ""}, "no weights revision"),
        ({"revision": "main"}, "neither a 40-hex Hub commit"),
        ({"revision": "56d4cbb"}, "neither a 40-hex Hub commit"),  # an abbreviated sha is not a pin
        ({"revision": "unpinned", "revision_source": " "}, "unpinned without a reason"),
        ({"revision": "0" * 40, "revision_source": ""}, "without a source"),
    ],
)
def test_a_catalog_entry_without_a_usable_revision_is_caught(change: dict, message: str) -> None:
    from dataclasses import replace

    from r1nest.catalog import revision_problem

    bad = replace(get_model("deepseek-r1-distill-qwen-7b"), **change)
    assert message in (revision_problem(bad) or "")


def test_pinned_revisions_reach_both_engines_and_unpinned_ones_say_so() -> None:
    from r1nest.engines import build_profile

    for spec in MODELS.values():
        for engine in ("vllm", "sglang"):
            profile = build_profile(engine, spec, hardware_class="hopper", nodes=1, gpus_per_node=8,
                                    tp=8, context=spec.default_context)
            assert profile.revision == spec.engine_revision
            assert profile.flag_value("--revision") == spec.engine_revision, (spec.id, engine)
            if not spec.revision_pinned:
                assert any("unpinned" in note for note in profile.notes)


def test_local_checkpoints_carry_no_revision(tmp_path: Path) -> None:
    from r1nest.catalog import revision_problem
    from r1nest.tinymodel import model_config

    spec = local_model(_write_checkpoint(tmp_path / "tiny", model_config("qwen2", vocab_size=1024, bos_id=0,
                                                                          eos_id=1)))
    assert spec.revision == "" and spec.engine_revision is None and revision_problem(spec) is None


def test_the_overview_page_shows_the_weights_revision() -> None:
    from r1nest.overview.context import OverviewContext
    from r1nest.overview.render import render_overview

    def page(**extra: str) -> str:
        ctx = OverviewContext(model=extra.pop("model", "deepseek-r1"), engine="vllm",
                              public_endpoint="http://203.0.113.7:8000", internal_endpoint_note="none",
                              model_repo="deepseek-ai/DeepSeek-R1", **extra)
        return render_overview(ctx)

    pinned = MODELS["deepseek-r1"].revision
    assert f'title="{pinned}"' in page() and pinned[:12] in page()
    downloaded = "0123456789abcdef0123456789abcdef01234567"
    assert f'title="{downloaded}"' in page(model_revision=downloaded)
    assert 'id="weights-revision" title="unpinned"' in page(model="deepseek-r1-zero")
    with pytest.raises(ConfigError):
        page(model_revision="main")
