"""scripts/gpu-proof cannot run here (no GPU); check that what it calls exists and parses."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu-proof"


def test_script_is_valid_bash_and_prints_its_usage() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30, check=False,
                          env={"PATH": "/usr/bin:/bin", "PROOF_DIR": "/tmp/r1nest-proof-test",
                               "OUT": "/tmp/r1nest-proof-test/out"})
    assert done.returncode == 2
    for stage in ("carry", "unpack", "doctor", "start", "wait", "bench", "stop"):
        assert f"scripts/gpu-proof {stage}" in done.stdout


def test_the_r1nest_commands_it_runs_accept_its_flags() -> None:
    from r1nest.bench import bench
    from r1nest.dev import dev
    from r1nest.doctor import doctor
    from r1nest.planner_cli import plan
    from r1nest.serve import serve

    text = SCRIPT.read_text()
    assert "tiny-model --arch deepseek_v3 --fp8" in text
    dev.get_command(None, "tiny-model").make_context("tiny-model", ["--arch", "deepseek_v3", "--fp8", "/tmp/x"])
    doctor.make_context("doctor", ["--model", "/tmp/x", "--json"])
    doctor.make_context("doctor", ["--model", "/tmp/x", "--no-gemm"])
    plan.make_context("plan", ["--model", "m", "--cloud", "local", "--gpus", "H100:1", "--json"])
    serve.make_context("serve", ["--model", "/tmp/x", "--port", "8000", "--data-dir", "/tmp/d"])
    bench.make_context("bench", ["http://127.0.0.1:8000", "--key", "k", "--concurrency", "128",
                                 "--max-tokens", "256", "--duration", "20", "--json"])
    levels = re.search(r"CONCURRENCY_LEVELS=\(([^)]*)\)", text).group(1).split()
    assert levels == ["1", "32", "128"]
