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

from .conftest import make_context
from .pagetext import extract


def test_examples_on_the_page_are_exactly_the_built_examples(context):
    html = render_overview(context)
    found = extract(html).examples
    built = {ex.id: ex.code for ex in build_examples(context)}
    assert set(found) == {"curl", "python", "javascript", "credits"}
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
