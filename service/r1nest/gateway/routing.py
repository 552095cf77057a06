"""Which requests the gateway answers: an exact allowlist matched on the raw path. Pure.

The path is matched byte for byte as the client sent it, before any decoding or
normalisation, against a closed set of routes. So `//invocations`, `/v1/../pause`,
`/V1/models`, `/v1/models/`, `/%2e%2e/pause`, `/v1%2fmodels` or backslashes match nothing and
get 404. The proxy never derives an upstream path from the client's path either: each route
forwards to one fixed engine path, so an engine-only route cannot be reached at all.

The control plane's routes (CONTROL: the admin API, /v1/credits, /v1/usage, /overview) are on
this allowlist too; the gateway hands what matches them to the control app (r1nest/control/).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    CHAT = "chat_completions"
    COMPLETIONS = "completions"
    MESSAGES = "messages"
    COUNT_TOKENS = "count_tokens"
    MODELS = "models"
    CREDITS = "credits"
    USAGE = "usage"
    HEALTH = "health"
    METRICS = "metrics"
    ADMIN_KEYS = "admin_keys"
    ADMIN_KEY_ACTION = "admin_key_action"
    ADMIN_USAGE = "admin_usage"
    ADMIN_OPENAPI = "admin_openapi"
    OVERVIEW = "overview"


# what the control app answers (control/app.py); the rest is the gateway's own
CONTROL = frozenset({
    Kind.CREDITS, Kind.USAGE, Kind.ADMIN_KEYS, Kind.ADMIN_KEY_ACTION, Kind.ADMIN_USAGE, Kind.ADMIN_OPENAPI,
    Kind.OVERVIEW,
})


@dataclass(frozen=True, slots=True)
class Match:
    kind: Kind
    methods: frozenset[str]
    key_id: str | None = None
    action: str | None = None  # admin: revoke | topup | usage | limits


@dataclass(frozen=True, slots=True)
class NoMatch:
    status: int  # 404 no such path, 405 known path with another method
    allow: frozenset[str] = frozenset()


_EXACT: dict[bytes, tuple[Kind, frozenset[str]]] = {
    b"/v1/chat/completions": (Kind.CHAT, frozenset({"POST"})),
    b"/v1/completions": (Kind.COMPLETIONS, frozenset({"POST"})),
    b"/v1/messages": (Kind.MESSAGES, frozenset({"POST"})),
    b"/v1/messages/count_tokens": (Kind.COUNT_TOKENS, frozenset({"POST"})),
    b"/v1/models": (Kind.MODELS, frozenset({"GET"})),
    b"/v1/credits": (Kind.CREDITS, frozenset({"GET"})),
    b"/v1/usage": (Kind.USAGE, frozenset({"GET"})),
    b"/health": (Kind.HEALTH, frozenset({"GET"})),
    b"/metrics": (Kind.METRICS, frozenset({"GET"})),
    b"/admin/keys": (Kind.ADMIN_KEYS, frozenset({"GET", "POST"})),
    b"/admin/usage": (Kind.ADMIN_USAGE, frozenset({"GET"})),
    b"/admin/openapi.json": (Kind.ADMIN_OPENAPI, frozenset({"GET"})),
}
_ADMIN_ACTION = re.compile(rb"^/admin/keys/([0-9a-f]{12})/(revoke|topup|usage|limits)$")
_ADMIN_ACTION_METHODS = {
    b"revoke": frozenset({"POST"}), b"topup": frozenset({"POST"}), b"usage": frozenset({"GET"}),
    b"limits": frozenset({"POST"}),
}
# /overview, /overview/login, /overview/logout, /overview/static/<name>[/<name>...]; each
# segment plain (no dot-only segments, no escapes, no empty segments).
_OVERVIEW = re.compile(
    rb"^/overview(?:/login|/logout|/static(?:/(?!\.{1,2}(?:/|$))[A-Za-z0-9_.-]{1,128}){1,4})?$"
)


def match(method: str, raw_path: bytes) -> Match | NoMatch:
    """Route a request by its method and raw path (query string excluded)."""
    exact = _EXACT.get(raw_path)
    if exact is not None:
        kind, methods = exact
        if method not in methods:
            return NoMatch(405, methods)
        return Match(kind, methods)
    action = _ADMIN_ACTION.match(raw_path)
    if action is not None:
        methods = _ADMIN_ACTION_METHODS[action.group(2)]
        if method not in methods:
            return NoMatch(405, methods)
        return Match(Kind.ADMIN_KEY_ACTION, methods, action.group(1).decode(), action.group(2).decode())
    if _OVERVIEW.match(raw_path):
        methods = _OVERVIEW_METHODS.get(raw_path, _GET)
        if method not in methods:
            return NoMatch(405, methods)
        return Match(Kind.OVERVIEW, methods)
    return NoMatch(404)


_GET = frozenset({"GET"})
# what each overview page takes (the static files and the page itself: GET)
_OVERVIEW_METHODS = {b"/overview/login": frozenset({"GET", "POST"}), b"/overview/logout": frozenset({"POST"})}
