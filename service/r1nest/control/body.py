"""Request bodies of the control plane: bounded, strict JSON objects, read after the caller's key.

    guarded_route(guard) -> an APIRoute class whose routes run `guard(request)` first, then read
                            a JSON body (when the route takes one) through `read_json_object`

FastAPI would parse a body with `json.loads`, which takes NaN, Infinity and 1e400 (inf), and
only for a JSON content type. Here a route's body is at most MAX_ADMIN_BODY_BYTES (413 past it),
must be a JSON object with finite numbers only, anywhere in it (400 otherwise, before any field
is looked at), and is read as JSON whatever its content type says; an empty body is `{}`. The
pydantic model then checks the fields (control/models.py).

The guard (the admin key) runs before the body is read, so a caller without the key learns
nothing of the input rules and cannot make the gateway read 16 KiB.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Coroutine

from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from r1nest.errors import BadRequest, PayloadTooLarge

MAX_ADMIN_BODY_BYTES = 16 * 1024

Guard = Callable[[Request], None]


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)  # NaN, Infinity, -Infinity: not JSON (RFC 8259), never a number here


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise _NonFinite(text)
    return value


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; BadRequest for anything else. Empty: {}."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float) if raw else {}
    except _NonFinite as exc:
        raise BadRequest(f"numbers in the request body must be finite, got {exc}") from None
    except (ValueError, RecursionError):  # includes invalid UTF-8 and nesting deeper than the parser goes
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


async def read_body(request: Request, limit: int = MAX_ADMIN_BODY_BYTES) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body larger than {limit} bytes")
    return bytes(body)


class _ParsedRequest(Request):
    """A request whose body has been read and parsed already: FastAPI takes it as JSON."""

    def __init__(self, request: Request, raw: bytes, parsed: dict[str, Any]) -> None:
        super().__init__(request.scope, request.receive)
        self._raw, self._parsed = raw or b"{}", parsed
        headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
        self._json_headers = Headers(raw=[*headers, (b"content-type", b"application/json")])

    @property
    def headers(self) -> Headers:
        return self._json_headers

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._parsed


def guarded_route(guard: Guard | None = None) -> type[APIRoute]:
    """An APIRoute class: `guard` first, then the strict body (routes that take one)."""

    class GuardedRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()
            takes_body = self.body_field is not None

            async def guarded(request: Request) -> Response:
                if guard is not None:
                    guard(request)
                if takes_body:
                    raw = await read_body(request)
                    request = _ParsedRequest(request, raw, parse_json_object(raw))
                return await handler(request)

            return guarded

    return GuardedRoute
