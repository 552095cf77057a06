"""The control plane as one FastAPI app: the admin API, a key's own credits and usage, /overview.

    create_control_app(store=..., clock=..., admin=AdminKey(...), page_context=...) -> ControlApp

    POST /admin/keys {"name","credits","expires_at"?,"max_concurrency"?,"rate_limit_rpm"?}
         -> 201 {"id","key","name","remaining_credits","max_concurrency","rate_limit_rpm"}
    GET  /admin/keys -> {"object":"list","data":[{"id","name","created_at","expires_at","revoked",
                                                  "remaining_credits","max_concurrency","rate_limit_rpm"}]}
    POST /admin/keys/{id}/revoke -> {"id","revoked":true}
    POST /admin/keys/{id}/topup {"credits":N} + Idempotency-Key -> {"id","remaining_credits"}
    POST /admin/keys/{id}/limits {"max_concurrency":N|null,"rate_limit_rpm":N|null} -> the key
    GET  /admin/keys/{id}/usage -> {"id","remaining_credits","postings":[...]}
    GET  /admin/usage?key=ID&from=&to=&bucket=hour|day -> usage buckets (r1nest/usage.py)
    GET  /admin/openapi.json -> this API's OpenAPI document
    GET  /v1/credits (API key) -> {"object":"credits","id","remaining_credits"}
    GET  /v1/usage?from=&to=&bucket= (API key) -> the key's own usage buckets
    /overview, /overview/login, /overview/logout, /overview/static/... (control/overview.py)

The gateway (gateway/app.py) keeps the completion hot path as a lean ASGI app and hands every
control route, matched by its exact raw-path allowlist (gateway/routing.py), to this app. The
admin key is checked before anything else is read; there is no public /docs or /openapi.json.

Per-key limits: a positive integer, or null for the deployment's default
(R1NEST_MAX_CONCURRENT_PER_KEY, R1NEST_RATE_LIMIT_RPM). `limits` replaces both: a field left
out is set to null. Bodies and errors: control/body.py, control/models.py, control/errors.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Awaitable, Callable
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.responses import Response

import r1nest
from r1nest import accounts, usage
from r1nest.control import models
from r1nest.control.body import MAX_ADMIN_BODY_BYTES, guarded_route
from r1nest.control.errors import answer, install_error_handlers
from r1nest.control.overview import overview_routes
from r1nest.errors import BadRequest, UnknownKey
from r1nest.gateway.auth import AdminKey, authenticate
from r1nest.gateway.exchange import Receive, Scope, Send
from r1nest.ledger import rules
from r1nest.ledger.base import KeyRecord, Store

MAX_POSTINGS = 1000
MAX_QUERY_FIELDS = 16
OPENAPI_PATH = "/admin/openapi.json"

PageContext = Callable[..., Awaitable[Any]]  # -> OverviewContext

# how a caller presents a key (auth.presented_key reads either): documented here, checked there
_BEARER = HTTPBearer(auto_error=False, scheme_name="BearerKey", description="`Authorization: Bearer <key>`")
_X_API_KEY = APIKeyHeader(name="x-api-key", auto_error=False, scheme_name="XApiKey", description="`x-api-key: <key>`")
_PRESENTED = [Security(_BEARER), Security(_X_API_KEY)]

Responses = dict[int | str, dict[str, Any]]
_ERROR = {"model": models.ErrorBody}
_REFUSALS: Responses = {
    400: {**_ERROR, "description": "input refused: `param` names the field"},
    401: {**_ERROR, "description": "missing or invalid key"},
    503: {**_ERROR, "description": "the ledger cannot answer now: retry after Retry-After seconds"},
}
_WITH_BODY: Responses = {**_REFUSALS, 413: {**_ERROR, "description": f"body larger than {MAX_ADMIN_BODY_BYTES} bytes"}}
_KEY_NOT_FOUND: Responses = {404: {**_ERROR, "description": "no such key (code key_not_found)"}}

KeyIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$", description="the key's id")]
From = Annotated[str | None, Query(alias="from", description="unix seconds, ISO 8601, or a span back: 24h, 7d")]
To = Annotated[str | None, Query(alias="to", description="as `from`; default: now")]
Bucket = Annotated[str | None, Query(description="hour or day (default)")]


class ControlApp:
    """The control plane's ASGI callable; `.api` is the FastAPI app.

    Starlette re-raises an exception its 500 handler has answered (and control/errors.py has
    logged), for a server to log; the answer is out by then, so it ends here."""

    def __init__(self, api: FastAPI) -> None:
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answered = False

        async def tracked(message: Any) -> None:
            nonlocal answered
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.api(scope, receive, tracked)
        except Exception:
            if not answered:
                raise


def create_control_app(
    *, store: Store, clock: Callable[[], float], admin: AdminKey, page_context: PageContext,
) -> ControlApp:
    api = FastAPI(
        title="r1nest control plane", version=r1nest.__version__, openapi_url=None, docs_url=None, redoc_url=None,
        description="Keys, credits and usage of an r1nest gateway. Every refusal is an OpenAI-style error body.",
    )
    install_error_handlers(api)
    api.include_router(_admin_router(api, store, clock, admin))
    api.include_router(_key_router(store, clock))
    api.router.routes.extend(overview_routes(verify_admin_key=admin.verify, page_context=page_context, clock=clock))
    api.openapi = lambda: _openapi(api)  # type: ignore[method-assign]
    return ControlApp(api)


def readable_query(request: Request) -> None:
    """400 for a query string that is not ASCII percent-encoding of UTF-8, or has too many fields."""
    raw = request.scope.get("query_string") or b""
    try:
        parse_qsl(raw.decode("ascii"), keep_blank_values=True, errors="strict", max_num_fields=MAX_QUERY_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("The query string cannot be read.") from None


async def _usage_answer(
    request: Request, store: Store, clock: Callable[[], float], *, key_id: str | None,
    start: str | None, end: str | None, bucket: str | None,
) -> Response:
    readable_query(request)
    window = usage.parse_window(start=start, end=end, bucket=bucket, now=clock())
    if key_id is not None and await store.get_key(key_id) is None:
        raise UnknownKey(key_id)
    buckets = await store.usage(key_id=key_id, since=window.since, until=window.until, bucket_s=window.bucket_s)
    return answer(request, 200, usage.usage_json(window, buckets, key_id=key_id))


def _admin_router(api: FastAPI, store: Store, clock: Callable[[], float], admin: AdminKey) -> APIRouter:
    def require_admin(request: Request) -> None:
        admin.require(request.scope["headers"])

    router = APIRouter(
        prefix="/admin", tags=["admin"], route_class=guarded_route(require_admin), dependencies=_PRESENTED,
        responses=_REFUSALS,
    )

    @router.get("/keys", response_model=models.KeyList)
    async def list_keys(request: Request) -> Response:
        keys = await store.list_keys()
        return answer(request, 200, {"object": "list", "data": [accounts.key_json(k) for k in keys]})

    @router.post("/keys", status_code=201, response_model=models.CreatedKey, responses=_WITH_BODY)
    async def create_key(request: Request, body: models.CreateKey) -> Response:
        limits = {"max_concurrency": body.max_concurrency, "rate_limit_rpm": body.rate_limit_rpm}
        record, plaintext = await accounts.create_api_key(
            store, name=body.name, credits=body.credits, expires_at=body.expires_at, now=clock(), **limits,
        )
        return answer(request, 201, {"id": record.key_id, "key": plaintext, "name": record.name,
                                     "remaining_credits": record.remaining_credits, **limits})

    @router.post("/keys/{key_id}/revoke", response_model=models.Revoked, responses=_KEY_NOT_FOUND)
    async def revoke_key(request: Request, key_id: KeyIdPath) -> Response:
        record = await store.revoke_key(key_id)
        return answer(request, 200, {"id": record.key_id, "revoked": True})

    @router.post("/keys/{key_id}/topup", response_model=models.Balance, responses={**_WITH_BODY, **_KEY_NOT_FOUND})
    async def topup_key(
        request: Request, key_id: KeyIdPath, body: models.TopupKey,
        idempotency_key: Annotated[str, Header(
            alias="Idempotency-Key", min_length=1, max_length=rules.MAX_IDEMPOTENCY_KEY_CHARS,
            description="the same key again is the same top-up, applied once",
        )],
    ) -> Response:
        balance = await store.topup(key_id, body.credits, idempotency_key=idempotency_key, now=clock())
        return answer(request, 200, {"id": key_id, "remaining_credits": balance})

    @router.post("/keys/{key_id}/limits", response_model=models.Key, responses={**_WITH_BODY, **_KEY_NOT_FOUND})
    async def set_limits(request: Request, key_id: KeyIdPath, body: models.KeyLimits) -> Response:
        record = await store.set_key_limits(key_id, max_concurrency=body.max_concurrency,
                                            rate_limit_rpm=body.rate_limit_rpm)
        return answer(request, 200, accounts.key_json(record))

    @router.get("/keys/{key_id}/usage", response_model=models.KeyPostings, responses=_KEY_NOT_FOUND)
    async def key_postings(request: Request, key_id: KeyIdPath) -> Response:
        postings = await store.postings(key_id)
        balance = await store.balance(key_id)
        return answer(request, 200, {
            "id": key_id,
            "remaining_credits": balance,
            "postings": [
                {"kind": p.kind, "credits": p.credits, "at": p.at, "reservation_id": p.reservation_id, "note": p.note}
                for p in postings[-MAX_POSTINGS:]
            ],
        })

    @router.get("/usage", response_model=models.UsageReport, responses=_KEY_NOT_FOUND)
    async def all_usage(
        request: Request, start: From = None, end: To = None, bucket: Bucket = None,
        key: Annotated[str | None, Query(description="one key's id; default: all keys")] = None,
    ) -> Response:
        return await _usage_answer(request, store, clock, key_id=key, start=start, end=end, bucket=bucket)

    @router.get(OPENAPI_PATH.removeprefix("/admin"), include_in_schema=False)
    async def openapi_document(request: Request) -> Response:
        return answer(request, 200, api.openapi())

    return router


def _key_router(store: Store, clock: Callable[[], float]) -> APIRouter:
    async def api_key(request: Request) -> KeyRecord:
        """The caller's live key (401 otherwise); its id goes to the gateway's access log."""
        record = await authenticate(store, request.scope["headers"], now=clock())
        request.state.key_id = record.key_id
        request.state.remaining_credits = record.remaining_credits
        return record

    router = APIRouter(prefix="/v1", tags=["key"], route_class=guarded_route(), dependencies=_PRESENTED,
                       responses=_REFUSALS)
    caller = Depends(api_key)

    @router.get("/credits", response_model=models.CreditsLeft)
    async def credits(request: Request, record: KeyRecord = caller) -> Response:
        return answer(request, 200, {"object": "credits", "id": record.key_id,
                                     "remaining_credits": record.remaining_credits})

    @router.get("/usage", response_model=models.UsageReport)
    async def own_usage(request: Request, record: KeyRecord = caller, start: From = None,
                        end: To = None, bucket: Bucket = None) -> Response:
        return await _usage_answer(request, store, clock, key_id=record.key_id, start=start, end=end, bucket=bucket)

    return router


def _openapi(api: FastAPI) -> dict[str, Any]:
    """The document, once: FastAPI's, less the 422 answers this app never gives (input it
    refuses is a 400 in OpenAI's error shape)."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        api.openapi_schema = schema
    return api.openapi_schema
