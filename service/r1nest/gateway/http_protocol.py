"""The gateway's HTTP/1.1 connection protocol: uvicorn's httptools protocol, with two changes.

Owns what a client sees before the gateway app runs, or when the app is not reached:

- **Method names in any case.** `curl -X Post` (as in Computing Nest's documented example) sends
  the method token `Post` verbatim, and llhttp refuses anything but upper case. A method token
  that is a case variant of GET, HEAD, POST, PUT, DELETE, OPTIONS or PATCH is upper-cased before
  the parser sees it, and only at the start of a request: the first on a connection, and each one
  after the previous request ended (keep-alive). Nothing else of the request is touched, and a
  request whose first bytes arrive in separate reads (`Po`, then `st /v1/...`) is handled by
  holding back at most a method's length of bytes until the token is whole. A method that is not
  a case variant of these (`FOO`, `PROPFIND`) is passed to the parser as it came.
- **OpenAI-style JSON errors.** What uvicorn answers itself in plain text is answered with the
  gateway's error body (`{"error": {"message", "type", "param", "code"}}`, see r1nest.errors):
  a request refused by the parser (malformed request line or headers, an unknown method) is
  `400 invalid_http_request`; the app raising before it started a response is
  `500 internal_error`; a request over `limit_concurrency` is `503 server_busy`.

Everything else is uvicorn's HttpToolsProtocol (httptools, kept for speed): pass the class as
`uvicorn.Config(http=GatewayHttpProtocol)`. Written against uvicorn 0.54's httptools_impl; the
hooks it overrides are `data_received`, `send_400_response`, `on_message_begin`,
`on_message_complete`, `_start_asgi_task` and `RequestResponseCycle.send_500_response`
(tests/gateway/test_gateway_http_protocol.py drives each through a real server).
"""

from __future__ import annotations

import sys
from typing import Any

from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from r1nest.errors import ApiError, BadRequest, InternalError, Unavailable
from r1nest.gateway.sse import encode

STANDARD_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})
LONGEST_METHOD = max(len(method) for method in STANDARD_METHODS)
# Every non-empty prefix of a standard method, complete ones included ("OPTIONS" with its space
# still to come): what a request's first read may hold while the token is not yet whole.
METHOD_PREFIXES = frozenset(method[:end] for method in STANDARD_METHODS for end in range(1, len(method) + 1))
EMPTY_LINE_BYTES = b"\r\n"  # llhttp skips empty lines before a request line

INVALID_HTTP_MESSAGE = "Invalid HTTP request received"
BUSY_RETRY_AFTER_S = "1"


def error_payload(exc: ApiError) -> bytes:
    return encode(exc.body())


def normalise_method(data: bytes) -> bytes | None:
    """`data`, the start of a request, with its method token upper-cased when that makes it a
    standard method; None when `data` may be the start of such a token but does not reach its end
    (hold it and decide with the next read)."""
    start = 0
    if data[:1] in (b"\r", b"\n"):
        start = len(data) - len(data.lstrip(EMPTY_LINE_BYTES))
        if start == len(data):
            return data  # empty lines only: the parser skips them and stays between requests
    end = data.find(b" ", start, start + LONGEST_METHOD + 1)
    if end < 0:
        if len(data) - start <= LONGEST_METHOD and data[start:].upper() in METHOD_PREFIXES:
            return None
        return data
    token = data[start:end]
    if token in STANDARD_METHODS:
        return data
    upper = token.upper()
    if upper in STANDARD_METHODS:
        return data[:start] + upper + data[end:]
    return data


def raw_error_response(exc: ApiError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete HTTP/1.1 response carrying `exc`'s JSON body, closing the connection."""
    body = error_payload(exc)
    content = [STATUS_LINE[exc.status_code]]
    for name, value in default_headers:
        content.extend([name, b": ", value, b"\r\n"])
    for name, value in exc.headers.items():
        content.extend([name.lower().encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n"])
    content.extend(
        [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n",
            b"\r\n",
            body,
        ]
    )
    return b"".join(content)


async def send_error(send: Any, exc: ApiError) -> None:
    """Answer `exc` through an ASGI `send`, closing the connection afterwards."""
    body = error_payload(exc)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"connection", b"close"),
    ]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def server_busy(scope: Any, receive: Any, send: Any) -> None:
    """Stands in for uvicorn's plain-text `service_unavailable` (over `limit_concurrency`)."""
    await send_error(
        send,
        Unavailable(
            "The server is handling too many requests; retry shortly.",
            code="server_busy",
            headers={"Retry-After": BUSY_RETRY_AFTER_S},
        ),
    )


class GatewayRequestCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, whose last-resort 500 is a JSON error."""

    async def send_500_response(self) -> None:
        await send_error(self.send, InternalError("Internal error."))


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with case-insensitive standard methods and JSON errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._at_request_start = True  # the parser is between requests: the next byte starts one
        self._held = b""  # the first bytes of a request whose method token is not whole yet

    def data_received(self, data: bytes) -> None:
        if self._at_request_start:
            if self._held:
                data = self._held + data
                self._held = b""
            normalised = normalise_method(data)
            if normalised is None:
                self._unset_keepalive_if_required()  # as uvicorn does on any bytes received
                self._held = data
                return
            data = normalised
        super().data_received(data)

    # Parser callbacks: the parser calls on_message_begin on the first byte of a request (empty
    # lines before it are skipped) and on_message_complete after its last, so a read that ends a
    # request and starts the next one (pipelining) leaves the flag False, as it must.
    def on_message_begin(self) -> None:
        self._at_request_start = False
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._at_request_start = True
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this inside its `except httptools.HttpParserError`; the parser's reason
        # (a fixed llhttp text such as "Invalid method encountered") tells the client what to fix.
        reason = sys.exc_info()[1]
        message = f"{INVALID_HTTP_MESSAGE}: {reason}." if reason and str(reason) else f"{INVALID_HTTP_MESSAGE}."
        exc = BadRequest(message, code="invalid_http_request")
        self.transport.write(raw_error_response(exc, self.server_state.default_headers))
        self.transport.close()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # Every cycle goes through here (now, or later from the pipeline queue) before it runs.
        if type(cycle) is RequestResponseCycle:
            cycle.__class__ = GatewayRequestCycle
        if app is service_unavailable:
            app = server_busy
        super()._start_asgi_task(cycle, app)
