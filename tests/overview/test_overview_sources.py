"""Contexts from each source: Pulumi stack outputs, a Modal app, a local data dir; live probes; the CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from r1nest import files
from r1nest.errors import ConfigError
from r1nest.ledger.memory import MemoryStore
from r1nest.overview import sources
from r1nest.overview.cli import overview
from r1nest.overview.context import Readiness
from r1nest.settings import Settings

from .conftest import make_context

FIXTURE = Path(__file__).parent / "fixtures" / "pulumi-outputs.json"
OUTPUTS = json.loads(FIXTURE.read_text())


def test_pulumi_outputs_give_the_aws_context():
    ctx = sources.from_pulumi_outputs(OUTPUTS)
    assert ctx.model == "deepseek-r1" and ctx.engine == "vllm" and ctx.model_repo == "deepseek-ai/DeepSeek-R1"
    assert ctx.public_endpoint == "http://198.51.100.23:8000/v1"
    assert ctx.internal_endpoint == "http://10.20.1.37:8000/v1"
    assert ctx.api_key == OUTPUTS["api_key"]
    assert ("instance type", "p5en.48xlarge") in ctx.details and ("region", "us-east-2") in ctx.details
    assert ctx.remaining_credits is None  # the "credits" output is the initial grant, not the balance


def test_admin_key_from_the_stack_is_never_on_the_page():
    from r1nest.overview.render import render_overview

    html = render_overview(sources.from_pulumi_outputs(OUTPUTS), standalone=True)
    assert OUTPUTS["admin_key"] not in html
    assert OUTPUTS["api_key"] in html


@pytest.mark.parametrize("missing", ["public_endpoint", "model", "engine"])
def test_pulumi_outputs_missing_a_field_say_which(missing):
    outputs = {k: v for k, v in OUTPUTS.items() if k != missing}
    with pytest.raises(ConfigError, match=missing):
        sources.from_pulumi_outputs(outputs)


def test_masked_secret_output_is_refused_with_a_hint():
    with pytest.raises(ConfigError, match="--show-secrets"):
        sources.from_pulumi_outputs({**OUTPUTS, "api_key": "[secret]"})


def test_pulumi_cli_is_run_with_argv_and_its_failure_is_a_clear_error(tmp_path):
    calls = []

    def run(argv, **kw):
        calls.append((argv, kw))
        return subprocess.CompletedProcess(argv, 0, stdout=FIXTURE.read_bytes(), stderr=b"")

    outputs = sources.pulumi_stack_outputs(tmp_path, stack="dev", run=run)
    assert outputs == OUTPUTS
    argv, kw = calls[0]
    assert argv == ["pulumi", "stack", "output", "--json", "--show-secrets", "--non-interactive", "--stack", "dev"]
    assert kw["cwd"] == str(tmp_path) and kw["timeout"] > 0 and "shell" not in kw

    def failing(argv, **kw):
        return subprocess.CompletedProcess(argv, 255, stdout=b"", stderr=b"error: no stack named 'dev' found\n")

    with pytest.raises(ConfigError, match="no stack named 'dev'"):
        sources.pulumi_stack_outputs(tmp_path, stack="dev", run=failing)


def test_stack_json_file_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        sources.load_outputs_file(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        sources.load_outputs_file(bad)


def test_modal_context_from_the_deployed_app_and_key_file(tmp_path):
    key = make_context().api_key
    key_file = tmp_path / "modal.api_key"
    files.write_key_file(key_file, key)
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    seen = []

    def lookup(app, function, environment):
        seen.append((app, function, environment))
        return "https://acme--r1nest-serve.modal.run"

    ctx = sources.from_modal(app_name="r1nest", function_name="serve", model="deepseek-r1-distill-qwen-7b",
                             engine="vllm", key_file=key_file, lookup=lookup)
    assert seen == [("r1nest", "serve", None)]
    assert ctx.public_endpoint == "https://acme--r1nest-serve.modal.run/v1"
    assert ctx.internal_endpoint is None and "no private network address" in ctx.internal_endpoint_note
    assert ctx.api_key == key

    with pytest.raises(ConfigError, match="no web URL"):
        sources.from_modal(app_name="r1nest", function_name="serve", model="m", engine="vllm",
                           key_file=key_file, lookup=lambda *a: None)


def test_local_context_from_the_data_dir(tmp_path):
    settings = Settings(data_dir=tmp_path, port=8123, served_model="tiny-r1")
    ctx = sources.from_local(settings)
    assert ctx.public_endpoint == "http://127.0.0.1:8123/v1"
    assert ctx.internal_endpoint is None and "R1NEST_INTERNAL_URL" in ctx.internal_endpoint_note
    assert ctx.api_key is None and ctx.model == "tiny-r1"
    key = make_context().api_key
    files.write_key_file(tmp_path / files.API_KEY_FILE, key)
    settings = Settings(data_dir=tmp_path, public_url="https://r1.example.com", internal_url="http://10.0.0.5:8000")
    ctx = sources.from_local(settings)
    assert ctx.api_key == key and ctx.internal_endpoint == "http://10.0.0.5:8000/v1"
    assert ctx.public_endpoint == "https://r1.example.com/v1"


def test_local_context_follows_serve_json(tmp_path):
    state = {"pid": 1, "gateway_url": "http://127.0.0.1:8011", "engine_url": "http://127.0.0.1:8100",
             "engine": "sglang", "served_model": "tiny-deepseek-v3", "model": ".r1nest/models/tiny-deepseek-v3"}
    (tmp_path / files.SERVE_STATE_FILE).write_text(json.dumps(state))
    ctx = sources.from_local(Settings(data_dir=tmp_path))
    assert ctx.public_endpoint == "http://127.0.0.1:8011/v1"
    assert ctx.engine == "sglang" and ctx.model == "tiny-deepseek-v3"
    assert ctx.model_repo == ".r1nest/models/tiny-deepseek-v3"
    assert "8100" not in ctx.public_endpoint, "the engine's own port is never shown"
    ctx = sources.from_local(Settings(data_dir=tmp_path, public_url="https://r1.example.com"))
    assert ctx.public_endpoint == "https://r1.example.com/v1"
    (tmp_path / files.SERVE_STATE_FILE).write_text("{broken")
    with pytest.raises(ConfigError, match="serve.json"):
        sources.from_local(Settings(data_dir=tmp_path))


async def test_gateway_context_reads_the_key_balance_from_the_store(tmp_path):
    from r1nest.accounts import create_api_key

    store = MemoryStore()
    _, key = await create_api_key(store, name="demo", credits=4321, now=1.0)
    files.write_key_file(tmp_path / files.API_KEY_FILE, key)
    settings = Settings(data_dir=tmp_path)
    ctx = await sources.gateway_context(settings=settings, store=store, served_model="m", phase="warming", eta_s=30.0)
    assert ctx.api_key == key and ctx.remaining_credits == 4321
    assert ctx.readiness == Readiness("warming", 30.0)
    assert ctx.public_endpoint == "http://127.0.0.1:8000/v1"
    ctx = await sources.gateway_context(settings=settings, store=store, served_model="m", phase="ready",
                                        eta_s=None, request_base_url="http://203.0.113.7:8000")
    assert ctx.public_endpoint == "http://203.0.113.7:8000/v1"
    ctx = await sources.gateway_context(settings=settings, store=store, served_model="m", phase="ready",
                                        eta_s=None, request_base_url='http://evil"host')
    assert ctx.public_endpoint == "http://127.0.0.1:8000/v1"
    configured = Settings(data_dir=tmp_path, public_url="https://r1.example.com")
    ctx = await sources.gateway_context(settings=configured, store=store, served_model="m", phase="ready",
                                        eta_s=None, request_base_url="http://203.0.113.7:8000")
    assert ctx.public_endpoint == "https://r1.example.com/v1", "a configured public URL wins"


def test_probe_reads_health_and_credits():
    ctx = make_context(remaining_credits=None, readiness=Readiness())
    asked = []

    def http_get(url, headers):
        asked.append((url, dict(headers)))
        if url.endswith("/health"):
            return 503, b'{"status": "warming", "eta_s": 42.0}'
        if url.endswith("/models"):
            return 200, b'{"object": "list", "data": [{"id": "deepseek-r1-0528", "object": "model"}]}'
        return 200, b'{"object": "credits", "remaining_credits": 777}'

    live = sources.probe(ctx, http_get=http_get)
    assert live == sources.Live(Readiness("warming", 42.0), 777, "deepseek-r1-0528")
    assert sources.with_live(ctx, live).model == "deepseek-r1-0528"
    assert asked[0] == ("http://203.0.113.7:8000/health", {})
    assert asked[1] == ("http://203.0.113.7:8000/v1/credits", {"Authorization": f"Bearer {ctx.api_key}"})
    assert ctx.api_key not in asked[1][0], "the key never goes in a URL"


def test_probe_failures_become_unknown_with_a_reason():
    def down(url, headers):
        raise ConnectionRefusedError

    live = sources.probe(make_context(), http_get=down)
    assert live.readiness.phase == "unknown" and "Could not reach" in live.readiness.detail
    assert live.remaining_credits is None
    live = sources.probe(make_context(), http_get=lambda u, h: (200, b"<html>"))
    assert live.readiness.phase == "unknown"


def test_cli_renders_the_stack_json_to_a_private_file(tmp_path):
    out = tmp_path / "page.html"
    result = CliRunner().invoke(overview, ["--stack-json", str(FIXTURE), "--out", str(out), "--no-probe",
                                           "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    html = out.read_text()
    assert OUTPUTS["public_endpoint"] in html and OUTPUTS["api_key"] in html
    assert OUTPUTS["api_key"] not in result.output, "the key is not printed"


def test_cli_bad_input_is_a_message_not_a_traceback(tmp_path):
    result = CliRunner().invoke(overview, ["--stack-json", str(tmp_path / "missing.json"), "--no-probe"])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError) and "cannot read" in str(result.exception)


def test_cli_open_opens_the_written_file(tmp_path, monkeypatch):
    import r1nest.overview.cli as cli

    opened = []
    monkeypatch.setattr(cli.webbrowser, "open", lambda url: opened.append(url) or True)
    out = tmp_path / "p.html"
    result = CliRunner().invoke(overview, ["--stack-json", str(FIXTURE), "--out", str(out), "--no-probe", "--open",
                                           "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert opened == [out.resolve().as_uri()]
    assert "?" not in opened[0], "nothing secret in the URL"


def test_cli_is_registered_in_the_r1nest_command():
    from r1nest.cli import cli as root

    result = CliRunner().invoke(root, ["overview", "--help"])
    assert result.exit_code == 0 and "--stack-json" in result.output and "--modal-app" in result.output


async def test_gateway_context_reads_the_keys_usage_from_the_store(tmp_path):
    """The page's key only: its last 24 hours by hour and 30 days by day, from settled requests."""
    from r1nest.accounts import create_api_key
    from r1nest.ledger.base import Usage
    from r1nest.ledger.sqlite import SqliteStore

    now = 1796048707.0  # 2026-11-30T14:25:07Z
    store = SqliteStore(tmp_path / "ledger.sqlite3")
    try:
        page_key, key = await create_api_key(store, name="demo", credits=100_000, now=now - 90 * 86400)
        other, _ = await create_api_key(store, name="other", credits=100_000, now=now - 90 * 86400)
        settled = [  # (key, hours ago, charged, usage)
            (page_key, 0.2, 40, Usage(100, 20, 30)), (page_key, 0.3, 60, Usage(10, 0, 50)),
            (page_key, 23.0, 7, None), (page_key, 30.0, 500, Usage(1, 1, 1)), (page_key, 24 * 45, 9999, Usage(9, 9, 9)),
            (other, 0.1, 777, Usage(5, 5, 5)),
        ]
        for record, hours_ago, charged, usage in settled:
            at = now - hours_ago * 3600
            reservation = await store.reserve(record.key_id, 10_000, ttl_s=600, now=at - 1)
            await store.settle(reservation.reservation_id, charged, now=at, usage=usage)
        voided = await store.reserve(page_key.key_id, 1000, ttl_s=600, now=now - 60)
        await store.void(voided.reservation_id, now=now - 30)
        files.write_key_file(tmp_path / files.API_KEY_FILE, key)
        ctx = await sources.gateway_context(settings=Settings(data_dir=tmp_path), store=store, served_model="m",
                                            phase="ready", eta_s=None, now=now)
    finally:
        await store.close()
    panel = ctx.usage
    assert panel is not None and panel.available and panel.key_id == page_key.key_id
    assert len(panel.hourly.buckets) == 24 and len(panel.daily.buckets) == 30
    assert panel.hourly.totals.as_json() == {"requests": 3, "prompt_tokens": 110, "cached_tokens": 20,
                                             "completion_tokens": 80, "credits": 107}
    assert panel.daily.totals.as_json() == {"requests": 4, "prompt_tokens": 111, "cached_tokens": 21,
                                            "completion_tokens": 81, "credits": 607}
    assert [b.credits for b in panel.hourly.with_requests] == [7, 100]  # 23 h ago; both in the current hour
    assert ctx.remaining_credits == 100_000 - 607 - 9999


async def test_gateway_context_without_usage_says_why(tmp_path):
    from r1nest.errors import StoreUnavailable
    from r1nest.accounts import create_api_key
    from r1nest.keys import new_key

    store = MemoryStore()
    _, stranger = new_key()  # a key file whose key is not in this ledger
    files.write_key_file(tmp_path / files.API_KEY_FILE, stranger)
    ctx = await sources.gateway_context(settings=Settings(data_dir=tmp_path), store=store, served_model="m",
                                        phase="ready", eta_s=None)
    assert not ctx.usage.available and ctx.usage.note == sources.GATEWAY_NO_KEY_NOTE

    class LedgerDown(MemoryStore):  # the fault on demand: the ledger stops answering usage queries
        async def usage(self, **_):
            raise StoreUnavailable("database is locked")

    down = LedgerDown()
    _, key = await create_api_key(down, name="demo", credits=5, now=1.0)
    files.write_key_file(tmp_path / files.API_KEY_FILE, key)
    ctx = await sources.gateway_context(settings=Settings(data_dir=tmp_path), store=down, served_model="m",
                                        phase="ready", eta_s=None)
    assert ctx.remaining_credits == 5 and not ctx.usage.available
    assert "could not be read just now" in ctx.usage.note and "locked" not in ctx.usage.note
