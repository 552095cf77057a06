"""The page and its examples, rendered without a browser: content, escaping, masking, no inline script."""

from __future__ import annotations

import ast
import json
import re
import shlex

import pytest

from r1nest.errors import ConfigError
from r1nest.overview.context import Readiness, api_base_url, mask_key
from r1nest.overview.examples import build_examples
from r1nest.overview.render import render_overview

from .conftest import USAGE_NOW, make_context, make_usage_panel as usage_panel
from .pagetext import extract


def test_examples_on_the_page_are_exactly_the_built_examples(context):
    html = render_overview(context)
    found = extract(html).examples
    built = {ex.id: ex.code for ex in build_examples(context)}
    assert set(found) == {"curl", "python", "javascript", "anthropic", "credits"}
    assert found == built


def test_page_shows_endpoints_model_credits_and_masks_the_key(context):
    html = render_overview(context)
    assert "http://203.0.113.7:8000/v1" in html
    assert "http://10.0.1.12:8000/v1" in html
    assert "987,654" in html
    assert mask_key(context.api_key) in html
    # the full key is in the page only inside .key-value spans, hidden by default
    assert 'data-key-visible="false"' in html
    for match in re.finditer(re.escape(context.api_key), html):
        before = html[: match.start()]
        assert before.endswith('<span class="key-value">'), html[match.start() - 80 : match.end()]


def test_served_page_has_no_inline_script_or_style(context):
    html = render_overview(context, logout_url="/overview/logout", csrf_token="t" * 43)
    scripts = extract(html).scripts
    assert scripts, "the page loads its script"
    for attrs, text in scripts:
        assert attrs.get("src", "").startswith("/overview/static/"), attrs
        assert text.strip() == ""
    assert "<style" not in html
    assert not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html), "no inline event handlers"
    assert "https://" not in html.replace("https://host", ""), "no CDN or external asset"


def test_standalone_page_inlines_its_assets_and_has_no_logout(context):
    html = render_overview(context, standalone=True, logout_url="/overview/logout", csrf_token="x")
    assert "stylesheet" not in html and "/overview/static" not in html and "<script src" not in html
    assert "<style>" in html and "writeClipboard" in html
    assert "csrf_token" not in html


def test_python_and_javascript_examples_parse_and_print_reasoning_before_answer(context):
    examples = {ex.id: ex.code for ex in build_examples(context)}
    ast.parse(examples["python"])
    python = examples["python"]
    assert python.index('print("Thinking:")') < python.index('getattr(delta, "reasoning_content"') < python.index("Answer:")
    assert "stream=True" in python and "temperature=0.6" in python and "top_p=0.95" in python
    assert "system" not in examples["python"].split("messages=")[1].split("\n")[0]
    js = examples["javascript"]
    assert 'import OpenAI from "openai"' in js and "stream: true" in js
    assert js.index('write("Thinking:') < js.index("if (delta.reasoning_content)") < js.index("Answer:")


def test_curl_example_is_one_shell_command_with_bearer_and_json_body(context):
    curl = next(ex for ex in build_examples(context) if ex.id == "curl").code
    words = shlex.split(curl.replace("\\\n", " "))
    assert words[:3] == ["curl", "-sS", "http://203.0.113.7:8000/v1/chat/completions"]
    assert f"Authorization: Bearer {context.api_key}" in words
    body = json.loads(words[words.index("-d") + 1])
    assert body["model"] == "deepseek-r1" and body["temperature"] == 0.6 and body["top_p"] == 0.95
    assert "stream" not in body and "max_tokens" not in body  # the deployment's and the key's limits apply
    assert "\\boxed{}" in body["messages"][0]["content"]


def test_without_a_key_the_examples_read_openai_api_key():
    ctx = make_context(api_key=None)
    examples = {ex.id: ex.code for ex in build_examples(ctx)}
    assert 'Bearer $OPENAI_API_KEY"' in examples["curl"]
    assert 'os.environ["OPENAI_API_KEY"]' in examples["python"]
    ast.parse(examples["python"])
    assert "process.env.OPENAI_API_KEY" in examples["javascript"]
    html = render_overview(ctx)
    assert "not known here" in html and "Reveal" not in html


def test_values_are_escaped_in_html():
    ctx = make_context(deployment="<script>alert(1)</script>", details=(("x<y", "a&b"),))
    html = render_overview(ctx)
    assert "<script>alert(1)" not in html
    assert "&lt;script&gt;alert(1)" in html and "x&lt;y" in html and "a&amp;b" in html


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/v1",
        "http://host/v1?key=abc",
        "http://user:pw@host/v1",
        "http://host/v1#x",
        'http://host/v1"; rm -rf ~; "',
        "http://host/$(id)",
        "javascript:alert(1)",
        "",
    ],
)
def test_bad_endpoints_are_refused(url):
    with pytest.raises(ConfigError):
        api_base_url(url)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://1.2.3.4:8000", "http://1.2.3.4:8000/v1"),
        ("https://x.modal.run/", "https://x.modal.run/v1"),
        ("https://lb.example.com/v1/", "https://lb.example.com/v1"),
        ("http://[::1]:8000/v1", "http://[::1]:8000/v1"),
    ],
)
def test_endpoints_become_api_base_urls(url, base):
    assert api_base_url(url) == base


@pytest.mark.parametrize("model", ["deepseek-r1'; rm -rf /", 'a"b', "x y", ""])
def test_bad_model_names_are_refused(model):
    with pytest.raises(ConfigError):
        make_context(model=model)


def test_bad_keys_and_missing_internal_note_are_refused():
    with pytest.raises(ConfigError):
        make_context(api_key='abc"; echo pwned; "')
    with pytest.raises(ConfigError):
        make_context(internal_endpoint=None)
    ctx = make_context(internal_endpoint=None, internal_endpoint_note="Modal has no private address.")
    html = render_overview(ctx)
    assert "Modal has no private address." in html and 'id="internal-endpoint" class="value none">none<' in html


def test_readiness_labels():
    assert Readiness("ready").label == "ready"
    assert Readiness("warming", 125).label == "warming up, ready in about 2 min"
    assert Readiness("warming", 598).label == "warming up, ready in about 10 min"
    assert Readiness("warming", 7300).label == "warming up, ready in about 2 h 2 min"
    assert Readiness("warming").label == "warming up"
    with pytest.raises(ConfigError):
        Readiness("sleeping")  # type: ignore[arg-type]
    html = render_overview(make_context(readiness=Readiness("warming", 40)))
    assert "ready in about 40 s" in html and "Retry-After" in html


def test_recommended_settings_are_on_the_page(context):
    html = render_overview(context)
    for text in ("temperature 0.6", "top_p 0.95", "No system prompt", r"\boxed{}", "&lt;think&gt;\\n",
                 "x-remaining-credits", "401", "406", "insufficient_credits"):
        assert text in html, text


def test_the_mask_shows_nothing_of_the_secret():
    from r1nest.keys import new_key

    for _ in range(300):  # token_urlsafe secrets often contain "-" and "_"
        key_id, key = new_key()
        assert mask_key(key) == f"r1n-{key_id}-" + "•" * 12
    key_id, admin = new_key("r1nadmin")
    assert mask_key(admin) == f"r1nadmin-{key_id}-" + "•" * 12
    assert mask_key("sk-proj-abc-def-ghijklmnop") == "•" * 16
    dashed = "r1n-0123456789ab-" + "ab-cd_ef" * 5 + "xyz"
    ctx = make_context(api_key=dashed)
    html = render_overview(ctx)
    assert "ab-cd" not in html.replace('<span class="key-value">' + dashed, "")


# the usage panel --------------------------------------------------------------------------------

def svg_of(html: str, chart_id: str) -> str:
    found = re.search(rf'<svg class="bars" id="{chart_id}"[^>]*>.*?</svg>', html, re.S)
    assert found, chart_id
    return found.group(0)


def bars_of(svg: str) -> list[dict[str, str]]:
    return [dict(re.findall(r'([\w-]+)="([^"]*)"', attrs)) for attrs in re.findall(r'<rect class="bar" ([^>]*)>', svg)]


def test_usage_panel_draws_one_bar_per_bucket_with_requests_to_scale():
    panel = usage_panel()
    html = render_overview(make_context(usage=panel, remaining_credits=4321))
    hourly = bars_of(svg_of(html, "usage-chart-24h"))
    assert len(hourly) == len(panel.hourly.with_requests) == 4
    assert [float(b["data-start"]) for b in hourly] == [b.start for b in panel.hourly.with_requests]
    # x is the bucket's place in the window, height is credits to scale (the peak 96 of 100 units)
    assert [float(b["x"]) for b in hourly] == [21.5, 51.5, 101.5, 231.5]
    assert [float(b["height"]) for b in hourly] == [48, 3, 96, 3]  # 500 and 1000 to scale; 0 and 1 at the minimum
    assert all(float(b["y"]) + float(b["height"]) == 100 for b in hourly)
    daily = bars_of(svg_of(html, "usage-chart-30d"))
    assert len(daily) == len(panel.daily.with_requests) == 2  # day 0 has no request
    assert 'viewBox="0 0 240 100"' in svg_of(html, "usage-chart-24h") and 'viewBox="0 0 300 100"' in svg_of(html, "usage-chart-30d")


def test_usage_panel_says_its_numbers_in_text():
    panel = usage_panel()
    html = render_overview(make_context(usage=panel, remaining_credits=4321))
    for span, series in (("24h", panel.hourly), ("30d", panel.daily)):
        sums = series.totals
        for field in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "credits"):
            assert f'id="usage-{span}-{field}">{getattr(sums, field):,}<' in html, (span, field)
    assert 'id="usage-credits-left">4,321<' in html
    svg = svg_of(html, "usage-chart-24h")
    assert 'role="img"' in svg and 'aria-labelledby="usage-chart-24h-title usage-chart-24h-desc"' in svg
    assert '<title id="usage-chart-24h-title">Credits per hour, last 24 hours</title>' in svg
    assert "1,501 credits in 7 requests; the busiest hour was Nov 30 01:00 UTC with 1,000 credits." in svg
    assert "<title>2026-11-30 01:00 UTC: 1,000 credits, 3 requests, 2,000 prompt tokens (0 cached), 4,000 completion tokens</title>" in svg
    assert html.count("<tr><th scope=\"row\">") >= 5 + 4 + 2  # totals rows, then one row per bucket with requests
    assert "Numbers per hour (4 with requests)" in html and "Numbers per day (2 with requests)" in html


def test_usage_panel_keeps_the_page_free_of_inline_style_and_script():
    html = render_overview(make_context(usage=usage_panel()), logout_url="/overview/logout", csrf_token="t" * 43)
    assert not re.search(r"\sstyle=", html) and "<style" not in html
    assert not re.search(r"\son[a-z]+=", html)
    assert all(attrs.get("src", "").startswith("/overview/static/") for attrs, _ in extract(html).scripts)
    assert "<script" not in svg_of(html, "usage-chart-24h") and "http" not in svg_of(html, "usage-chart-30d")


def test_usage_panel_without_a_ledger_says_where_usage_is_shown():
    html = render_overview(make_context(public_endpoint="https://r1.example.com/v1"), standalone=True)
    assert 'id="usage-unavailable"' in html and "<svg" not in html
    assert "Usage is shown when the gateway serves this page" in html
    assert "https://r1.example.com/overview" in html and "r1nest usage --url https://r1.example.com" in html


def test_usage_panel_note_when_the_gateway_has_no_usage_for_the_key():
    from r1nest.overview.usage_panel import UsagePanel

    html = render_overview(make_context(usage=UsagePanel(None, note="The ledger <could not> be read.")))
    assert 'id="usage-unavailable">The ledger &lt;could not&gt; be read.<' in html and "<svg" not in html
    with pytest.raises(ConfigError):
        make_context(usage={"hourly": []})


def test_an_empty_day_has_a_chart_without_bars_and_says_so():
    from r1nest.overview.usage_panel import Series, UsagePanel
    from r1nest.usage import filled, recent_window

    hours, days = recent_window("hour", 24, now=USAGE_NOW), recent_window("day", 30, now=USAGE_NOW)
    panel = UsagePanel("0123456789ab", Series(hours, tuple(filled(hours, []))), Series(days, tuple(filled(days, []))))
    html = render_overview(make_context(usage=panel))
    assert bars_of(svg_of(html, "usage-chart-24h")) == [] and "No requests in this period." in html
    assert 'id="usage-24h-requests">0<' in html and "Numbers per" not in html
