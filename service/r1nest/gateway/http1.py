"""A lean HTTP/1.1 client for one upstream: keep-alive connection pool, streamed bodies.

Why not aiohttp or httpx: the gateway's added latency and CPU per request are dominated by the
client it uses upstream, and the gateway only ever talks to one engine, over plain HTTP/1.1,
with JSON bodies it builds itself. An asyncio Protocol with httptools' response parser (the
parser uvicorn uses) does that at a third of aiohttp's CPU per request (scripts/bench_gateway.py).

Bounded: total connections (a semaphore), idle connections kept, buffered body bytes per
response (reading pauses above BUFFER_HIGH_BYTES, so a slow client slows the engine's stream
rather than growing memory). Closing a response before its end closes the connection: the
engine sees the disconnect and aborts the request.
"""

from __future__ import annotations

import asyncio
import collections
from typing import AsyncIterator
from urllib.parse import urlsplit

import httptools

BUFFER_HIGH_BYTES = 1024 * 1024
BUFFER_LOW_BYTES = 256 * 1024
MAX_IDLE_CONNECTIONS = 256
MAX_HEADER_BYTES = 64 * 1024


class ConnectionFailed(Exception):
    """The connection could not be made, or broke before the response ended."""


class _Connection(asyncio.Protocol):
    """One TCP connection; carries one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.error: str | None = None
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.received_any = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.header_bytes = 0
        self.keep_alive = False
        self._waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("unexpected protocol upgrade")
        except httptools.HttpParserError as exc:
            self._fail(f"bad HTTP from upstream: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.complete:
            self._fail("connection closed by upstream")
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            self._fail("upstream headers too large")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > BUFFER_HIGH_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # only valid inside this callback
        self._wake()

    # helpers
    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.lost:
            self.paused = False
            self.transport.resume_reading()
        return data

    def reset(self) -> None:
        """Ready for the next request on the same connection."""
        self.parser = httptools.HttpResponseParser(self)
        self.status, self.headers_done, self.complete, self.received_any = 0, False, False, False
        self.keep_alive = False
        self.chunks.clear()
        self.buffered, self.header_bytes = 0, 0

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.lost and self.error is None


class Response:
    """A response whose body is read as it arrives. Use as an async context manager."""

    def __init__(self, pool: "Pool", connection: _Connection) -> None:
        self._pool = pool
        self._connection = connection
        self._released = False

    @property
    def status(self) -> int:
        return self._connection.status

    @property
    def at_eof(self) -> bool:
        connection = self._connection
        return connection.complete and not connection.chunks

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; ConnectionFailed if the response breaks off."""
        connection = self._connection
        while True:
            if connection.chunks:
                yield connection.take()
            elif connection.complete:
                return
            elif connection.error is not None:
                raise ConnectionFailed(connection.error)
            else:
                await connection.wait()

    async def read(self, limit: int) -> bytes:
        """The whole body; ConnectionFailed beyond `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if size > limit:
                raise ConnectionFailed("upstream response too large")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Back to the pool if the response was read to its end, else close the connection."""
        if self._released:
            return
        self._released = True
        self._pool._release(self._connection)

    async def __aenter__(self) -> "Response":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class Pool:
    """Keep-alive connections to one host:port."""

    def __init__(self, base_url: str, *, max_connections: int, connect_timeout_s: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("the lean upstream client speaks plain http:// only")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.base_path = parts.path.rstrip("/")
        self._host_header = parts.netloc.encode("latin-1")
        self._idle: collections.deque[_Connection] = collections.deque()
        self._slots = asyncio.Semaphore(max_connections)
        self._connect_timeout_s = connect_timeout_s
        self._heads: dict[tuple[str, str], bytes] = {}
        self.extra_headers = b""

    def _head(self, method: str, path: str) -> bytes:
        key = (method, path)
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = (
                f"{method} {self.base_path}{path} HTTP/1.1\r\n".encode("latin-1")
                + b"Host: " + self._host_header + b"\r\n" + self.extra_headers
            )
        return head

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(_Connection, self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise ConnectionFailed(f"cannot connect to upstream: {type(exc).__name__}") from None
        return connection

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.lost and connection.transport is not None and not connection.transport.is_closing():
                return connection
        return None

    async def request(self, method: str, path: str, body: bytes = b"") -> Response:
        """Send a request; returns once the response headers are in."""
        await self._slots.acquire()
        connection: _Connection | None = None
        try:
            for attempt in (0, 1):
                connection = self._take_idle()
                reused = connection is not None
                if connection is None:
                    connection = await self._connect()
                connection.reset()
                assert connection.transport is not None
                connection.transport.write(
                    self._head(method, path) + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                while not connection.headers_done and connection.error is None:
                    await connection.wait()
                if connection.headers_done:
                    return Response(self, connection)
                # A kept-alive connection the engine had just closed: nothing was processed,
                # so try once more on a fresh one. Anything else is a real failure.
                if not (reused and not connection.received_any and attempt == 0):
                    raise ConnectionFailed(connection.error or "upstream failed")
            raise ConnectionFailed("upstream failed")
        except BaseException:
            if connection is not None and connection.transport is not None:
                connection.transport.close()  # cancelled or failed mid-request: the engine aborts
            self._slots.release()
            raise

    def _release(self, connection: _Connection) -> None:
        self._slots.release()
        if connection.reusable and len(self._idle) < MAX_IDLE_CONNECTIONS:
            self._idle.append(connection)
            return
        if connection.transport is not None:
            connection.transport.close()

    async def close(self) -> None:
        while self._idle:
            connection = self._idle.pop()
            if connection.transport is not None:
                connection.transport.close()
