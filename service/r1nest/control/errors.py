"""How the control plane answers: strict JSON, and every refusal in OpenAI's error shape.

    install_error_handlers(app)   the exception handlers below, on a FastAPI app
    answer(request, status, body) a JSON answer (+ x-remaining-credits for an API key's caller)

    RequestValidationError   -> 400 invalid_request (never FastAPI's 422), the field in `param`
    HTTPException            -> its status (404 not_found, 405 + Allow, ...)
    ApiError                 -> its own status, body and headers
    StoreUnavailable         -> 503 ledger_unavailable + Retry-After (the admin API adds the cause)
    UnknownKey               -> 404 key_not_found
    InvalidLedgerArgument    -> 400
    StoreError (a bug)       -> 500, logged; anything else -> 500 "Internal error.", logged
                                with its traceback, which never goes out

JSON is written by the gateway's encoder (allow_nan=False): no answer holds NaN or Infinity.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from r1nest.errors import (
    ApiError,
    BadRequest,
    InternalError,
    InvalidLedgerArgument,
    MethodNotAllowed,
    NotFound,
    StoreError,
    StoreUnavailable,
    UnknownKey,
    store_unavailable,
)
from r1nest.gateway import sse

log = logging.getLogger("r1nest.control")

ADMIN_PREFIX = "/admin/"


class StrictJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return sse.encode(content)


def answer(request: Request, status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    """`body` as JSON; an authenticated API-key caller also gets `x-remaining-credits`."""
    extra = dict(headers or {})
    remaining = getattr(request.state, "remaining_credits", None)
    if remaining is not None:
        extra["x-remaining-credits"] = str(remaining)
    return StrictJSONResponse(body, status_code=status, headers=extra)


def error_answer(request: Request, error: ApiError) -> Response:
    return answer(request, error.status_code, error.body(), error.headers)


def _is_admin(request: Request) -> bool:
    return request.url.path.startswith(ADMIN_PREFIX)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_answer(request, exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ())] or ["body"]
    param = loc[1] if len(loc) > 1 else None  # the field, header or query parameter
    message = first.get("msg", "invalid request")
    if loc[0] == "header" and first.get("type") == "missing":
        text = f"the {param} header is required"
    elif param is not None:
        text = f"`{'.'.join(loc[1:])}`: {message}"
    else:
        text = f"the request {loc[0]}: {message}"
    return error_answer(request, BadRequest(text, param=param))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        error: ApiError = NotFound("Not found.")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"Method {request.method} is not allowed here.", headers=headers)
    else:
        error = ApiError(str(exc.detail), code=f"http_{exc.status_code}", headers=headers)
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_answer(request, error)


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    if not _is_admin(request):  # an API key's caller learns nothing of the store
        return error_answer(request, store_unavailable())
    log.warning("admin %s %s: the ledger is unavailable: %s", request.method, request.url.path, exc)
    return error_answer(request, store_unavailable(f"The credit ledger is unavailable; retry shortly ({exc})."))


async def _unknown_key(request: Request, exc: Exception) -> Response:
    key_id = request.path_params.get("key_id") or request.query_params.get("key")
    return error_answer(request, NotFound(f"no key with id {key_id}" if key_id else str(exc), code="key_not_found"))


async def _invalid_argument(request: Request, exc: Exception) -> Response:
    return error_answer(request, BadRequest(str(exc)))


async def _store_error(request: Request, exc: Exception) -> Response:
    """A bare StoreError is a bug in a store: the log has it, the answer does not."""
    if not _is_admin(request):
        return await _unexpected(request, exc)
    log.error("admin %s %s: ledger error: %s", request.method, request.url.path, exc)
    return error_answer(request, InternalError("The credit ledger failed; see the gateway log."))


async def _unexpected(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ClientDisconnect):  # nobody reads the answer: 499 for the access log, as on the hot path
        log.info("%s %s: the client left before its request was read", request.method, request.url.path)
        gone = ApiError("The client closed the request.", code="client_closed_request")
        gone.status_code = 499
        return error_answer(request, gone)
    else:
        log.error("internal error %s %s", request.method, request.url.path, exc_info=exc)
    return error_answer(request, InternalError("Internal error."))


def install_error_handlers(app: FastAPI) -> None:
    handlers = {
        RequestValidationError: _validation_error,
        HTTPException: _http_error,
        ApiError: _api_error,
        StoreUnavailable: _store_unavailable,
        UnknownKey: _unknown_key,
        InvalidLedgerArgument: _invalid_argument,
        StoreError: _store_error,
        Exception: _unexpected,  # Starlette re-raises it after the answer: ControlApp drops it
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
