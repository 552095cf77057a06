"""The overview page's examples, as the page shows them, against `r1nest serve` on the real engine.

tests/overview/test_overview_examples.py runs them against the fake engine; here the page is
written by `r1nest overview` (as a user runs it) for a running `r1nest serve` with the tiny
DeepSeek-V3 model on vLLM's CPU build, the snippets are taken back out of its HTML with the same
helpers, and curl (bash), Python (openai and anthropic SDKs) and JavaScript (node, openai npm
package) run them.
The examples leave max_tokens out, so they run on `serve_examples`, whose operator cap keeps the
gateway's filled-in max_tokens small (the tiny model never stops by itself).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from r1nest.testing.serve_process import Served
from r1nest.tinymodel import SCRIPT_CONTENT, SCRIPT_REASONING

from ..overview.pagetext import extract
from ..overview.test_overview_examples import clean_env, node_with_openai_or_skip, run_example
from .conftest import EXAMPLES_MAX_TOKENS_CAP

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def page_examples(serve_examples: Served, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The examples of the page `r1nest overview` writes for the examples server's data dir."""
    out = tmp_path_factory.mktemp("overview") / "overview.html"
    done = subprocess.run(
        [sys.executable, "-m", "r1nest", "overview", "--from", "local", "--data-dir", str(serve_examples.data_dir),
         "--out", str(out)],
        env=clean_env(), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"at {serve_examples.url}/v1: ready" in done.stdout, done.stdout
    examples = extract(out.read_text()).examples
    assert set(examples) == {"curl", "python", "javascript", "anthropic", "credits"}
    for code in examples.values():  # the deployment's own key is written in
        assert serve_examples.key in code and "OPENAI_API_KEY" not in code
    return examples


def check_streamed(out: str, served: Served, what: str) -> None:
    """Thinking: <reasoning>, Answer: <answer>, then [N tokens; C credits left]."""
    assert out.startswith("Thinking:\n" + SCRIPT_REASONING + "\n\nAnswer:\n"), f"{what}:\n{out!r}"
    answer = out.split("\n\nAnswer:\n", 1)[1]
    answer, _, tail = answer.partition("\n\n[")
    assert answer.strip().startswith(SCRIPT_CONTENT) and SCRIPT_REASONING not in answer, f"{what}:\n{out!r}"
    assert "None" not in out and "undefined" not in out, f"{what}:\n{out!r}"
    match = re.fullmatch(r"(\d+) tokens; (\d+) credits left\]\n", tail)
    assert match, f"{what}: the usage line:\n{out!r}"
    assert int(match.group(2)) == served.credits(), f"{what}: the credits left after settlement"


def test_curl_python_and_credits_examples_run_as_shown(page_examples: dict[str, str], serve_examples: Served,
                                                         tmp_path: Path) -> None:
    env = clean_env()
    reply = json.loads(run_example("curl", page_examples["curl"], tmp_path, env))
    assert "error" not in reply, reply
    message = reply["choices"][0]["message"]
    assert message["reasoning_content"] == SCRIPT_REASONING
    assert message["content"].strip().startswith(SCRIPT_CONTENT)
    assert reply["model"] == serve_examples.state["served_model"]
    assert reply["usage"]["completion_tokens"] == EXAMPLES_MAX_TOKENS_CAP  # filled in by the gateway

    check_streamed(run_example("python", page_examples["python"], tmp_path, env), serve_examples, "python")
    check_streamed(run_example("anthropic", page_examples["anthropic"], tmp_path, env), serve_examples, "anthropic")

    credits = json.loads(run_example("credits", page_examples["credits"], tmp_path, env))
    assert credits["remaining_credits"] == serve_examples.credits()


def test_javascript_example_runs_as_shown(page_examples: dict[str, str], serve_examples: Served,
                                           tmp_path: Path) -> None:
    node_with_openai_or_skip()
    out = run_example("javascript", page_examples["javascript"], tmp_path, clean_env())
    check_streamed(out, serve_examples, "javascript")
