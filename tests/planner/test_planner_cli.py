"""`r1nest plan`: a table, JSON, and refusals that exit non-zero with the reason."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from r1nest.cli import cli
from r1nest.errors import PlanError


def test_plan_prints_a_table() -> None:
    result = CliRunner().invoke(cli, ["plan", "--model", "deepseek-r1", "--cloud", "aws"])
    assert result.exit_code == 0, result.output
    assert "p5en.48xlarge" in result.output and "TP 8" in result.output
    assert "vllm.entrypoints.cli.main serve" in result.output


def test_plan_json() -> None:
    result = CliRunner().invoke(
        cli, ["plan", "--model", "deepseek-r1-distill-qwen-7b", "--cloud", "modal", "--json",
              "--context", "8192", "--concurrency", "4"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["modal_gpu"] == "L4" and data["context"] == 8192 and data["max_concurrency"] >= 4


def test_plan_refusal_is_a_plan_error() -> None:
    result = CliRunner().invoke(
        cli, ["plan", "--model", "deepseek-r1", "--cloud", "aws", "--instance-type", "p5.48xlarge", "--nodes", "1"]
    )
    assert isinstance(result.exception, PlanError)


def test_plan_refusal_exits_3_without_a_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "r1nest", "plan", "--model", "deepseek-r1", "--cloud", "modal",
         "--instance-type", "H100:8"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3
    assert proc.stderr.startswith("error: deepseek-r1 (0.69 TB")
    assert "H200:8" in proc.stderr and "B200:8" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_model_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "r1nest", "plan", "--model", "gpt-5", "--cloud", "aws"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "known models" in proc.stderr and "Traceback" not in proc.stderr
