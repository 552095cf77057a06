"""The overview page in a real headless Chromium: masking, reveal, copy, CSP, screenshots."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette

from r1nest.overview.context import Readiness, mask_key
from r1nest.overview.render import render_overview
from r1nest.overview.web import overview_routes

from .browser import LAPTOP, PHONE, launched_browser, screenshot
from r1nest.testing.asgi_server import ServedApp

from .conftest import ADMIN_KEY, make_context, verify_admin_key

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ctx():
    return make_context(remaining_credits=1_000_000, model_repo="deepseek-ai/DeepSeek-R1",
                        details=(("instance type", "p5en.48xlarge"), ("nodes", "1")))


@pytest.fixture(scope="module")
def server(ctx):
    async def page_context():
        return ctx

    app = Starlette(routes=overview_routes(verify_admin_key=verify_admin_key, page_context=page_context))
    with ServedApp(app) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with launched_browser() as b:
        yield b


def open_logged_in(browser, server, **context_options):
    context = browser.new_context(**context_options)
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(server.url + "/overview", timeout=30_000)
    assert page.url.endswith("/overview/login"), "unauthenticated visit must land on the login form"
    page.fill("#admin_key", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_url(server.url + "/overview", timeout=30_000)
    return context, page, problems


def test_page_shows_endpoints_and_masked_key_reveal_and_copy(browser, server, ctx):
    context, page, problems = open_logged_in(
        browser, server, viewport=LAPTOP, permissions=["clipboard-read", "clipboard-write"]
    )
    try:
        assert page.inner_text("#public-endpoint") == ctx.public_endpoint
        assert page.inner_text("#internal-endpoint") == ctx.internal_endpoint
        assert page.is_visible("#public-endpoint") and page.is_visible("#internal-endpoint")
        # masked: the secret is in the DOM but not on screen
        key_text = page.inner_text("#api-key")
        assert key_text == mask_key(ctx.api_key) and ctx.api_key not in page.inner_text("body")
        assert page.inner_text("#remaining-credits") == "1,000,000"
        shot = screenshot(page, "laptop-light")

        page.click("button[data-reveal]")
        assert page.inner_text("#api-key") == ctx.api_key
        assert page.get_attribute("button[data-reveal]", "aria-pressed") == "true"
        page.click("button[data-reveal]")
        assert page.inner_text("#api-key") == mask_key(ctx.api_key)

        # copy gives the full key even while it is masked
        page.click("button[data-copy=api-key]")
        page.wait_for_selector("button[data-copy=api-key].copied", timeout=10_000)
        assert page.evaluate("navigator.clipboard.readText()") == ctx.api_key
        page.click("button[data-copy=public-endpoint]")
        page.wait_for_selector("button[data-copy=public-endpoint].copied", timeout=10_000)
        assert page.evaluate("navigator.clipboard.readText()") == ctx.public_endpoint
        page.click("button[data-copy=code-python]")
        page.wait_for_selector("button[data-copy=code-python].copied", timeout=10_000)
        copied = page.evaluate("navigator.clipboard.readText()")
        assert ctx.api_key in copied and "•" not in copied and copied.startswith("from openai import OpenAI")

        assert not [p for p in problems if "Content Security Policy" in p or "Refused" in p], problems
        assert not problems, problems
        assert shot.stat().st_size > 10_000
    finally:
        context.close()


def test_phone_and_dark_mode_read_well(browser, server, ctx):
    context, page, problems = open_logged_in(
        browser, server, viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True, color_scheme="dark"
    )
    try:
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(18, 21, 27)", background  # the dark palette is in use
        # nothing wider than the phone screen except inside scrollable code blocks
        overflow = page.evaluate(
            """() => [...document.querySelectorAll('main *')]
                 .filter(e => !e.closest('pre') && e.getBoundingClientRect().right > window.innerWidth + 1)
                 .map(e => e.tagName + '#' + e.id + '.' + e.className)"""
        )
        assert overflow == [], overflow
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        screenshot(page, "phone-dark")
        page.click("button[data-reveal]")
        screenshot(page, "phone-dark-revealed")
        assert not problems, problems
    finally:
        context.close()
    context, page, problems = open_logged_in(browser, server, viewport=LAPTOP, color_scheme="dark")
    try:
        screenshot(page, "laptop-dark")
        assert not problems, problems
    finally:
        context.close()


def test_login_page_and_logout_in_the_browser(browser, server, ctx):
    context = browser.new_context(viewport=PHONE)
    page = context.new_page()
    try:
        page.goto(server.url + "/overview/login")
        page.fill("#admin_key", "not-the-admin-key")
        page.click("button[type=submit]")
        assert "not right" in page.inner_text("#login-error")
        assert ctx.api_key not in page.content()
        screenshot(page, "login-phone")
        page.fill("#admin_key", ADMIN_KEY)
        page.click("button[type=submit]")
        page.wait_for_url(server.url + "/overview")
        assert "?" not in page.url and ADMIN_KEY not in page.url
        cookies = context.cookies()
        assert [c["httpOnly"] for c in cookies] == [True] and cookies[0]["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == "", "the session cookie is not readable by scripts"
        page.click("form.logout button")
        page.wait_for_url(server.url + "/overview/login")
        page.goto(server.url + "/overview")
        assert page.url.endswith("/overview/login")
    finally:
        context.close()


def test_standalone_file_works_offline(browser, ctx, tmp_path):
    path = tmp_path / "overview.html"
    path.write_text(render_overview(make_context(readiness=Readiness("warming", 120)), standalone=True))
    context = browser.new_context(viewport=LAPTOP, offline=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(r.url))
    try:
        page.goto(path.as_uri())
        assert "ready in about 2 min" in page.inner_text("#readiness")
        assert "•" in page.inner_text("#api-key")
        page.click("button[data-reveal]")
        assert "•" not in page.inner_text("#api-key")
        assert page.evaluate("getComputedStyle(document.querySelector('.card')).borderRadius") == "10px"
        screenshot(page, "standalone-warming")
        assert not errors, errors
    finally:
        context.close()


def test_warming_page_shows_the_eta_and_turns_ready_by_itself(browser, tmp_path):
    """On the gateway: while the engine warms up the page says so with an ETA, polls /health
    (allowed by the CSP's connect-src 'self') and reloads itself once the engine is ready."""
    from r1nest.gateway.app import create_app
    from r1nest.gateway.state import EngineState
    from r1nest.gateway.upstream import UpstreamConfig
    from r1nest.ledger.memory import MemoryStore
    from r1nest.settings import Settings

    state = EngineState()
    state.set_warming(600)
    settings = Settings(data_dir=tmp_path, admin_key=ADMIN_KEY, served_model="deepseek-r1")
    app = create_app(settings=settings, store=MemoryStore(),
                     upstream=UpstreamConfig("http://127.0.0.1:9", None, "deepseek-r1"), state=state)
    with ServedApp(app) as served:
        context, page, problems = open_logged_in(browser, served, viewport=LAPTOP)
        try:
            badge = page.inner_text("#readiness")
            assert badge.startswith("warming up, ready in about") and "min" in badge, badge
            assert "503" in page.inner_text("body")
            screenshot(page, "gateway-warming")
            state.set_ready()
            page.wait_for_selector("#readiness[data-phase=ready]", timeout=30_000)  # no eval: the CSP forbids it
            assert page.inner_text("#readiness") == "ready"
            assert not [p for p in problems if "Content Security Policy" in p], problems
        finally:
            context.close()
