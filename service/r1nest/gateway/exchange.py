"""One HTTP request/response on the raw ASGI interface, with the gateway's response rules:
OpenAI-style error bodies, `x-remaining-credits` on every answer to an authenticated caller,
bounded request bodies, and a record of what was sent for metrics and the access log.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, MutableMapping

from r1nest.errors import ApiError, PayloadTooLarge
from r1nest.gateway import sse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


class Exchange:
    __slots__ = ("scope", "receive", "send", "status", "started", "finished", "remaining_credits", "key_id", "route",
                 "note", "anthropic")

    def __init__(self, scope: Scope, receive: Receive, send: Send, route: str) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.status = 0
        self.started = False
        self.finished = False
        self.remaining_credits: int | None = None  # set once the caller is authenticated
        self.key_id: str | None = None
        self.route = route
        self.note = ""  # short, key-free detail for the access log (tokens, credits)
        self.anthropic = False  # errors in the shape of Anthropic's Messages API

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = self.scope["headers"]
        return headers

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read_body(self, limit: int) -> bytes:
        """The whole request body, or 413 as soon as it is known to exceed `limit` bytes."""
        length = self.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"request body larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _headers(self, base: list[tuple[bytes, bytes]], extra: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
        headers = list(base)
        if self.remaining_credits is not None:
            headers.append((b"x-remaining-credits", str(self.remaining_credits).encode()))
        if extra:
            headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items())
        return headers

    async def start(self, status: int, base: list[tuple[bytes, bytes]], extra: dict[str, str] | None = None) -> None:
        self.status, self.started = status, True
        await self.send({"type": "http.response.start", "status": status, "headers": self._headers(base, extra)})

    async def body(self, data: bytes, *, more: bool = False) -> None:
        self.finished = not more
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def respond(self, status: int, body: bytes, *, content_type: bytes = b"application/json", extra: dict[str, str] | None = None) -> None:
        await self.start(status, [(b"content-type", content_type), (b"content-length", str(len(body)).encode())], extra)
        await self.body(body)

    async def json(self, status: int, obj: Any, *, extra: dict[str, str] | None = None) -> None:
        await self.respond(status, sse.encode(obj), extra=extra)

    async def error(self, exc: ApiError) -> None:
        await self.json(exc.status_code, exc.anthropic_body() if self.anthropic else exc.body(), extra=exc.headers)
