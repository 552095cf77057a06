"""A lean HTTP/1.1 client for one upstream: keep-alive connection pool, streamed bodies.

Why not a library: the gateway only ever talks to one engine, over plain HTTP/1.1, with JSON
bodies it builds itself, and the upstream client is a large share of the gateway's own CPU. An
asyncio Protocol with httptools' response parser (the parser uvicorn uses) takes about 0.3x
aiohttp's client CPU per request and 0.06x httpcore's, and the gateway using it spends about
0.7x the CPU per request of the same gateway on aiohttp (scripts/bench_upstream_clients.py;
figures, and the margin this client must keep to stay, in docs/benchmarks.md, "Upstream HTTP
client").

What a library would give, it does too:
- bodies framed by Content-Length, by chunked encoding, or by the server closing the connection
  (an HTTP/1.0-style answer without either: the body is whatever came before the clean close);
- a read-idle timeout per request (`idle_timeout_s`): no byte from the server for that long while
  the caller waits for one fails the response (ConnectionFailed, as a dropped connection does)
  and closes the connection. Time that reading is paused because the caller is slow does not
  count;
- keep-alive expiry: a connection idle in the pool longer than `keepalive_expiry_s` is closed
  rather than reused (under uvicorn's default 5 s keep-alive timeout, which vLLM keeps unless
  VLLM_HTTP_TIMEOUT_KEEP_ALIVE says otherwise, so the engine does not close a connection just as
  it is reused); one the server closed is dropped, and a request whose reused connection is
  closed before any answer byte is sent once more on a new one.

Bounded: total connections (a semaphore), idle connections kept, buffered body bytes per
response (reading pauses above BUFFER_HIGH_BYTES, so a slow client slows the engine's stream
rather than growing memory), header bytes. Closing a response before its end closes the
connection: the engine sees the disconnect and aborts the request.
"""

from __future__ import annotations

import asyncio
import collections
from typing import AsyncIterator
from urllib.parse import urlsplit

import httptools

BUFFER_HIGH_BYTES = 1024 * 1024
MAX_IDLE_CONNECTIONS = 256
MAX_HEADER_BYTES = 64 * 1024
KEEPALIVE_EXPIRY_S = 4.0  # an idle pooled connection older than this is closed, not reused


class ConnectionFailed(Exception):
    """The connection could not be made, or broke before the response ended."""


class _Connection(asyncio.Protocol):
    """One TCP connection; carries one request at a time."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
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
        self.framed = False  # Content-Length or Transfer-Encoding: else the body ends at the close
        self.idle_since = 0.0  # loop time it went back to the pool
        self.last_read = 0.0  # loop time of the last bytes received (or reading resumed)
        self.idle_timeout_s: float | None = None
        self.timed_out = False
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("unexpected protocol upgrade")
        except httptools.HttpParserError as exc:
            self._fail(f"bad HTTP from upstream: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.disarm()
        if not self.complete:
            if exc is None and self.error is None and self.headers_done and not self.framed:
                self.complete = True  # a body delimited by the close: this clean close ends it
            else:
                self._fail("connection closed by upstream")
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            self._fail("upstream headers too large")
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

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
        self.disarm()
        self._wake()

    # read-idle timeout: one timer per request, moved on only when it fires
    def arm(self, idle_timeout_s: float | None) -> None:
        """Fail the response if `idle_timeout_s` pass without a byte from the server (None: never)."""
        self.idle_timeout_s = idle_timeout_s
        if idle_timeout_s is not None:
            self.last_read = self.loop.time()
            self._timer = self.loop.call_at(self.last_read + idle_timeout_s, self._check_idle)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_idle(self) -> None:
        self._timer = None
        timeout = self.idle_timeout_s
        if timeout is None or self.complete or self.lost or self.error is not None:
            return
        now = self.loop.time()
        if self.paused:  # the caller is not reading: not the server's silence
            deadline = now + timeout
        else:
            deadline = self.last_read + timeout
            if deadline <= now:
                self.timed_out = True
                self._fail(f"no data from upstream for {timeout:g} s")
                return
        self._timer = self.loop.call_at(deadline, self._check_idle)

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
        self._waiter = self.loop.create_future()
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
            self.last_read = self.loop.time()  # the server gets a whole idle period from here
            self.transport.resume_reading()
        return data

    def reset(self) -> None:
        """Ready for the next request on the same connection."""
        self.parser = httptools.HttpResponseParser(self)
        self.status, self.headers_done, self.complete, self.received_any = 0, False, False, False
        self.keep_alive, self.framed = False, False
        self.chunks.clear()
        self.buffered, self.header_bytes = 0, 0
        self.disarm()
        self.idle_timeout_s, self.timed_out = None, False

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.lost and self.error is None


class _Ticker:
    """Wakes a connection's reader every `period_s` and notes that it did."""

    __slots__ = ("_connection", "_period_s", "_handle", "ticked")

    def __init__(self, connection: _Connection, period_s: float) -> None:
        self._connection = connection
        self._period_s = period_s
        self.ticked = False
        self._handle = connection.loop.call_later(period_s, self._tick)

    def _tick(self) -> None:
        self.ticked = True
        self._connection._wake()
        self._handle = self._connection.loop.call_later(self._period_s, self._tick)

    def cancel(self) -> None:
        self._handle.cancel()


class Response:
    """A response whose body is read as it arrives. Use as an async context manager."""

    def __init__(self, pool: "Pool", connection: _Connection) -> None:
        self._pool = pool
        self._connection = connection
        self._released = False

    @property
    def status(self) -> int:
        return self._connection.status

    async def iter_chunks(self, *, tick_s: float | None = None) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; ConnectionFailed if the response breaks off. With `tick_s`,
        an empty chunk is yielded when a tick of that period passed without data (one timer per
        response, not per chunk), so that the reader can act on a quiet stream."""
        connection = self._connection
        ticker = _Ticker(connection, tick_s) if tick_s else None
        try:
            while True:
                if connection.chunks:
                    yield connection.take()
                elif connection.complete:
                    return
                elif connection.error is not None:
                    raise ConnectionFailed(connection.error)
                elif ticker is not None and ticker.ticked:
                    ticker.ticked = False
                    yield b""
                else:
                    await connection.wait()
        finally:
            if ticker is not None:
                ticker.cancel()

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

    def __init__(
        self, base_url: str, *, max_connections: int, connect_timeout_s: float,
        keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
    ) -> None:
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
        self._keepalive_expiry_s = keepalive_expiry_s
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

    def _expire_idle(self, now: float) -> None:
        """Close pooled connections idle for longer than the expiry (the oldest are on the left)."""
        idle, oldest = self._idle, now - self._keepalive_expiry_s
        while idle and idle[0].idle_since < oldest:
            connection = idle.popleft()
            if connection.transport is not None:
                connection.transport.close()

    def _take_idle(self) -> _Connection | None:
        self._expire_idle(asyncio.get_running_loop().time())
        while self._idle:
            connection = self._idle.pop()
            if not connection.lost and connection.transport is not None and not connection.transport.is_closing():
                return connection
        return None

    async def request(self, method: str, path: str, body: bytes = b"", *, idle_timeout_s: float | None = None) -> Response:
        """Send a request; returns once the response headers are in. `idle_timeout_s`: fail
        (ConnectionFailed) when the server sends nothing for that long, headers or body."""
        await self._slots.acquire()
        connection: _Connection | None = None
        try:
            for attempt in (0, 1):
                connection = self._take_idle()
                reused = connection is not None
                if connection is None:
                    connection = await self._connect()
                connection.reset()
                connection.arm(idle_timeout_s)
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
                if not (reused and connection.lost and not connection.received_any and not connection.timed_out and attempt == 0):
                    raise ConnectionFailed(connection.error or "upstream failed")
            raise ConnectionFailed("upstream failed")
        except BaseException:
            if connection is not None and connection.transport is not None:
                connection.transport.close()  # cancelled or failed mid-request: the engine aborts
            self._slots.release()
            raise

    def _release(self, connection: _Connection) -> None:
        self._slots.release()
        connection.disarm()
        if connection.reusable and len(self._idle) < MAX_IDLE_CONNECTIONS:
            connection.idle_since = now = connection.loop.time()
            self._expire_idle(now)
            self._idle.append(connection)
            return
        if connection.transport is not None:
            connection.transport.close()

    async def close(self) -> None:
        while self._idle:
            connection = self._idle.pop()
            if connection.transport is not None:
                connection.transport.close()
