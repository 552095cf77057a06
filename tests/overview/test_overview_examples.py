"""The page's examples are run, as shown, against a running deployment.

The deployment is the real gateway (uvicorn on loopback, SQLite ledger) in front of the fake
engine. The examples are taken back out of the rendered page, from the DOM of a real Chromium for
the page the gateway serves, and from the HTML of the file `r1nest overview` writes; then curl runs
under bash, the Python example under this interpreter with the openai SDK, the JavaScript example
under node with the openai npm package. The page must not show a command that does not work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from r1nest import files
from r1nest.gateway.app import create_app
from r1nest.gateway.upstream import UpstreamConfig
from r1nest.ledger.sqlite import SqliteStore
from r1nest.overview.cli import overview
from r1nest.paths import REPO_ROOT
from r1nest.settings import Settings
from r1nest.testing.asgi_server import ServedApp
from r1nest.testing.fake_engine import FakeEngine

from .conftest import ADMIN_KEY, DeferredApp
from .pagetext import extract

MODEL = "deepseek-r1"
ENGINE_KEY = "engine-key-for-the-overview-tests-0123"
REASONING_TOKENS, CONTENT_TOKENS = 5, 4
REASONING = "".join(f"think{i} " for i in range(REASONING_TOKENS))
ANSWER = "".join(f"word{i} " for i in range(CONTENT_TOKENS))
CREDITS = 5_000_000
JS_DIR = REPO_ROOT / "tests" / "js"
RUN_TIMEOUT_S = 120


@dataclass
class Deployment:
    url: str
    key: str
    data_dir: Path
    engine: FakeEngine


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("deployment")
    deferred = DeferredApp()
    with FakeEngine(api_key=ENGINE_KEY, served_model=MODEL, reasoning_tokens=REASONING_TOKENS,
                    content_tokens=CONTENT_TOKENS) as engine:
        served = ServedApp(deferred)
        settings = Settings(data_dir=data_dir, admin_key=ADMIN_KEY, public_url=served.url, served_model=MODEL)
        store = SqliteStore(data_dir / "ledger.sqlite3")
        deferred.app = create_app(settings=settings, store=store, upstream=UpstreamConfig(engine.url, ENGINE_KEY, MODEL))
        with served:
            response = httpx.post(served.url + "/admin/keys", json={"name": "overview", "credits": CREDITS},
                                  headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
            assert response.status_code == 201, response.text
            key = response.json()["key"]
            files.write_key_file(data_dir / files.API_KEY_FILE, key)  # the deployment's ApiKey
            yield Deployment(served.url, key, data_dir, engine)
        served_store_close = getattr(store, "close", None)
        if served_store_close is not None:
            import asyncio

            asyncio.run(served_store_close())


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "R1NEST_"))}
    env.update(extra)
    return env


def run_example(example_id: str, code: str, workdir: Path, env: dict[str, str]) -> str:
    """Runs one example exactly as shown; returns its stdout (fails the test on a non-zero exit)."""
    if example_id in ("curl", "credits"):
        argv = ["bash", "-c", code]
    elif example_id in ("python", "anthropic"):
        path = workdir / ("r1_example.py" if example_id == "python" else "r1_anthropic.py")
        path.write_text(code)
        argv = [sys.executable, str(path)]
    elif example_id == "javascript":
        path = workdir / "r1_example.mjs"
        path.write_text(code)
        modules = workdir / "node_modules"
        if not modules.exists():
            modules.symlink_to(JS_DIR / "node_modules")
        argv = ["node", str(path)]
    else:
        raise AssertionError(f"unknown example {example_id}")
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, f"{example_id} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def check_outputs(outputs: dict[str, str]) -> None:
    reply = json.loads(outputs["curl"])
    message = reply["choices"][0]["message"]
    assert message["reasoning_content"].strip() == REASONING.strip()
    assert message["content"].strip() == ANSWER.strip()
    assert reply["model"] == MODEL

    for name in ("python", "javascript", "anthropic"):
        if name not in outputs:
            continue
        out = outputs[name]
        assert out.startswith("Thinking:\n"), out
        thinking, answer_marker, answer = out.partition("\n\nAnswer:\n")
        assert answer_marker, f"{name}: no Answer section:\n{out}"
        assert thinking == "Thinking:\n" + REASONING, f"{name}: reasoning first:\n{out}"
        answer_text, _, tail = answer.partition("\n\n[")
        assert answer_text.strip() == ANSWER.strip(), f"{name}: then the answer:\n{out}"
        # the final usage chunk: tokens and the credits left after settlement
        match = re.fullmatch(r"(\d+) tokens; (\d+) credits left\]\n", tail)
        assert match and 0 < int(match.group(2)) < CREDITS, f"{name}: usage line:\n{out}"

    credits = json.loads(outputs["credits"])
    assert isinstance(credits["remaining_credits"], int) and 0 < credits["remaining_credits"] < CREDITS


def node_with_openai_or_skip() -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (JS_DIR / "node_modules" / "openai").is_dir():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed, so the openai package is not available")
        try:
            subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=JS_DIR,
                           capture_output=True, timeout=300, check=False)
        except subprocess.TimeoutExpired:
            pass
        if not (JS_DIR / "node_modules" / "openai").is_dir():
            pytest.skip("npm could not install the openai package (no registry access?)")


def test_examples_from_the_written_page_run_against_the_deployment(deployment, tmp_path):
    out = tmp_path / "overview.html"
    result = CliRunner().invoke(overview, ["--from", "local", "--data-dir", str(deployment.data_dir),
                                           "--out", str(out)], env={"R1NEST_PUBLIC_URL": deployment.url})
    assert result.exit_code == 0, result.output
    assert "ready" in result.output
    page = extract(out.read_text())
    assert set(page.examples) == {"curl", "python", "javascript", "anthropic", "credits"}
    for code in page.examples.values():  # the real key is written in, nothing to fill in
        assert "OPENAI_API_KEY" not in code
    assert deployment.key in page.examples["python"]

    before = len(deployment.engine.requests)
    env = clean_env()
    outputs = {name: run_example(name, code, tmp_path, env) for name, code in page.examples.items()
               if name != "javascript"}
    check_outputs(outputs)
    sent = [r.json() for r in deployment.engine.requests[before:] if r.path == "/v1/chat/completions"]
    assert len(sent) == 3, "curl, Python and the Anthropic example each made one request to the engine"
    for body in sent:
        assert body["model"] == MODEL and body["temperature"] == 0.6 and body["top_p"] == 0.95
        assert [m["role"] for m in body["messages"]] == ["user"]
        assert isinstance(body["max_tokens"], int) and body["max_tokens"] > 0  # filled in by the gateway


def test_javascript_example_runs_with_node_and_the_openai_package(deployment, tmp_path):
    node_with_openai_or_skip()
    out = tmp_path / "overview.html"
    result = CliRunner().invoke(overview, ["--from", "local", "--data-dir", str(deployment.data_dir),
                                           "--out", str(out), "--no-probe"],
                                env={"R1NEST_PUBLIC_URL": deployment.url, "R1NEST_SERVED_MODEL": MODEL})
    assert result.exit_code == 0, result.output
    code = extract(out.read_text()).examples["javascript"]
    output = run_example("javascript", code, tmp_path, clean_env())
    check_outputs({"javascript": output, "curl": json.dumps(_curl_reply(deployment)),
                   "credits": json.dumps({"remaining_credits": 1})})


def _curl_reply(deployment: Deployment) -> dict:
    # check_outputs wants a curl reply too; this one is made directly, the JS test checks only JS
    response = httpx.post(deployment.url + "/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {deployment.key}"},
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    return response.json()


def test_page_examples_fail_when_the_key_is_wrong(deployment, tmp_path):
    """The runner can fail: the same examples with a revoked-looking key get 401, not output."""
    out = tmp_path / "overview.html"
    key_file = tmp_path / "other.key"
    files.write_key_file(key_file, "r1n-000000000000-" + "x" * 43)
    result = CliRunner().invoke(overview, ["--from", "local", "--data-dir", str(deployment.data_dir), "--out",
                                           str(out), "--no-probe", "--key-file", str(key_file)],
                                env={"R1NEST_PUBLIC_URL": deployment.url, "R1NEST_SERVED_MODEL": MODEL})
    assert result.exit_code == 0, result.output
    code = extract(out.read_text()).examples["credits"]
    done = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert json.loads(done.stdout)["error"]["code"] == "invalid_api_key"
    code = extract(out.read_text()).examples["python"]
    with pytest.raises(AssertionError, match="python failed"):
        run_example("python", code, tmp_path, clean_env())


@pytest.mark.browser
def test_examples_from_the_served_page_in_chromium_run_against_the_deployment(deployment, tmp_path):
    from .browser import LAPTOP, launched_browser, screenshot

    with launched_browser() as browser:
        context = browser.new_context(viewport=LAPTOP, permissions=["clipboard-read", "clipboard-write"])
        page = context.new_page()
        try:
            response = page.goto(deployment.url + "/overview")
            assert page.url == deployment.url + "/overview/login"
            assert deployment.key not in page.content()
            page.fill("#admin_key", ADMIN_KEY)
            page.click("button[type=submit]")
            page.wait_for_url(deployment.url + "/overview", timeout=30_000)
            response = page.reload()
            csp = response.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert page.inner_text("#public-endpoint") == deployment.url + "/v1"
            reveal = page.query_selector("button[data-reveal]")
            if reveal is not None:
                reveal.click()
            shown_key = page.inner_text("#api-key") if page.query_selector("#api-key .key-value") else None
            examples = page.eval_on_selector_all(
                "pre[data-example]", "els => Object.fromEntries(els.map(e => [e.dataset.example, e.innerText]))"
            )
            # what Copy puts on the clipboard is what is shown
            page.click("button[data-copy=code-curl]")
            page.wait_for_selector("button[data-copy=code-curl].copied", timeout=10_000)
            assert page.evaluate("navigator.clipboard.readText()") == examples["curl"]
            screenshot(page, "gateway-served")
        finally:
            context.close()

    assert set(examples) == {"curl", "python", "javascript", "anthropic", "credits"}
    # The gateway's page shows the deployment's key (data_dir/api_key) with its balance; a gateway
    # that does not know it has examples that read $OPENAI_API_KEY, and says so. Either way the
    # text runs as shown.
    if shown_key is not None:
        assert shown_key == deployment.key, "revealed, the key is the deployment's"
        assert all(deployment.key in code for code in examples.values())
        env = clean_env()
    else:
        assert all("OPENAI_API_KEY" in code for code in examples.values())
        env = clean_env(OPENAI_API_KEY=deployment.key)
    names = ["curl", "python", "anthropic", "credits"]
    try:
        node_with_openai_or_skip()
        names.append("javascript")
    except pytest.skip.Exception:
        pass
    outputs = {name: run_example(name, examples[name], tmp_path, env) for name in names}
    check_outputs(outputs)
