"""The overview page in a real headless Chromium: masking, reveal, copy, CSP, the usage panel,
phone and dark mode, screenshots."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette

from r1nest.overview.context import Readiness, mask_key
from r1nest.overview.render import render_overview
from r1nest.control.overview import overview_routes

from .browser import LAPTOP, PHONE, launched_browser, screenshot, screenshot_of
from r1nest.testing.asgi_server import ServedApp

from .conftest import ADMIN_KEY, make_context, make_usage_panel, verify_admin_key

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ctx():
    return make_context(remaining_credits=1_000_000, model_repo="deepseek-ai/DeepSeek-R1",
                        details=(("instance type", "p5en.48xlarge"), ("nodes", "1")), usage=make_usage_panel())


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


def rgb(css: str) -> tuple[float, ...]:
    """`rgb(1, 2, 3)` / `rgba(...)` -> (r, g, b) in 0..255."""
    parts = css[css.index("(") + 1 : css.index(")")].split(",")
    return tuple(float(p) for p in parts[:3])


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two CSS colours."""

    def luminance(color: str) -> float:
        def channel(v: float) -> float:
            v /= 255
            return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4

        r, g, b_ = (channel(v) for v in rgb(color))
        return 0.2126 * r + 0.7152 * g + 0.0722 * b_

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def check_usage_panel(page, panel) -> dict[str, str]:
    """The panel as a user sees it: both charts with one bar per bucket with requests, the totals
    as text, readable colours. Returns the colours it checked."""
    assert page.is_visible("#usage") and page.is_visible("#usage-chart-24h") and page.is_visible("#usage-chart-30d")
    assert page.locator("#usage-chart-24h rect.bar").count() == len(panel.hourly.with_requests)
    assert page.locator("#usage-chart-30d rect.bar").count() == len(panel.daily.with_requests)
    assert page.get_attribute("#usage-chart-24h", "role") == "img"
    label = page.evaluate(
        "document.getElementById('usage-chart-24h').getAttribute('aria-labelledby').split(' ')"
        ".map(id => document.getElementById(id).textContent).join(' | ')"
    )
    assert label.startswith("Credits per hour, last 24 hours | ") and "credits in" in label
    assert page.inner_text("#usage-24h-requests") == f"{panel.hourly.totals.requests:,}"
    assert page.inner_text("#usage-30d-credits") == f"{panel.daily.totals.credits:,}"
    # bars are drawn at their height: the tallest fills most of the chart, the smallest still shows
    heights = page.evaluate("[...document.querySelectorAll('#usage-chart-24h rect.bar')].map(r => r.getBoundingClientRect().height)")
    chart = page.evaluate("document.getElementById('usage-chart-24h').getBoundingClientRect().height")
    assert max(heights) > 0.9 * chart and min(heights) >= 2, (heights, chart)
    colours = page.evaluate(
        """() => {
             const style = (sel, prop) => getComputedStyle(document.querySelector(sel))[prop];
             return {card: style('#usage', 'backgroundColor'), plot: style('#usage-chart-24h .plot', 'fill'),
                     bar: style('#usage-chart-24h rect.bar', 'fill'), text: style('#usage-24h-requests', 'color'),
                     muted: style('#usage-totals th[scope=row]', 'color'), axis: style('.chart-axis', 'color')};
           }"""
    )
    assert contrast(colours["bar"], colours["plot"]) >= 3, colours  # WCAG 1.4.11, non-text contrast
    assert contrast(colours["bar"], colours["card"]) >= 3, colours
    for name in ("text", "muted", "axis"):
        assert contrast(colours[name], colours["card"]) >= 4.5, (name, colours)  # WCAG AA text
    return colours


def horizontal_overflow(page) -> list[str]:
    """Elements that reach past the right edge of the screen, except inside the page's own
    scroll boxes (code blocks and the per-bucket tables)."""
    return page.evaluate(
        """() => [...document.querySelectorAll('main *')]
             .filter(e => !e.closest('pre') && !e.closest('.table-scroll')
                          && e.getBoundingClientRect().right > window.innerWidth + 1)
             .map(e => e.tagName + '#' + e.id + '.' + e.className)"""
    )


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
        assert page.inner_text("#usage-credits-left") == "1,000,000"
        light = check_usage_panel(page, ctx.usage)
        assert light["bar"] == "rgb(35, 87, 198)", light  # the light palette's accent
        shot = screenshot(page, "laptop-light")
        screenshot_of(page.locator("#usage"), "usage-laptop-light")

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
        dark = check_usage_panel(page, ctx.usage)
        assert dark["bar"] == "rgb(109, 155, 255)" and dark["card"] == "rgb(27, 32, 41)", dark  # dark palette
        # nothing wider than the phone screen except inside scrollable code blocks and tables
        assert horizontal_overflow(page) == []
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        chart_width = page.evaluate("document.getElementById('usage-chart-30d').getBoundingClientRect().width")
        assert 300 <= chart_width <= PHONE["width"], chart_width  # the chart fills the card, no wider
        screenshot(page, "phone-dark")
        for summary in page.locator("#usage details summary").all():
            summary.click()  # the per-bucket numbers open inside their own scroll box
        assert page.locator("#usage details[open]").count() == 2
        assert horizontal_overflow(page) == []
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        screenshot_of(page.locator("#usage"), "usage-phone-dark-open")
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
        assert "Usage is shown when the gateway serves this page" in page.inner_text("#usage")  # no ledger here
        assert page.locator("#usage svg").count() == 0
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


def test_gateway_page_charts_the_keys_real_usage(browser, tmp_path):
    """The gateway's /overview reads the page key's usage from its ledger: requests settled in the
    last hours show as bars, one per hour with requests, and as totals in text."""
    import asyncio
    import math
    import time
    from concurrent.futures import ThreadPoolExecutor

    from r1nest.accounts import create_api_key
    from r1nest.gateway.app import create_app
    from r1nest.gateway.upstream import UpstreamConfig
    from r1nest.ledger.base import Usage
    from r1nest.ledger.sqlite import SqliteStore
    from r1nest.files import API_KEY_FILE, write_key_file
    from r1nest.settings import Settings

    settings = Settings(data_dir=tmp_path, admin_key=ADMIN_KEY, served_model="deepseek-r1")
    now = time.time()
    hours_ago = [0.0, 0.0, 2.0, 5.0, 5.0, 5.0, 11.0, 47.0, 24 * 8.0]  # 0.0: a few seconds ago

    async def fill() -> None:
        store = SqliteStore(settings.ledger_path)
        try:
            record, key = await create_api_key(store, name="demo", credits=1_000_000, now=now - 40 * 86400)
            write_key_file(tmp_path / API_KEY_FILE, key)
            for i, ago in enumerate(hours_ago):
                at = now - ago * 3600 - 5
                reservation = await store.reserve(record.key_id, 10_000, ttl_s=600, now=at - 1)
                await store.settle(reservation.reservation_id, 100 * (i + 1), now=at, usage=Usage(50, 10, 20 * (i + 1)))
        finally:
            await store.close()

    with ThreadPoolExecutor(1) as thread:  # Playwright's sync API holds this thread's event loop
        thread.submit(asyncio.run, fill()).result(60)
    current_hour = math.floor(now / 3600) * 3600
    in_day = [ago for ago in hours_ago if now - ago * 3600 - 5 >= current_hour - 23 * 3600]
    hours_with_requests = {math.floor((now - ago * 3600 - 5) / 3600) for ago in in_day}
    store = SqliteStore(settings.ledger_path)
    app = create_app(settings=settings, store=store, upstream=UpstreamConfig("http://127.0.0.1:9", None, "deepseek-r1"))
    with ServedApp(app) as served:
        context, page, problems = open_logged_in(browser, served, viewport=PHONE, color_scheme="dark")
        try:
            assert page.locator("#usage-chart-24h rect.bar").count() == len(hours_with_requests)
            assert page.locator("#usage-chart-30d rect.bar").count() >= 2  # today (or yesterday too) and 8 days ago
            assert page.inner_text("#usage-24h-requests") == str(len(in_day))
            assert page.inner_text("#usage-30d-requests") == str(len(hours_ago))
            assert page.inner_text("#usage-30d-completion_tokens") == f"{sum(20 * (i + 1) for i in range(len(hours_ago))):,}"
            spent = sum(100 * (i + 1) for i in range(len(hours_ago)))
            assert page.inner_text("#usage-30d-credits") == f"{spent:,}"
            assert page.inner_text("#usage-credits-left") == f"{1_000_000 - spent:,}"
            assert horizontal_overflow(page) == []
            screenshot(page, "gateway-usage-phone-dark")
            screenshot_of(page.locator("#usage"), "gateway-usage-panel")
            assert not problems, problems
        finally:
            context.close()
        served.call(store.close())
