"""/overview behind an admin login: the routes of the overview page.

    GET  /overview                the page (a valid session), else 303 -> /overview/login
    GET  /overview/login          the login form
    POST /overview/login          admin key in the form body -> session cookie, 303 -> /overview
    POST /overview/logout         needs the session's CSRF token -> 303 -> /overview/login
    GET  /overview/static/{name}  the page's CSS and JS

    overview_routes(verify_admin_key=..., page_context=..., clock=...) -> [Route, ...]

Plain Starlette routes (HTML and forms, no JSON schema): the control app (control/app.py) adds
them beside its API, and any Starlette app can serve them alone. Their rules, sessions and the
login limiter are in overview/web.py; rendering in overview/render.py. Refusals that are not a
page (403 cross-origin or CSRF, 404 static file) are short plain text here; the gateway answers
them as its JSON errors.
"""

from __future__ import annotations

import hmac
import inspect
import time
from typing import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from r1nest.overview.context import OverviewContext
from r1nest.overview.render import STATIC_FILES, render_login, render_overview, static_asset
from r1nest.overview.web import (
    COOKIE_NAME,
    MAX_ADMIN_KEY_CHARS,
    MAX_FORM_BYTES,
    MAX_SESSIONS,
    SECURITY_HEADERS,
    SESSION_TTL_S,
    LoginLimiter,
    Session,
    SessionStore,
    client_id,
)

VerifyAdminKey = Callable[[str], "bool | Awaitable[bool]"]
PageContext = Callable[..., Awaitable[OverviewContext]]  # () or (request_base_url=...)


def overview_routes(
    *,
    verify_admin_key: VerifyAdminKey,
    page_context: PageContext,
    clock: Callable[[], float] = time.time,
    session_ttl_s: float = SESSION_TTL_S,
    prefix: str = "/overview",
    health_url: str | None = "/health",
) -> list[BaseRoute]:
    """The overview routes. `verify_admin_key(candidate) -> bool` (sync or async) must compare in
    constant time; `page_context()` returns the current OverviewContext for each page view. A
    page_context with a `request_base_url` parameter gets the URL the page was opened at (e.g.
    http://203.0.113.7:8000), so a gateway without a configured public URL can show that one."""
    sessions = SessionStore(ttl_s=session_ttl_s, max_sessions=MAX_SESSIONS, clock=clock)
    limiter = LoginLimiter(clock=clock)
    wants_base_url = "request_base_url" in inspect.signature(page_context).parameters
    assets = {name: (static_asset(name).encode("utf-8"), kind) for name, kind in STATIC_FILES.items()}
    login_url, logout_url, static_url = f"{prefix}/login", f"{prefix}/logout", f"{prefix}/static"

    def redirect(url: str) -> Response:
        return secured(RedirectResponse(url, status_code=303))

    def login_page(error: str = "", status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
        html = render_login(action=login_url, error=error, static_url=static_url)
        return secured(HTMLResponse(html, status_code=status_code, headers=headers))

    def current(request: Request) -> tuple[str, Session] | None:
        session_id = request.cookies.get(COOKIE_NAME)
        session = sessions.get(session_id)
        return (session_id, session) if session is not None and session_id else None

    async def page(request: Request) -> Response:
        found = current(request)
        if found is None:
            return redirect(login_url)
        if wants_base_url:
            ctx = await page_context(request_base_url=str(request.base_url).rstrip("/"))
        else:
            ctx = await page_context()
        html = render_overview(
            ctx, static_url=static_url, logout_url=logout_url, csrf_token=found[1].csrf_token, health_url=health_url
        )
        return secured(HTMLResponse(html))

    async def login_form(request: Request) -> Response:
        if current(request) is not None:
            return redirect(prefix)
        return login_page()

    async def login(request: Request) -> Response:
        if not _same_origin(request):
            return refused("cross-origin form refused", 403)
        client = client_id(request.client.host if request.client else None)
        wait_s = limiter.retry_after_s(client)
        if wait_s:
            return login_page("Too many failed sign-ins. Try again later.", 429, {"Retry-After": str(wait_s)})
        form = await _read_form(request)
        if form is None:
            return login_page("The sign-in form was not understood.", 400)
        candidate = form.get("admin_key", "")
        ok = False
        if 0 < len(candidate) <= MAX_ADMIN_KEY_CHARS:
            verdict = verify_admin_key(candidate)
            ok = bool(await verdict) if inspect.isawaitable(verdict) else bool(verdict)
        if not ok:
            limiter.record_failure(client)
            return login_page("That admin key is not right.", 401)
        limiter.record_success(client)
        old = request.cookies.get(COOKIE_NAME)
        if old:
            sessions.drop(old)
        session_id, _ = sessions.create()
        response = redirect(prefix)
        response.set_cookie(
            COOKIE_NAME,
            session_id,
            max_age=int(session_ttl_s),
            path=prefix,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(request: Request) -> Response:
        if not _same_origin(request):
            return refused("cross-origin form refused", 403)
        found = current(request)
        if found is None:
            return redirect(login_url)
        form = await _read_form(request)
        token = (form or {}).get("csrf_token", "")
        if not hmac.compare_digest(token.encode(), found[1].csrf_token.encode()):
            return refused("missing or wrong CSRF token", 403)
        sessions.drop(found[0])
        response = redirect(login_url)
        response.delete_cookie(COOKIE_NAME, path=prefix, httponly=True, samesite="strict")
        return response

    async def static(request: Request) -> Response:
        asset = assets.get(request.path_params["name"])
        if asset is None:
            return refused("not found", 404)
        body, kind = asset
        response = secured(Response(body, media_type=kind))
        response.headers["Cache-Control"] = "no-cache"
        return response

    return [
        Route(prefix, page, methods=["GET"], name="overview"),
        Route(login_url, login_form, methods=["GET"], name="overview_login_form"),
        Route(login_url, login, methods=["POST"], name="overview_login"),
        Route(logout_url, logout, methods=["POST"], name="overview_logout"),
        Route(static_url + "/{name:str}", static, methods=["GET"], name="overview_static"),
    ]


def secured(response: Response) -> Response:
    """The overview's security headers on an answer (the page holds a key)."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


def refused(text: str, status_code: int) -> Response:
    return secured(Response(text, status_code=status_code, media_type="text/plain"))


def _same_origin(request: Request) -> bool:
    """A browser POST names its origin; it must be this host. No Origin header (curl): allowed,
    since SameSite=Strict already keeps the session cookie off cross-site requests."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    parts = urlsplit(origin)
    return origin != "null" and bool(host) and parts.netloc.lower() == host.lower()


async def _read_form(request: Request) -> dict[str, str] | None:
    """A small urlencoded form, or None (wrong type, too big, not text)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=8, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None
    return {name: values[0] for name, values in fields.items() if values}
