"""The admin API (admin key): create, list, revoke and top up keys, and read a key's postings.

    POST /admin/keys {"name","credits","expires_at"?,"max_concurrency"?,"rate_limit_rpm"?}
         -> 201 {"id","key","name","remaining_credits","max_concurrency","rate_limit_rpm"}
    GET  /admin/keys -> {"data":[{"id","name","created_at","expires_at","revoked","remaining_credits",
                                  "max_concurrency","rate_limit_rpm"}]}
    POST /admin/keys/{id}/revoke -> {"id","revoked":true}
    POST /admin/keys/{id}/topup {"credits":N} + Idempotency-Key -> {"id","remaining_credits"}
    POST /admin/keys/{id}/limits {"max_concurrency":N|null,"rate_limit_rpm":N|null} -> the key
    GET  /admin/keys/{id}/usage -> {"id","remaining_credits","postings":[...]}
    GET  /admin/usage?key=ID&from=&to=&bucket=hour|day -> usage buckets (r1nest/usage.py)

Per-key limits: a positive integer, or null for the deployment's default
(R1NEST_MAX_CONCURRENT_PER_KEY, R1NEST_RATE_LIMIT_RPM). `limits` replaces both: a field left
out is set to null.

Errors (OpenAI-style bodies, never a traceback): input the API or the store refuses (a body
that is not JSON, NaN/Infinity or a number beyond a double anywhere in it, credits out of range,
an expiry that is not finite future unix seconds) -> 400; unknown key id -> 404; the store
cannot answer now (StoreUnavailable) -> 503 with Retry-After; any other store error (a bug)
-> 500, logged. Every answer is JSON encoded with allow_nan=False (`Exchange.json`).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable
from urllib.parse import parse_qsl

from r1nest import accounts
from r1nest.errors import (
    BadRequest,
    InternalError,
    InvalidLedgerArgument,
    NotFound,
    StoreError,
    StoreUnavailable,
    UnknownKey,
    store_unavailable,
)
from r1nest.gateway.exchange import Exchange
from r1nest.gateway.routing import Kind, Match
from r1nest.ledger import rules
from r1nest.ledger.base import Store

log = logging.getLogger("r1nest.gateway.admin")

MAX_ADMIN_BODY_BYTES = 16 * 1024
MAX_POSTINGS = 1000
MAX_LIMIT = 1_000_000  # the largest per-key limit accepted (requests in flight or per minute)
MAX_QUERY_FIELDS = 16


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)  # NaN, Infinity, -Infinity: not JSON (RFC 8259), never a number here


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise _NonFinite(text)
    return value


async def _json_body(exchange: Exchange) -> dict[str, Any]:
    raw = await exchange.read_body(MAX_ADMIN_BODY_BYTES)
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float) if raw else {}
    except _NonFinite as exc:
        raise BadRequest(f"numbers in the request body must be finite, got {exc}") from None
    except (ValueError, RecursionError):  # includes invalid UTF-8
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _credits(value: Any, *, name: str = "credits", minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadRequest(f"`{name}` must be an integer >= {minimum}", param=name)
    return value


def _expires_at(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadRequest("`expires_at` must be unix seconds", param="expires_at")
    try:
        return rules.check_expires_at(value)  # finite, in range
    except InvalidLedgerArgument as exc:
        raise BadRequest(str(exc), param="expires_at") from None


def _limit(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise BadRequest(f"`{name}` must be an integer from 1 to {MAX_LIMIT}, or null for the default", param=name)
    return value


def _limits(body: dict[str, Any]) -> dict[str, int | None]:
    return {name: _limit(body, name) for name in ("max_concurrency", "rate_limit_rpm")}


def _query_param(exchange: Exchange, name: str) -> str | None:
    """One query parameter (the last if repeated); None when absent. 400 for undecodable text."""
    raw = exchange.scope.get("query_string") or b""
    try:
        values = [v for k, v in parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=False,
                                          errors="strict", max_num_fields=MAX_QUERY_FIELDS) if k == name]
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("The query string cannot be read.") from None
    return values[-1] if values else None


async def answer_usage(exchange: Exchange, store: Store, clock: Callable[[], float], *, key_id: str | None) -> None:
    """Usage buckets of one key (or all keys with key_id None) for ?from=&to=&bucket=."""
    from r1nest import usage

    window = usage.parse_window(
        start=_query_param(exchange, "from"), end=_query_param(exchange, "to"),
        bucket=_query_param(exchange, "bucket"), now=clock(),
    )
    if key_id is not None and await store.get_key(key_id) is None:
        raise UnknownKey(key_id)
    buckets = await store.usage(key_id=key_id, since=window.since, until=window.until, bucket_s=window.bucket_s)
    await exchange.json(200, usage.usage_json(window, buckets, key_id=key_id))


async def handle(exchange: Exchange, match: Match, store: Store, clock: Callable[[], float]) -> None:
    method = exchange.scope["method"]
    try:
        if match.kind is Kind.ADMIN_KEYS and method == "GET":
            keys = await store.list_keys()
            await exchange.json(200, {"object": "list", "data": [accounts.key_json(k) for k in keys]})
        elif match.kind is Kind.ADMIN_KEYS:
            body = await _json_body(exchange)
            name = body.get("name", "")
            if not isinstance(name, str):
                raise BadRequest("`name` must be a string", param="name")
            expires_at = _expires_at(body.get("expires_at"))
            limits = _limits(body)
            record, plaintext = await accounts.create_api_key(
                store, name=name, credits=_credits(body.get("credits")), expires_at=expires_at, now=clock(),
                **limits,
            )
            await exchange.json(
                201, {"id": record.key_id, "key": plaintext, "name": record.name,
                      "remaining_credits": record.remaining_credits, **limits},
            )
        elif match.kind is Kind.ADMIN_USAGE:
            await answer_usage(exchange, store, clock, key_id=_query_param(exchange, "key"))
        elif match.action == "revoke":
            record = await store.revoke_key(match.key_id)  # type: ignore[arg-type]
            await exchange.json(200, {"id": record.key_id, "revoked": True})
        elif match.action == "topup":
            idempotency_key = exchange.header(b"idempotency-key")
            if not idempotency_key:
                raise BadRequest("a top-up needs an Idempotency-Key header", param="Idempotency-Key")
            body = await _json_body(exchange)
            balance = await store.topup(
                match.key_id,  # type: ignore[arg-type]
                _credits(body.get("credits"), minimum=1),
                idempotency_key=idempotency_key.decode("latin-1"),
                now=clock(),
            )
            await exchange.json(200, {"id": match.key_id, "remaining_credits": balance})
        elif match.action == "limits":
            limits = _limits(await _json_body(exchange))
            record = await store.set_key_limits(match.key_id, **limits)  # type: ignore[arg-type]
            await exchange.json(200, accounts.key_json(record))
        elif match.action == "usage":
            postings = await store.postings(match.key_id)  # type: ignore[arg-type]
            balance = await store.balance(match.key_id)  # type: ignore[arg-type]
            await exchange.json(
                200,
                {
                    "id": match.key_id,
                    "remaining_credits": balance,
                    "postings": [
                        {"kind": p.kind, "credits": p.credits, "at": p.at, "reservation_id": p.reservation_id, "note": p.note}
                        for p in postings[-MAX_POSTINGS:]
                    ],
                },
            )
        else:  # pragma: no cover - routing only yields the cases above
            raise NotFound("no such admin route")
    except UnknownKey:
        raise NotFound(f"no key with id {match.key_id or _query_param(exchange, 'key')}", code="key_not_found") from None
    except InvalidLedgerArgument as exc:
        raise BadRequest(str(exc)) from None
    except StoreUnavailable as exc:
        log.warning("admin %s %s: the ledger is unavailable: %s", method, match.kind.value, exc)
        raise store_unavailable(f"The credit ledger is unavailable; retry shortly ({exc}).") from None
    except StoreError as exc:  # a bare StoreError is a bug in a store: say so, keep no traceback out
        log.error("admin %s %s: ledger error: %s", method, match.kind.value, exc)
        raise InternalError("The credit ledger failed; see the gateway log.") from None
