"""The doctor's verdict on canned boxes: which boxes can serve which models, and why not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1nest.catalog import get_model, local_model
from r1nest.doctor import SCHEMA_VERSION, diagnose, hardware_class_of, match_gpu_model, run_doctor
from r1nest.errors import PlanError
from r1nest.gpu_probe import NetworkFacts, parse_fi_info_list, parse_nvidia_smi_row
from r1nest.testing.fake_box import TB, box, fake_probes, gpus

R1 = get_model("deepseek-r1")
QWEN_7B = get_model("deepseek-r1-distill-qwen-7b")


@pytest.fixture()
def tiny_model_dir(tmp_path: Path) -> Path:
    """A DeepSeek-V3-architecture checkpoint directory as `r1nest dev tiny-model` writes it."""
    config = {
        "model_type": "deepseek_v3", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
        "max_position_embeddings": 2048, "kv_lora_rank": 32, "qk_rope_head_dim": 16,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "torch_dtype": "bfloat16",
    }
    directory = tmp_path / "tiny-deepseek-v3"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(b"\0" * 4096)
    return directory


def failed(report) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks if c.status == "fail"}


def test_fp8_r1_on_a100s_is_refused_for_fp8() -> None:
    report = diagnose(box("A100", 8), R1)
    assert report.exit_code == 1
    assert "fp8" in failed(report)
    assert "8.9" in report.reason and "sm80" in report.reason


def test_r1_does_not_fit_one_h100_node_but_fits_two() -> None:
    one = diagnose(box("H100", 8), R1, nodes=1)
    assert one.exit_code == 1
    assert "gpu_memory" in failed(one)
    assert "688" in failed(one)["gpu_memory"] or "689" in failed(one)["gpu_memory"]
    two = diagnose(box("H100", 8), R1, nodes=2)
    assert "gpu_memory" not in failed(two)


def test_r1_on_h200x8_passes_with_measured_fp8_gemm_and_mla_backends() -> None:
    report = diagnose(box("H200", 8), R1)
    assert report.ok, report.reason
    assert report.hardware_class == "hopper"
    gemm = [c for c in report.checks if c.name.startswith("fp8_gemm")]
    assert len(gemm) == 8 and all(c.status == "ok" and "TFLOP/s" in c.detail for c in gemm)
    assert report.backends["attention"] == "FLASH_ATTN_MLA"
    assert report.backends["fp8_linear"].startswith("DeepGEMM")
    assert report.backends["moe"] == "DeepGEMM grouped FP8"


def test_fp8_kv_cache_and_deep_gemm_off_change_the_expected_kernels() -> None:
    class Profile:
        args = ("--kv-cache-dtype", "fp8")
        env = {"VLLM_USE_DEEP_GEMM": "0"}

    class Plan:
        profile = Profile()

        def to_json(self) -> dict:
            return {"tp": 8, "max_concurrency": 64}

    report = diagnose(box("H200", 8), R1, planner=lambda *a, **k: Plan())
    assert report.backends["attention"] == "FLASHMLA"
    assert report.backends["fp8_linear"] == "CUTLASS block FP8"
    assert report.backends["moe"] == "Triton fused MoE"
    assert report.plan == {"tp": 8, "max_concurrency": 64}


def test_a_gpu_model_on_a_box_without_gpu_fails_clearly() -> None:
    report = diagnose(box(None), QWEN_7B)
    assert report.exit_code == 1
    assert report.reason.startswith("no GPU found")
    assert QWEN_7B.id in report.reason
    assert report.backends == {}  # no kernels to expect on a box that cannot run it


def test_the_cpu_tiny_model_passes_without_gpu(tiny_model_dir: Path) -> None:
    report = diagnose(box(None), local_model(tiny_model_dir))
    assert report.ok, report.reason
    assert report.exit_code == 0
    assert report.hardware_class == "cpu"


def test_missing_engine_fails_even_for_the_tiny_model(tiny_model_dir: Path) -> None:
    report = diagnose(box(None, missing=("engine",)), local_model(tiny_model_dir))
    assert report.exit_code == 1
    assert "engine" in failed(report)


def test_missing_core_kernels_fail_on_gpu_and_optional_ones_warn() -> None:
    report = diagnose(box("H200", 8, missing=("fused_moe", "deep_gemm")), R1)
    assert "kernel:fused_moe" in failed(report)
    statuses = {c.name: c.status for c in report.checks}
    assert statuses["kernel:deep_gemm"] == "warn"
    assert report.backends["fp8_linear"] == "CUTLASS block FP8"  # no DeepGEMM to choose


def test_wrong_fp8_results_fail_the_box() -> None:
    from dataclasses import replace

    from r1nest.gpu_probe import Fp8GemmResult

    facts = box("H200", 8)
    bad = replace(facts.gpus[3], fp8_gemm=Fp8GemmResult(ran=True, tflops=900.0, max_rel_error=0.8))
    facts = replace(facts, gpus=facts.gpus[:3] + (bad,) + facts.gpus[4:])
    report = diagnose(facts, R1)
    assert "fp8_gemm[3]" in failed(report)


def test_not_enough_disk_for_the_weights_fails() -> None:
    report = diagnose(box("H200", 8, free_bytes=TB // 2), R1)
    assert "disk" in failed(report)
    assert diagnose(box("H200", 8, free_bytes=TB), R1).ok


def test_multi_node_without_rdma_warns_and_with_efa_reports_it() -> None:
    plain = diagnose(box("H100", 8), R1, nodes=2)
    assert {c.name: c.status for c in plain.checks}["fabric"] == "warn"
    efa = NetworkFacts(infiniband_devices=("rdmap79s0",), efa_devices=("rdmap79s0",),
                       verbs_device_nodes=("uverbs0",), fabric_providers=("efa", "tcp"),
                       nccl_env={"FI_PROVIDER": "efa"})
    report = diagnose(box("H100", 8, network=efa), R1, nodes=2)
    checks = {c.name: c for c in report.checks}
    assert checks["fabric"].status == "ok" and "efa" in checks["fabric"].detail
    assert "FI_PROVIDER=efa" in checks["nccl_env"].detail
    from dataclasses import replace

    hidden = diagnose(box("H100", 8, network=replace(efa, verbs_device_nodes=())), R1, nodes=2)
    fabric = {c.name: c for c in hidden.checks}["fabric"]
    assert fabric.status == "warn" and "--device /dev/infiniband" in fabric.detail


def test_a_planner_refusal_is_the_verdict() -> None:
    def refuse(*args, **kwargs):
        raise PlanError("context 1M does not fit", ["context 128K on H200:8"])

    report = diagnose(box("H200", 8), R1, planner=refuse)
    assert report.exit_code == 1
    assert "planner refuses" in report.reason and "H200:8" in report.reason


def test_hardware_classes_and_gpu_matching() -> None:
    assert hardware_class_of(()) == "cpu"
    assert hardware_class_of(gpus("A100", 8)) == "ampere"
    assert hardware_class_of(gpus("H100", 8)) == "hopper"
    assert hardware_class_of(gpus("L40S", 1)) == "ada"
    assert hardware_class_of(gpus("H100", 1) + gpus("A100", 1)) is None  # mixed box
    assert match_gpu_model(gpus("H200", 1)[0]).name == "H200"
    assert match_gpu_model(gpus("H100", 1)[0]).name == "H100"
    assert match_gpu_model(gpus("A100", 1)[0]).name == "A100-80GB"
    assert match_gpu_model(gpus("L40S", 1)[0]).name == "L40S"


def test_nvidia_smi_and_fi_info_parsing() -> None:
    gpu = parse_nvidia_smi_row("0, NVIDIA H100 80GB HBM3, 9.0, 81559")
    assert gpu is not None and gpu.compute_capability == (9, 0) and gpu.memory_bytes == 81559 * 1024 * 1024
    assert parse_nvidia_smi_row("garbage") is None
    assert parse_nvidia_smi_row("0, X, n/a, 1") is None
    assert parse_fi_info_list("efa:\n    version: 122.0\ntcp:\n    version: 1.0\n") == ("efa", "tcp")


def test_run_doctor_end_to_end_with_fake_probes_has_the_pinned_json_schema(tiny_model_dir: Path) -> None:
    report = run_doctor(str(tiny_model_dir), "vllm", 1, fake_probes(box(None)), planner=None)
    data = report.to_json()
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert list(data) == ["schema_version", "ok", "exit_code", "reason", "model", "engine", "nodes",
                          "hardware", "kernels", "backends", "network", "disk", "plan", "checks",
                          "weights", "engine_reported"]  # keys added at the end: version 1 still reads
    assert list(data["weights"]) == ["revision", "pinned", "revision_source", "cached_revisions", "refs"]
    assert list(data["model"]) == ["id", "hf_repo", "architecture", "weight_dtype", "weight_bytes"]
    assert list(data["hardware"]) == ["class", "gpu_count", "driver_version", "torch_version",
                                      "cuda_version", "gpus"]
    assert list(data["network"]) == ["infiniband_devices", "efa_devices", "verbs_device_nodes",
                                     "fabric_providers", "nccl_env"]
    assert list(data["disk"]) == ["path", "free_bytes", "cached_bytes"]
    assert all(list(c) == ["name", "status", "detail"] for c in data["checks"])
    gpu_report = run_doctor("deepseek-r1", "vllm", 1, fake_probes(box("H200", 8)), planner=None).to_json()
    assert list(gpu_report["hardware"]["gpus"][0]) == ["index", "name", "arch", "compute_capability",
                                                        "memory_bytes", "fp8_supported", "fp8_gemm"]
    assert list(gpu_report["hardware"]["gpus"][0]["fp8_gemm"]) == ["ran", "tflops", "max_rel_error", "error"]
    json.dumps(gpu_report)  # serialisable as is


def test_the_real_planner_sizes_the_detected_box() -> None:
    from r1nest.doctor import plan_for_box

    h200 = diagnose(box("H200", 8), R1, planner=plan_for_box)
    assert h200.ok, h200.reason
    assert h200.plan["gpu"] == "H200" and h200.plan["gpus_per_node"] == 8
    assert h200.plan["kv_cache_dtype"] == "fp8"
    assert h200.backends["attention"] == "FLASHMLA"  # the profile's FP8 KV cache picks FlashMLA

    one_h100 = diagnose(box("H100", 8), R1, planner=plan_for_box)
    assert {c.name for c in one_h100.checks if c.status == "fail"} >= {"gpu_memory", "plan"}

    distill = diagnose(box("L40S", 1), QWEN_7B, planner=plan_for_box)
    assert distill.ok, distill.reason
    assert distill.plan["gpu"] == "L40S"

    unknown = diagnose(box("H200", 8), R1, planner=lambda *a, **k: plan_for_box(
        *a, **{**k, "gpus": tuple(g.__class__(**{**g.__dict__, "name": "NVIDIA GH200 480GB"})
                                  for g in k["gpus"])}))
    assert "not in r1nest's hardware table" in unknown.reason


def test_sglang_on_hopper_expects_fa3_and_needs_sgl_kernel() -> None:
    report = diagnose(box("H200", 8, engine="sglang"), R1, engine="sglang")
    assert report.ok, report.reason
    assert report.backends["attention"] == "fa3"  # SGLang's own MLA default on Hopper, not FlashMLA
    broken = diagnose(box("H200", 8, engine="sglang", missing=("sgl_kernel",)), R1, engine="sglang")
    assert "kernel:sgl_kernel" in failed(broken)


def test_local_checkpoint_up_to_the_cpu_bound_needs_no_gpu(tiny_model_dir: Path) -> None:
    from dataclasses import replace

    from r1nest.doctor import CPU_MAX_WEIGHT_BYTES

    tiny = local_model(tiny_model_dir)
    assert diagnose(box(None), replace(tiny, weight_bytes=CPU_MAX_WEIGHT_BYTES)).ok
    too_big = diagnose(box(None), replace(tiny, weight_bytes=CPU_MAX_WEIGHT_BYTES + 1))
    assert too_big.reason.startswith("no GPU found")


def test_a_driver_older_than_the_cuda_runtime_fails() -> None:
    from dataclasses import replace

    facts = box("H100", 8)  # torch for CUDA 13.0, driver 580
    assert {c.name: c.status for c in diagnose(facts, QWEN_7B).checks}["driver"] == "ok"
    old = diagnose(replace(facts, driver_version="570.172.08"), QWEN_7B)
    assert "driver" in failed(old) and "580" in failed(old)["driver"]
    assert "driver" not in failed(diagnose(replace(facts, driver_version="570.1", cuda_version="12.8"), QWEN_7B))
