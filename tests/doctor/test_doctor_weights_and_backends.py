"""What the doctor says about the weights commit, the attention backend and the fabric.

The weights commit comes from the Hugging Face cache (snapshot directories, refs/main) and from
what an engine `r1nest serve` ran here recorded (engine-observed.json, written by the launcher from
the engine's own log and the cache once it is ready). The launcher part runs a real child process.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from r1nest.catalog import MODELS, get_model
from r1nest.doctor import diagnose, plan_for_box, read_weights_facts, run_doctor
from r1nest.engines.base import EngineProfile
from r1nest.engines.launcher import (
    OBSERVED_FILE,
    Backoff,
    EngineSupervisor,
    observe_line,
    read_observed,
    resolved_revision,
    write_observed,
)
from r1nest.gateway.state import EngineState
from r1nest.gpu_probe import NetworkFacts
from r1nest.testing.fake_box import box, fake_probes

R1 = get_model("deepseek-r1")
ZERO = get_model("deepseek-r1-zero")
SHA = "0123456789abcdef0123456789abcdef01234567"
FAKE_ENGINE = Path(__file__).parents[1] / "serve" / "fake_engine_process.py"


def checks(report) -> dict:  # type: ignore[no-untyped-def]
    return {c.name: c for c in report.checks}


def hub_cache(root: Path, repo: str, *, snapshots: tuple[str, ...] = (), main: str | None = None) -> Path:
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    for commit in snapshots:
        (repo_dir / "snapshots" / commit).mkdir(parents=True)
    if main:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(main)
    return root


# --- weights revision ----------------------------------------------------------------------------


def test_a_pinned_model_in_the_cache_is_ok_and_the_json_says_which_commit(tmp_path: Path) -> None:
    cache = hub_cache(tmp_path, R1.hf_repo, snapshots=(R1.revision,), main=R1.revision)
    report = diagnose(box("H200", 8), R1, weights=read_weights_facts(cache, R1.hf_repo))
    check = checks(report)["weights_revision"]
    assert check.status == "ok" and R1.revision in check.detail and "in the cache" in check.detail
    data = report.to_json()["weights"]
    assert data["revision"] == R1.revision and data["pinned"] is True
    assert data["cached_revisions"] == [R1.revision] and data["refs"] == {"main": R1.revision}


def test_a_pinned_model_not_yet_downloaded_names_the_commit_the_engine_fetches(tmp_path: Path) -> None:
    cache = hub_cache(tmp_path, R1.hf_repo, snapshots=(SHA,))
    check = checks(diagnose(box("H200", 8), R1, weights=read_weights_facts(cache, R1.hf_repo)))["weights_revision"]
    assert check.status == "ok" and f"pinned {R1.revision}" in check.detail and SHA[:12] in check.detail


def test_an_unpinned_model_reports_the_commit_main_resolved_to(tmp_path: Path) -> None:
    nothing = checks(diagnose(box("H200", 8), ZERO))["weights_revision"]
    assert nothing.status == "warn" and "unpinned" in nothing.detail and "downloads main" in nothing.detail
    cache = hub_cache(tmp_path, ZERO.hf_repo, snapshots=(SHA,), main=SHA)
    cached = checks(diagnose(box("H200", 8), ZERO, weights=read_weights_facts(cache, ZERO.hf_repo)))
    assert cached["weights_revision"].status == "warn" and f"serves {SHA}" in cached["weights_revision"].detail
    other = "f" * 40
    reported = {"engine": "vllm", "model": ZERO.hf_repo, "weights_revision": other}
    engine = checks(diagnose(box("H200", 8), ZERO, weights=read_weights_facts(cache, ZERO.hf_repo),
                             reported=reported))
    assert f"serves {other} (reported by the engine)" in engine["weights_revision"].detail


def test_an_engine_that_loaded_other_weights_than_the_pin_is_flagged() -> None:
    reported = {"engine": "vllm", "model": R1.hf_repo, "weights_revision": SHA}
    check = checks(diagnose(box("H200", 8), R1, reported=reported))["weights_revision"]
    assert check.status == "warn" and SHA in check.detail and R1.revision in check.detail
    # a record of another model or engine is not this deployment's
    other = diagnose(box("H200", 8), R1, reported={**reported, "engine": "sglang"})
    assert checks(other)["weights_revision"].status == "ok" and other.reported == {}


# --- attention backend and fabric ----------------------------------------------------------------


def test_the_plan_names_the_hopper_attention_backend_and_the_engines_report_is_compared() -> None:
    planned = diagnose(box("H200", 8), R1, planner=plan_for_box)
    assert planned.backends["attention"] == "FLASHMLA"
    assert checks(planned)["attention"].detail.startswith("FLASHMLA, named by the plan")
    reported = {"engine": "vllm", "model": R1.hf_repo, "attention_backend": "TRITON_MLA"}
    mismatch = checks(diagnose(box("H200", 8), R1, planner=plan_for_box, reported=reported))["attention"]
    assert mismatch.status == "warn" and "TRITON_MLA" in mismatch.detail and "FLASHMLA" in mismatch.detail
    sglang = diagnose(box("H200", 8, engine="sglang"), R1, engine="sglang", planner=plan_for_box)
    assert sglang.backends["attention"] == "fa3" and checks(sglang)["attention"].status == "ok"


def _two_node_throughput(model, *, fabric, **_):  # type: ignore[no-untyped-def]
    from r1nest.planner import plan

    return plan(model, "local", engine="sglang", nodes=2, mode="throughput", local_gpus="H100:8", fabric=fabric)


def test_the_doctor_plans_for_the_fabric_it_finds() -> None:
    efa = NetworkFacts(infiniband_devices=("rdmap79s0",), efa_devices=("rdmap79s0",), verbs_device_nodes=("uverbs0",))
    ib = NetworkFacts(infiniband_devices=("mlx5_0",), verbs_device_nodes=("uverbs0",))
    on_efa = diagnose(box("H100", 8, engine="sglang", network=efa), R1, engine="sglang", nodes=2,
                      planner=_two_node_throughput)
    assert on_efa.plan["fabric"] == "efa" and on_efa.backends["all2all"] == "none (NCCL)"
    on_ib = diagnose(box("H100", 8, engine="sglang", network=ib), R1, engine="sglang", nodes=2,
                     planner=_two_node_throughput)
    assert on_ib.plan["fabric"] == "infiniband" and on_ib.backends["all2all"].startswith("deepep")


# --- the launcher's record, read by the doctor -------------------------------------------------------


def test_engine_log_lines_name_the_attention_backend() -> None:
    assert observe_line("vllm", "INFO 11-02 [cuda.py:448] Using AttentionBackendEnum.FLASHMLA backend.") == \
        {"attention_backend": "FLASHMLA"}
    assert observe_line("vllm", "(EngineCore_DP0 pid=7) INFO [cuda.py:509] Using FLASH_ATTN_MLA attention "
                                "backend out of potential backends: ['FLASH_ATTN_MLA', 'FLASHMLA'].") == \
        {"attention_backend": "FLASH_ATTN_MLA"}
    assert observe_line("vllm", "Using backend FLASH_ATTN for vit attention") == {}
    assert observe_line("sglang", "server_args=ServerArgs(model_path='m', attention_backend='fa3', "
                                  "decode_attention_backend=None)") == {"attention_backend": "fa3"}
    assert observe_line("sglang", "attention_backend='fa3' without the server_args dump") == {}


def test_resolved_revision_reads_the_cache(tmp_path: Path) -> None:
    cache = hub_cache(tmp_path, "org/name", snapshots=(SHA,), main=SHA)
    assert resolved_revision("org/name", None, cache) == SHA
    assert resolved_revision("org/name", SHA, cache) == SHA
    assert resolved_revision("org/name", "e" * 40, cache) is None  # pinned but not there
    (cache / "models--org--name" / "refs" / "main").write_text("not a commit")
    assert resolved_revision("org/name", None, cache) is None


async def test_the_supervisor_records_what_the_engine_ran_and_doctor_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = hub_cache(tmp_path / "hub", ZERO.hf_repo, snapshots=(SHA,), main=SHA)
    monkeypatch.setattr("r1nest.gpu_probe.hf_cache_dir", lambda: cache)
    profile = EngineProfile(engine="vllm", model=ZERO.hf_repo, served_model_name=ZERO.id, args=(),
                            env={}, hardware_class="hopper")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    sup = EngineSupervisor(profile, state=EngineState(phase="warming"), data_dir=data_dir, log_sink=lambda _: None,
                           backoff=Backoff(max_restarts=0), health_poll_interval_s=0.05, watch_interval_s=0.1,
                           startup_timeout_s=30, argv=[], base_environ={"PATH": os.environ.get("PATH", "")})
    script = ("print('INFO [cuda.py:448] Using AttentionBackendEnum.FLASHMLA backend.', flush=True); "
              f"import runpy, sys; sys.argv = [{str(FAKE_ENGINE)!r}, '--port', '{sup.port}']; "
              f"runpy.run_path({str(FAKE_ENGINE)!r}, run_name='__main__')")
    sup._argv_override = [sys.executable, "-c", script]
    task = asyncio.create_task(sup.run())
    try:
        await asyncio.wait_for(sup.ready_event.wait(), 20)
        for _ in range(100):
            if read_observed(data_dir).get("weights_revision"):
                break
            await asyncio.sleep(0.05)
    finally:
        await sup.stop()
        await asyncio.wait_for(task, 30)
    observed = read_observed(data_dir)
    assert observed["attention_backend"] == "FLASHMLA" and observed["weights_revision"] == SHA
    assert observed["engine"] == "vllm" and observed["model"] == ZERO.hf_repo

    report = run_doctor(ZERO.id, "vllm", 1, fake_probes(box("H200", 8)), planner=None, data_dir=data_dir)
    assert report.to_json()["engine_reported"]["weights_revision"] == SHA
    assert f"serves {SHA} (reported by the engine)" in checks(report)["weights_revision"].detail
    assert checks(report)["attention"].detail.startswith("FLASHMLA, reported by the engine")


def test_a_damaged_record_is_ignored(tmp_path: Path) -> None:
    (tmp_path / OBSERVED_FILE).write_text("{not json")
    assert read_observed(tmp_path) == {}
    write_observed(tmp_path, {"engine": "vllm", "attention_backend": "FLASHMLA"})
    assert read_observed(tmp_path)["attention_backend"] == "FLASHMLA"
    assert all(spec.revision for spec in MODELS.values())
