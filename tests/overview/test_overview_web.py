"""/overview behind the admin login: redirects, sessions, CSRF, headers, rate limit."""

from __future__ import annotations

import re

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from r1nest.control.overview import overview_routes
from r1nest.overview.web import COOKIE_NAME, CSP, LOGIN_FAILURES_PER_CLIENT

from .conftest import ADMIN_KEY, make_context, verify_admin_key


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ctx():
    return make_context()


@pytest.fixture
def client(ctx, clock):
    async def page_context():
        return ctx

    app = Starlette(routes=overview_routes(verify_admin_key=verify_admin_key, page_context=page_context, clock=clock))
    with TestClient(app, base_url="http://gateway.test", follow_redirects=False) as c:
        yield c


def login(client, key=ADMIN_KEY, **kw):
    return client.post("/overview/login", data={"admin_key": key}, **kw)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def assert_secured(response):
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "same-origin"
    assert response.headers["cache-control"] == "no-store"


def test_unauthenticated_get_redirects_to_login_without_the_key(client, ctx):
    response = client.get("/overview")
    assert response.status_code == 303
    assert response.headers["location"] == "/overview/login"
    assert ctx.api_key not in response.text
    assert all(ctx.api_key not in v for v in response.headers.values())
    assert_secured(response)
    page = client.get("/overview/login")
    assert page.status_code == 200 and 'method="post"' in page.text
    assert ctx.api_key not in page.text
    assert_secured(page)


def test_login_with_admin_key_gives_the_page(client, ctx):
    response = login(client)
    assert response.status_code == 303 and response.headers["location"] == "/overview"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/overview", "Max-Age=3600"):
        assert attribute.lower() in cookie.lower(), cookie
    assert "secure" not in cookie.lower()  # plain http in this test
    assert ADMIN_KEY not in cookie
    page = client.get("/overview")
    assert page.status_code == 200
    assert ctx.api_key in page.text and ctx.public_endpoint in page.text
    assert_secured(page)


def test_cookie_is_secure_over_https(ctx):
    async def page_context():
        return ctx

    app = Starlette(routes=overview_routes(verify_admin_key=verify_admin_key, page_context=page_context))
    with TestClient(app, base_url="https://gateway.test", follow_redirects=False) as c:
        cookie = login(c).headers["set-cookie"]
    assert "; secure" in cookie.lower()


def test_async_verifier_is_awaited(ctx):
    seen = []

    async def verify(candidate: str) -> bool:
        seen.append(candidate)
        return candidate == ADMIN_KEY

    async def page_context():
        return ctx

    app = Starlette(routes=overview_routes(verify_admin_key=verify, page_context=page_context))
    with TestClient(app, follow_redirects=False) as c:
        assert login(c, "wrong").status_code == 401
        assert login(c).status_code == 303
    assert seen == ["wrong", ADMIN_KEY]


@pytest.mark.parametrize("key", ["wrong", ADMIN_KEY + "x", ADMIN_KEY[:-1], "", "x" * 600])
def test_wrong_admin_key_is_refused(client, ctx, key):
    response = login(client, key)
    assert response.status_code == 401
    assert "not right" in response.text
    assert "set-cookie" not in response.headers
    assert ctx.api_key not in response.text
    assert client.get("/overview").status_code == 303


def test_admin_key_in_query_string_does_nothing(client, ctx):
    response = client.get("/overview", params={"admin_key": ADMIN_KEY})
    assert response.status_code == 303
    response = client.post("/overview/login", params={"admin_key": ADMIN_KEY})
    assert response.status_code == 400  # the key is read from the POST body only
    assert client.get("/overview").status_code == 303


def test_login_form_posts_and_never_puts_the_key_in_a_url(client):
    html = client.get("/overview/login").text
    assert re.search(r'<form method="post" action="/overview/login"', html)
    assert 'type="password"' in html


def test_forged_or_expired_session_is_refused(client, clock):
    client.cookies.set(COOKIE_NAME, "forged-session-id", domain="gateway.test", path="/overview")
    assert client.get("/overview").status_code == 303
    client.cookies.clear()
    login(client)
    assert client.get("/overview").status_code == 200
    clock.now += 3601
    assert client.get("/overview").status_code == 303


def test_logout_needs_post_and_the_csrf_token(client):
    login(client)
    page = client.get("/overview")
    token = csrf_of(page.text)
    assert client.get("/overview/logout").status_code == 405
    assert client.post("/overview/logout", data={}).status_code == 403
    assert client.post("/overview/logout", data={"csrf_token": token[:-1] + ("B" if token[-1] == "A" else "A")}).status_code == 403
    assert client.get("/overview").status_code == 200, "failed logouts keep the session"
    response = client.post("/overview/logout", data={"csrf_token": token})
    assert response.status_code == 303 and response.headers["location"] == "/overview/login"
    assert COOKIE_NAME in response.headers["set-cookie"] and "max-age=0" in response.headers["set-cookie"].lower()
    # the session is gone server-side, even for a client that kept the cookie
    assert client.get("/overview").status_code == 303


def test_old_cookie_is_dead_after_logout(client):
    login(client)
    session_id = client.cookies.get(COOKIE_NAME)
    token = csrf_of(client.get("/overview").text)
    client.post("/overview/logout", data={"csrf_token": token})
    client.cookies.set(COOKIE_NAME, session_id, domain="gateway.test", path="/overview")
    assert client.get("/overview").status_code == 303


def test_cross_origin_posts_are_refused(client):
    response = login(client, headers={"Origin": "https://evil.example"})
    assert response.status_code == 403 and "set-cookie" not in response.headers
    assert login(client, headers={"Origin": "null"}).status_code == 403
    assert login(client, headers={"Origin": "http://gateway.test"}).status_code == 303
    token = csrf_of(client.get("/overview").text)
    response = client.post("/overview/logout", data={"csrf_token": token}, headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert client.get("/overview").status_code == 200


def test_failed_logins_are_rate_limited(client, clock):
    for _ in range(LOGIN_FAILURES_PER_CLIENT):
        assert login(client, "wrong").status_code == 401
    limited = login(client)  # even the right key waits: no oracle while limited
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) > 0
    assert client.get("/overview").status_code == 303
    clock.now += 301
    assert login(client).status_code == 303


def test_static_assets_are_served_and_nothing_else(client):
    css = client.get("/overview/static/overview.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    js = client.get("/overview/static/overview.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert_secured_static = js.headers["content-security-policy"] == CSP
    assert assert_secured_static
    for name in ("../login.html.j2", "..%2Foverview.html.j2", "secret.txt", "overview.html.j2"):
        assert client.get(f"/overview/static/{name}").status_code == 404


def test_page_has_no_inline_script_and_the_csp_blocks_inline(client):
    login(client)
    html = client.get("/overview").text
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
    for match in re.finditer(r"<script\b([^>]*)>(.*?)</script>", html, re.S):
        assert 'src="/overview/static/' in match.group(1)
        assert match.group(2).strip() == ""
    assert not re.search(r"\son[a-z]+=", html)


def test_page_context_is_read_on_each_view(clock):
    calls = []

    async def page_context():
        calls.append(1)
        return make_context(remaining_credits=len(calls))

    app = Starlette(routes=overview_routes(verify_admin_key=verify_admin_key, page_context=page_context, clock=clock))
    with TestClient(app, follow_redirects=False) as c:
        login(c)
        assert ">1<" in c.get("/overview").text
        assert ">2<" in c.get("/overview").text


def test_page_context_may_ask_for_the_address_the_page_was_opened_at(clock):
    seen = []

    async def page_context(request_base_url=None):
        seen.append(request_base_url)
        return make_context(public_endpoint=request_base_url)

    app = Starlette(routes=overview_routes(verify_admin_key=verify_admin_key, page_context=page_context, clock=clock))
    with TestClient(app, base_url="http://198.51.100.9:8000", follow_redirects=False) as c:
        login(c)
        assert "http://198.51.100.9:8000/v1/chat/completions" in c.get("/overview").text
    assert seen == ["http://198.51.100.9:8000"]
