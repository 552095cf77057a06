"""/overview behind an admin login: its sessions, login limiter and security headers.

The routes that use them (the page, login, logout, static files) are in control/overview.py,
served by the gateway's control app. Rules these hold together (tests/overview/test_overview_web.py
and test_overview_login_limits.py check each):
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

import ipaddress
import secrets
from collections import deque
from dataclasses import dataclass
from typing import Callable

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
