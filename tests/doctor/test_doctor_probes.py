"""The probes against the real machine: kernel imports in a child Python, disk, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1nest.gpu_probe import HfCacheDiskProbe, SubprocessKernelProbe

REPO = Path(__file__).resolve().parents[2]


def test_a_module_that_kills_python_is_reported_and_the_rest_still_checked(tmp_path: Path) -> None:
    (tmp_path / "crashy.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    (tmp_path / "fine.py").write_text("__version__ = '1.2'\n")
    table = {"eng": {"engine": "fine", "crash": "crashy", "after": "json", "missing": "no_such_mod",
                     "either": "no_such_mod|json", "attr": "json:dumps", "no_attr": "json:nope"}}
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    facts = SubprocessKernelProbe(table=table, child_env=env).kernels("eng")
    assert facts.version == "1.2"
    assert facts.modules == {"engine": True, "crash": False, "after": True, "missing": False,
                             "either": True, "attr": True, "no_attr": False}
    assert "SIGSEGV" in facts.errors["crash"]
    assert "no_such_mod" in facts.errors["missing"]
    assert "has no nope" in facts.errors["no_attr"]


def test_disk_probe_counts_what_the_hub_cache_already_holds(tmp_path: Path) -> None:
    blobs = tmp_path / "hub" / "models--org--name" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "a").write_bytes(b"x" * 1000)
    facts = HfCacheDiskProbe(tmp_path / "hub").disk("org/name")
    assert facts.cached_bytes == 1000 and facts.free_bytes > 0
    assert HfCacheDiskProbe(tmp_path / "not-yet" / "hub").disk("org/name").cached_bytes == 0


def _doctor(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("R1NEST_")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # this machine's answer must not depend on a stray GPU
    return subprocess.Popen([sys.executable, "-m", "r1nest", "doctor", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return process.returncode, out, err


@pytest.mark.engine
def test_cli_on_a_box_without_gpu(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v3", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
        "max_position_embeddings": 2048, "kv_lora_rank": 32, "qk_rope_head_dim": 16,
        "n_routed_experts": 4, "num_experts_per_tok": 2}))
    ok, refused = _doctor("--model", str(tiny), "--json"), _doctor("--model", "deepseek-r1-distill-qwen-7b")
    (ok_rc, ok_out, ok_err), (refused_rc, refused_out, refused_err) = _finish(ok), _finish(refused)
    assert ok_rc == 0, ok_out + ok_err
    data = json.loads(ok_out)
    assert data["schema_version"] == 1 and data["ok"] is True
    assert data["hardware"]["gpu_count"] == 0 and data["hardware"]["class"] == "cpu"
    assert data["kernels"]["modules"]["engine"] is True

    assert refused_rc == 1
    assert "no GPU found" in refused_out
    assert "Traceback" not in refused_out + refused_err


def test_network_probe_reads_sysfs_and_device_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r1nest.gpu_probe import HostNetworkProbe

    (tmp_path / "sys/class/infiniband/rdmap79s0").mkdir(parents=True)
    (tmp_path / "sys/class/infiniband/mlx5_0").mkdir(parents=True)
    (tmp_path / "dev/infiniband").mkdir(parents=True)
    (tmp_path / "dev/infiniband/uverbs0").touch()
    (tmp_path / "dev/infiniband/rdma_cm").touch()
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("FI_EFA_USE_DEVICE_RDMA", "1")
    facts = HostNetworkProbe(sys_root=tmp_path).network()
    assert facts.infiniband_devices == ("mlx5_0", "rdmap79s0")
    assert facts.efa_devices == ("rdmap79s0",)
    assert facts.verbs_device_nodes == ("uverbs0",)
    assert facts.nccl_env["NCCL_DEBUG"] == "INFO" and facts.nccl_env["FI_EFA_USE_DEVICE_RDMA"] == "1"


def test_the_fp8_gemm_runs_and_checks_its_result_on_the_cpu() -> None:
    """The same code that times the tensor cores on a GPU, on torch's CPU FP8 matmul."""
    torch = pytest.importorskip("torch")
    from r1nest.gpu_probe import fp8_gemm

    result = fp8_gemm(torch.device("cpu"), size=128, calls=2)
    if not result.ran and "not implemented" in (result.error or "").lower():
        pytest.skip(f"this torch build has no CPU FP8 matmul: {result.error}")
    assert result.ran, result.error
    assert result.tflops is not None and result.tflops > 0
    assert result.max_rel_error is not None and result.max_rel_error < 0.01


def test_an_fp8_gemm_that_cannot_run_reports_why() -> None:
    from r1nest.gpu_probe import fp8_gemm

    result = fp8_gemm("meta-device-that-does-not-exist")
    assert not result.ran and result.error
