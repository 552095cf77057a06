"""The reference documents' client examples, as printed, against `r1nest serve` on the real engine.

Each example lives in tests/e2e/examples/ as its document prints it (the file's first comment
names the document, lists the placeholders and the one kind of repair made: indentation or line
breaks that the stored copy of the page lost); the test fills in the placeholders (the
deployment's URL, key and model, the values the document leaves blank) and nothing else,
then runs it as a program (bash + curl, this interpreter with the openai SDK or LangChain, node
with the openai or axios npm package) and checks what a user would see.

The examples that leave max_tokens out run on `serve_examples`, whose operator cap
(R1NEST_MAX_TOKENS_CAP) is small: the tiny model never stops by itself, so on the default cap
each would generate until the context is full. The examples with an explicit max_tokens run on
`serve_v3` (the default cap, 32768), as they would on the demo, with a key of their own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1nest.paths import REPO_ROOT
from r1nest.testing.serve_process import Served
from r1nest.tinymodel import SCRIPT_CONTENT, SCRIPT_REASONING

pytestmark = pytest.mark.engine

EXAMPLES_DIR = Path(__file__).parent / "examples"
JS_DIR = REPO_ROOT / "tests" / "js"
RUN_TIMEOUT_S = 240
PLACEHOLDER = re.compile(r"\$\{[A-Za-z_]+\}")

# What the NVIDIA card's blank slots are filled with: its recommended temperature (0.6), DeepSeek's
# top_p (0.95; the card names none), max_tokens 4096, not streamed, a short question.
NVIDIA_VALUES = {
    "${TEMPERATURE}": "0.6",
    "${TOP_P}": "0.95",
    "${MAX_TOKENS}": "4096",
    "${CONTENT}": "Which number is larger, 9.11 or 9.8?",
}


# -- helpers ---------------------------------------------------------------------------------


def fill(name: str, values: dict[str, str]) -> str:
    """The example's text with each placeholder replaced (every one must be used, none left)."""
    text = (EXAMPLES_DIR / name).read_text()
    for placeholder, value in values.items():
        assert placeholder in text, f"{name} has no {placeholder}"
        text = text.replace(placeholder, value)
    left = PLACEHOLDER.findall(text)
    assert not left, f"{name}: placeholders left unfilled: {left}"
    return text


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: none of our settings, no SDK variables to lean on."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("OPENAI_", "R1NEST_", "NVIDIA_", "NODE_OPTIONS"))}
    env.update(extra)
    return env


def run(argv: list[str], cwd: Path, *, env: dict[str, str] | None = None) -> str:
    """Runs one example; fails the test on a non-zero exit or an error on stderr. Returns stdout
    as the program wrote it (no newline translation: curl -i's header lines end in CRLF)."""
    started = time.monotonic()
    done = subprocess.run(argv, cwd=cwd, env=env or clean_env(), capture_output=True, timeout=RUN_TIMEOUT_S)
    took = time.monotonic() - started
    stdout, stderr = done.stdout.decode(), done.stderr.decode(errors="replace")
    print(f"{Path(argv[-1]).name}: exit {done.returncode} in {took:.1f} s")
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{stdout}\n{stderr}"
    assert "Error" not in stderr and "Traceback" not in stderr, stderr
    return stdout


def write(tmp_path: Path, filename: str, text: str) -> Path:
    path = tmp_path / filename
    path.write_text(text)
    return path


def node_dir_or_skip(tmp_path: Path, *packages: str) -> Path:
    """tmp_path, with node_modules pointing at tests/js's (installed there if missing)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed (the JavaScript examples need it)")
    missing = [p for p in packages if not (JS_DIR / "node_modules" / p).is_dir()]
    if missing:
        if shutil.which("npm") is None:
            pytest.skip(f"npm is not installed, so the npm packages {missing} are not available")
        try:
            subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=JS_DIR,
                           capture_output=True, timeout=300, check=False)
        except subprocess.TimeoutExpired:
            pass
        missing = [p for p in packages if not (JS_DIR / "node_modules" / p).is_dir()]
        if missing:
            pytest.skip(f"npm could not install {missing} in tests/js (no registry access?)")
    modules = tmp_path / "node_modules"
    if not modules.exists():
        modules.symlink_to(JS_DIR / "node_modules")
    return tmp_path


def check_answer(text: str, what: str) -> None:
    """`text` is the answer: the tiny model's script content, repeated, and nothing else."""
    assert text.strip(), f"{what}: no answer"
    assert text.strip().startswith(SCRIPT_CONTENT), f"{what}: the answer is not the model's:\n{text!r}"
    assert SCRIPT_REASONING not in text, f"{what}: the reasoning leaked into the answer:\n{text!r}"
    assert "None" not in text and "undefined" not in text, f"{what}:\n{text!r}"


def check_reasoning_then_answer(out: str, what: str) -> None:
    """What NVIDIA's examples print: the reasoning on its own line, then the content."""
    assert out.startswith(SCRIPT_REASONING + "\n"), f"{what}: the reasoning first:\n{out!r}"
    check_answer(out[len(SCRIPT_REASONING) + 1:], what)


def nvidia_values(served: Served, key: str) -> dict[str, str]:
    return {**NVIDIA_VALUES, "${BASE_URL}": f"{served.url}/v1", "${API_KEY}": key,
            "${MODEL}": served.state["served_model"]}


@pytest.fixture(scope="module")
def v3_key(serve_v3: Served) -> str:
    """A key of its own on serve_v3 (`r1nest keys create`, as an operator hands one out): the
    examples here spend from it, so serve_v3's demo key keeps the balance the other modules'
    tests expect."""
    done = subprocess.run(
        [sys.executable, "-m", "r1nest", "keys", "create", "--credits", "1000000", "--name", "reference-clients",
         "--json", "--data-dir", str(serve_v3.data_dir)],
        env=clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)["key"]


# -- Alibaba Cloud Computing Nest ------------------------------------------------------------


def test_computing_nest_curl_as_printed(serve_examples: Served, tmp_path: Path) -> None:
    """`curl -X Post http://${ServerIP}:8000/...`, its long prompt, no max_tokens."""
    port = serve_examples.url.rsplit(":", 1)[1]
    code = fill("computing_nest_curl.sh", {
        "${ServerIP}:8000": f"127.0.0.1:{port}",
        "${ApiKey}": serve_examples.key,
        "${ModelName}": serve_examples.state["served_model"],
    })
    out = run(["bash", str(write(tmp_path, "computing_nest_curl.sh", code))], tmp_path)
    reply = json.loads(out)  # a 200 answer: a chat.completion, not an error object
    assert "error" not in reply, reply
    assert reply["object"] == "chat.completion" and reply["model"] == serve_examples.state["served_model"]
    message = reply["choices"][0]["message"]
    assert message["reasoning_content"] == SCRIPT_REASONING
    check_answer(message["content"], "curl")
    assert reply["usage"]["completion_tokens"] > 0


def test_computing_nest_python_streams_the_answer_without_none(serve_v3: Served, v3_key: str,
                                                              tmp_path: Path) -> None:
    """models.list() then a stream with max_completion_tokens=1024, printing delta.content as is:
    the reasoning deltas carry content "", so nothing prints "None"."""
    code = fill("computing_nest_python.py", {"${ApiKey}": v3_key, "${ServerUrl}": f"{serve_v3.url}/v1"})
    out = run([sys.executable, str(write(tmp_path, "computing_nest_python.py", code))], tmp_path)
    model = serve_v3.state["served_model"]
    assert out.startswith(model + "\n"), f"first the model id:\n{out[:300]!r}"
    answer = out[len(model) + 1:]
    assert "None" not in out
    check_answer(answer, "Computing Nest Python")
    assert answer.count(SCRIPT_CONTENT) > 50, "1024 tokens of answer"


# -- NVIDIA ----------------------------------------------------------------------------------


# NVIDIA's three SDK examples ask for max_tokens 4096: about 12 s each on the tiny model on this
# CPU. (Run side by side they take as long: vLLM's CPU worker keeps both cores busy, so the
# later programs hardly start before the first one's answer is done.)


def test_nvidia_python_openai_sdk(serve_v3: Served, v3_key: str, tmp_path: Path) -> None:
    code = fill("nvidia_python.py", {**nvidia_values(serve_v3, v3_key), "${STREAM}": "False"})
    out = run([sys.executable, str(write(tmp_path, "nvidia_python.py", code))], tmp_path)
    check_reasoning_then_answer(out, "NVIDIA Python")


def test_nvidia_javascript_openai_package(serve_v3: Served, v3_key: str, tmp_path: Path) -> None:
    workdir = node_dir_or_skip(tmp_path, "openai")
    code = fill("nvidia_javascript.mjs", {**nvidia_values(serve_v3, v3_key), "${STREAM}": "false"})
    out = run(["node", str(write(workdir, "nvidia_javascript.mjs", code))], workdir)
    check_reasoning_then_answer(out, "NVIDIA JavaScript")


def test_nvidia_langchain_chatnvidia(serve_v3: Served, v3_key: str, tmp_path: Path) -> None:
    """ChatNVIDIA with base_url= (the one argument added): the model is given, so it does not list
    /v1/models; the reasoning comes from the message's reasoning_content field."""
    if importlib.util.find_spec("langchain_nvidia_ai_endpoints") is None:  # not imported here: slow
        pytest.skip("langchain-nvidia-ai-endpoints is not installed (pip install -e '.[dev]')")
    code = fill("nvidia_langchain.py", nvidia_values(serve_v3, v3_key))
    out = run([sys.executable, str(write(tmp_path, "nvidia_langchain.py", code))], tmp_path)
    check_reasoning_then_answer(out, "NVIDIA LangChain")


def test_nvidia_curl_shows_status_headers_and_body(serve_examples: Served, tmp_path: Path) -> None:
    """-i and -w "\\n%{http_code}": the status line, the headers (the credits left), the body, 200."""
    values = {"${BASE_URL}": f"{serve_examples.url}/v1", "${API_KEY}": serve_examples.key,
              "${CONTENT}": NVIDIA_VALUES["${CONTENT}"]}
    code = fill("nvidia_curl.sh", values)
    before = serve_examples.credits()
    out = run(["bash", str(write(tmp_path, "nvidia_curl.sh", code))], tmp_path)
    head, blank, rest = out.partition("\r\n\r\n")
    assert blank, f"no header block:\n{out[:500]!r}"
    status_line, *header_lines = head.split("\r\n")
    assert re.fullmatch(r"HTTP/1\.1 200 OK", status_line), status_line
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    assert headers["content-type"].startswith("application/json")
    remaining = int(headers["x-remaining-credits"])
    assert 0 < remaining < before
    body, newline, code_line = rest.rstrip("\n").rpartition("\n")
    assert newline and code_line == "200", f"the last line is the status code:\n{rest[-200:]!r}"
    reply = json.loads(body)
    message = reply["choices"][0]["message"]
    assert message["reasoning_content"] == SCRIPT_REASONING
    check_answer(message["content"], "NVIDIA curl")
    assert reply["model"] == serve_examples.state["served_model"]  # no model sent: the served one
    assert serve_examples.credits() == remaining  # the header was the balance after settlement


# -- Segmind ---------------------------------------------------------------------------------


def test_segmind_axios_with_x_api_key(serve_examples: Served, tmp_path: Path) -> None:
    """x-api-key, no model, no max_tokens, user / assistant / user. console.log(response.data)
    shows the completion; Node prints objects three levels deep, so the message itself shows as
    [Object] (the same on Segmind's service). A second run with a deeper console.log, set from
    outside (NODE_OPTIONS), shows that the data holds reasoning_content and content."""
    workdir = node_dir_or_skip(tmp_path, "axios")
    code = fill("segmind_axios.js", {"${API_KEY}": serve_examples.key,
                                     "${URL}": f"{serve_examples.url}/v1/chat/completions"})
    script = write(workdir, "segmind_axios.js", code)  # CommonJS: no package.json says "module" here
    out = run(["node", str(script)], workdir)
    assert "Error" not in out
    assert out.startswith("{") and "object: 'chat.completion'" in out, out
    assert f"model: '{serve_examples.state['served_model']}'" in out, out
    assert "choices: [" in out and "usage: {" in out, out

    deeper = write(tmp_path, "inspect_depth.cjs", "require('util').inspect.defaultOptions.depth = null;\n")
    out = run(["node", str(script)], workdir, env=clean_env(NODE_OPTIONS=f"--require {deeper}"))
    assert f"reasoning_content: '{SCRIPT_REASONING}'" in out, out
    assert "content: '\\n' +" in out and f"'{SCRIPT_CONTENT}" in out, out  # Node splits long strings


# -- DeepSeek multi-round ----------------------------------------------------------------------


def test_second_turn_with_the_reasoning_sent_back(serve_examples: Served, tmp_path: Path) -> None:
    code = fill("deepseek_multi_round.py", {"${BASE_URL}": f"{serve_examples.url}/v1",
                                            "${API_KEY}": serve_examples.key,
                                            "${MODEL}": serve_examples.state["served_model"]})
    out = run([sys.executable, str(write(tmp_path, "deepseek_multi_round.py", code))], tmp_path)
    for round_ in (1, 2, 3):
        assert f"Round {round_} reasoning: {SCRIPT_REASONING}\n" in out, out
        answer = out.split(f"Round {round_} answer: ", 1)[1].split(f"\nRound {round_ + 1} ", 1)[0]
        check_answer(answer, f"round {round_}")
