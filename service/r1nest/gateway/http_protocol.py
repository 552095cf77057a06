"""The gateway's HTTP/1.1 connection protocol: uvicorn's httptools protocol, with these changes.

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
- **A bound on request heads** (request line + headers; httptools has none, and uvicorn's h11
  limit does not apply to it). While a head is incomplete, the bytes received for it are counted
  in `data_received` before the parser buffers them; once a head passes `max_header_bytes`
  (`R1NEST_MAX_HEADER_BYTES`, 64 KiB) the gateway answers `431 request_header_fields_too_large`
  and closes, without reading more. A read that holds a head's end and then body bytes is fed in
  two parts, so body bytes never count against the head. (A head pipelined in the same read as
  the previous request's end is counted from the next read: it may pass the bound by at most one
  read, which the event loop caps at about 256 KB.)
- **A deadline for request heads** (`header_timeout_s`, `R1NEST_HEADER_TIMEOUT_S`, 10 s). uvicorn
  starts its keep-alive timer only after a response, so a connection that never sends a request
  (or sends its head a byte at a time: slowloris) was kept forever. A timer runs whenever the
  connection waits for a request head with no request in flight: from the connection's opening,
  and from the end of each response (or of the request, when the app answered before reading it
  all). It is cancelled when a head is complete, so it never cuts a request body or a response,
  however long a stream lasts. When it fires with part of a head received, the answer is
  `408 request_timeout`; with nothing received, the connection is just closed. uvicorn's own
  keep-alive timer (`timeout_keep_alive`) still runs between requests, untouched; both only
  close a connection that is waiting for a request, whichever is shorter first, and each does
  nothing on a connection already closing (an idle keep-alive connection lasts at most the
  shorter of the two).

Everything else is uvicorn's HttpToolsProtocol (httptools, kept for speed): pass the class as
`uvicorn.Config(http=GatewayHttpProtocol)`. Written against uvicorn 0.54's httptools_impl; the
hooks it overrides are `connection_made`, `connection_lost`, `data_received`,
`send_400_response`, `on_message_begin`, `on_headers_complete`, `on_message_complete`,
`on_response_complete`, `_start_asgi_task` and `RequestResponseCycle.send_500_response`
(tests/gateway/test_gateway_http_protocol.py and test_gateway_connections.py drive each through a
real server). The limits are class attributes; `GatewayHttpProtocol.configured(...)` makes the
subclass with the settings' values that `uvicorn_server` passes to uvicorn.
"""

from __future__ import annotations

import asyncio
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
DEFAULT_MAX_HEADER_BYTES = 64 * 1024  # settings.max_header_bytes
DEFAULT_HEADER_TIMEOUT_S = 10.0  # settings.header_timeout_s


class HeaderFieldsTooLarge(ApiError):
    status_code, error_type, code = 431, "invalid_request_error", "request_header_fields_too_large"


class RequestTimeout(ApiError):
    status_code, error_type, code = 408, "invalid_request_error", "request_timeout"


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
    for header, text in exc.headers.items():
        content.extend([header.lower().encode("latin-1"), b": ", text.encode("latin-1"), b"\r\n"])
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
    """uvicorn's httptools protocol with case-insensitive standard methods, JSON errors, and a
    size bound and a deadline for request heads."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S

    @classmethod
    def configured(cls, *, max_header_bytes: int, header_timeout_s: float) -> type["GatewayHttpProtocol"]:
        """A subclass with these limits, for `uvicorn.Config(http=...)` (uvicorn makes one
        protocol per connection from the class alone)."""
        if max_header_bytes < 1 or header_timeout_s <= 0:
            raise ValueError("max_header_bytes and header_timeout_s must be positive")
        attributes = {"max_header_bytes": int(max_header_bytes), "header_timeout_s": float(header_timeout_s)}
        return type(cls.__name__, (cls,), attributes)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._at_request_start = True  # the parser is between requests: the next byte starts one
        self._held = b""  # the first bytes of a request whose method token is not whole yet
        # Bytes received for the request head being read; None while no head is being read (from
        # a head's end to its request's end: the body, which this bound does not cover).
        self._head_bytes: int | None = 0
        self._header_timer: asyncio.TimerHandle | None = None

    # connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

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
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Hand `data` to uvicorn's data_received (the parser), counting what a head takes."""
        while data and not self.transport.is_closing():
            if self._head_bytes is None:  # in a body: no head bound here
                super().data_received(data)
                return
            room = self.max_header_bytes - self._head_bytes
            if room <= 0:  # the head is at the bound and is not complete: it is over it
                self._refuse_large_head()
                return
            # At most what the head may still take: if the head ends inside this piece, the rest
            # (a body, a next request) goes round again with the head's bytes no longer counted.
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
            if self.transport.get_protocol() is not self:  # upgraded (websocket): not ours now
                return

    def _refuse_large_head(self) -> None:
        self._cancel_header_timer()
        self.logger.warning("Request head over %d bytes refused.", self.max_header_bytes)
        exc = HeaderFieldsTooLarge(
            f"The request line and headers are over the limit of {self.max_header_bytes} bytes.",
        )
        self._close_with(exc)

    def _close_with(self, exc: ApiError) -> None:
        """Answer `exc` and close; only closes when a response is still being written (a
        pipelined request), as bytes written now would land inside that response."""
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(raw_error_response(exc, self.server_state.default_headers))
        self.transport.close()

    # the header deadline ---------------------------------------------------------------------

    def _waiting_for_head(self) -> bool:
        """No request in flight and the next request's head not complete yet."""
        return (
            self._head_bytes is not None
            and (self.cycle is None or self.cycle.response_complete)
            and not self.pipeline
        )

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and not self.transport.is_closing() and self._waiting_for_head():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._waiting_for_head():
            return
        self._unset_keepalive_if_required()
        if self._head_bytes or self._held or not self._at_request_start:  # part of a head came
            self.logger.warning("Request head not complete within %.1f s; closing.", self.header_timeout_s)
            self._close_with(RequestTimeout(
                f"The request line and headers did not arrive within {self.header_timeout_s:g} seconds.",
            ))
        else:  # idle: nothing to answer
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    # Parser callbacks: the parser calls on_message_begin on the first byte of a request (empty
    # lines before it are skipped) and on_message_complete after its last, so a read that ends a
    # request and starts the next one (pipelining) leaves the flag False, as it must.
    def on_message_begin(self) -> None:
        self._at_request_start = False
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._at_request_start = True
        self._head_bytes = 0
        super().on_message_complete()
        self._arm_header_timer()  # when the app answered before the request's end

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
