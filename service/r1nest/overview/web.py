"""/overview behind an admin login: the routes the gateway mounts.

    GET  /overview                the page (a valid session), else 303 -> /overview/login
    GET  /overview/login          the login form
    POST /overview/login          admin key in the form body -> session cookie, 303 -> /overview
    POST /overview/logout         needs the session's CSRF token -> 303 -> /overview/login
    GET  /overview/static/{name}  the page's CSS and JS

Rules this module holds (tests/overview/test_overview_web.py and test_overview_login_limits.py
check each):
- the key is only ever in a POST body, never in a URL; no page is sent to a visitor without a
  session, and the redirect carries nothing of the page;
- sessions are random server-side ids (256 bits) in an HttpOnly, SameSite=Strict cookie scoped to
  /overview, Secure on https (the scheme uvicorn reports: X-Forwarded-Proto counts only from a
  trusted proxy), with an absolute expiry; the server keeps a bounded number of them;
- state-changing POSTs come from this origin (Origin checked when sent) and logout carries a CSRF
  token bound to the session, compared in constant time;
- failed logins are limited (429 + Retry-After), by these rules (LoginLimiter):
  - a client is its address as the server sees it: the TCP peer, or the `X-Forwarded-For` client
    only when the peer is a trusted proxy (`R1NEST_TRUSTED_PROXIES`; uvicorn believes no one
    else), so a client cannot rotate that header to get a fresh budget; an IPv6 client is its /64
    (one subscriber's usual allocation, whose addresses are free to rotate);
  - per client: 5 failures in 5 minutes, then 429 until the oldest leaves the window;
  - overall: once 50 failures from all clients are in the window, a client that has failures of
    its own in the window is refused too. A client with no recent failure is never refused by
    this cap, so an attacker who spends it cannot lock out the admin, who has not failed: the
    admin's attempt goes ahead and the right key is accepted. What the cap still does while it
    is spent: each further address an attacker brings gets one guess, not five;
  - a refused attempt is not checked at all: the right key gets the same 429 (no oracle);
- every answer carries a strict CSP, X-Frame-Options DENY, Referrer-Policy same-origin and
  Cache-Control no-store (the page holds a key).
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from r1nest.overview.context import OverviewContext
from r1nest.overview.render import STATIC_FILES, render_login, render_overview, static_asset

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" makes browsers send Origin: null on our own POSTs
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
COOKIE_NAME = "r1nest_overview"
SESSION_TTL_S = 3600.0
MAX_SESSIONS = 64
MAX_FORM_BYTES = 4096
MAX_ADMIN_KEY_CHARS = 512
LOGIN_WINDOW_S = 300.0
LOGIN_FAILURES_PER_CLIENT = 5  # per window, per client address
LOGIN_FAILURES_TOTAL = 50  # per window, all clients together
MAX_TRACKED_CLIENTS = 1024

VerifyAdminKey = Callable[[str], "bool | Awaitable[bool]"]
PageContext = Callable[..., Awaitable[OverviewContext]]  # () or (request_base_url=...)


@dataclass(slots=True)
class Session:
    csrf_token: str
    expires_at: float


class SessionStore:
    """Server-side sessions by random id; bounded: past MAX_SESSIONS the oldest is dropped."""

    def __init__(self, *, ttl_s: float, max_sessions: int, clock: Callable[[], float]) -> None:
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def create(self) -> tuple[str, Session]:
        now = self._clock()
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires_at > now}
        while len(self._sessions) >= self._max:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].expires_at)
            del self._sessions[oldest]
        session_id = secrets.token_urlsafe(32)
        session = Session(csrf_token=secrets.token_urlsafe(32), expires_at=now + self._ttl_s)
        self._sessions[session_id] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > 128:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self._clock():
            del self._sessions[session_id]
            return None
        return session

    def drop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)


def client_id(host: str | None) -> str:
    """The limiter's name for a client address: the address itself, an IPv6 one's /64 (an
    IPv4-mapped one is its IPv4 address); a string that is no address (a Unix socket) as it is."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:256]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class LoginLimiter:
    """Failed logins in a sliding window, per client and in total; bounded memory.

    A client is refused while it has `per_client` failures in the window, or while it has any
    failure in the window and all clients together have `total`. A client without a failure in
    the window is never refused by the total (the admin cannot be locked out by others' guesses).
    """

    def __init__(self, *, clock: Callable[[], float], window_s: float = LOGIN_WINDOW_S,
                 per_client: int = LOGIN_FAILURES_PER_CLIENT, total: int = LOGIN_FAILURES_TOTAL) -> None:
        self._clock = clock
        self._window_s = window_s
        self._per_client = per_client
        self._total = total
        self._failures: dict[str, deque[float]] = {}
        self._all: deque[float] = deque(maxlen=total)

    def retry_after_s(self, client: str) -> int:
        """0 when a login attempt may go ahead, else seconds to wait."""
        now = self._clock()
        horizon = now - self._window_s
        waits = []
        mine = self._failures.get(client)
        if mine:
            while mine and mine[0] <= horizon:
                mine.popleft()
            if not mine:
                del self._failures[client]
            elif len(mine) >= self._per_client:
                waits.append(mine[0] - horizon)
        while self._all and self._all[0] <= horizon:
            self._all.popleft()
        if mine and len(self._all) >= self._total:  # only clients that failed themselves
            waits.append(min(self._all[0], mine[-1]) - horizon)
        return max(1, int(max(waits)) + 1) if waits else 0

    def record_failure(self, client: str) -> None:
        now = self._clock()
        if client not in self._failures and len(self._failures) >= MAX_TRACKED_CLIENTS:
            stalest = min(self._failures, key=lambda c: self._failures[c][-1] if self._failures[c] else 0)
            del self._failures[stalest]
        self._failures.setdefault(client, deque(maxlen=self._per_client)).append(now)
        self._all.append(now)

    def record_success(self, client: str) -> None:
        self._failures.pop(client, None)


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

    def secured(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        return response

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
            return secured(Response("cross-origin form refused", status_code=403, media_type="text/plain"))
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
            return secured(Response("cross-origin form refused", status_code=403, media_type="text/plain"))
        found = current(request)
        if found is None:
            return redirect(login_url)
        form = await _read_form(request)
        token = (form or {}).get("csrf_token", "")
        if not hmac.compare_digest(token.encode(), found[1].csrf_token.encode()):
            return secured(Response("missing or wrong CSRF token", status_code=403, media_type="text/plain"))
        sessions.drop(found[0])
        response = redirect(login_url)
        response.delete_cookie(COOKIE_NAME, path=prefix, httponly=True, samesite="strict")
        return response

    async def static(request: Request) -> Response:
        asset = assets.get(request.path_params["name"])
        if asset is None:
            return secured(Response("not found", status_code=404, media_type="text/plain"))
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
