"""The engine behind the gateway: where it is, and the pooled HTTP client that talks to it.

Only this module does upstream I/O. Requests carry the engine's own key and nothing from the
client's headers. Closing a streamed response closes its TCP connection, which is how vLLM and
SGLang learn that a request was abandoned (they abort it and free the GPU).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

from r1nest.gateway.http1 import ConnectionFailed, Pool, Response

if TYPE_CHECKING:
    from r1nest.gateway.state import EngineState

MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a whole (non-streamed) answer larger than this is refused
CONNECT_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class UpstreamConfig:
    url: str  # base URL of the engine, e.g. http://127.0.0.1:8100
    api_key: str | None = field(default=None, repr=False)
    served_model: str = "deepseek-r1"


class UpstreamUnreachable(Exception):
    """The engine could not be reached or broke the connection."""


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    body: bytes


class Upstream:
    """A connection pool to the engine. `start()` inside the event loop, `close()` at shutdown."""

    def __init__(self, config: UpstreamConfig, *, read_timeout_s: float, max_connections: int = 1024) -> None:
        self.config = config
        self._read_timeout_s = read_timeout_s
        self._max_connections = max_connections
        headers = b"Content-Type: application/json\r\nAccept-Encoding: identity\r\n"
        if config.api_key:
            headers += b"Authorization: Bearer " + config.api_key.encode("latin-1") + b"\r\n"
        self._headers = headers
        self._pool: Pool | None = None

    async def start(self) -> None:
        if self._pool is None:
            self._pool = Pool(self.config.url, max_connections=self._max_connections, connect_timeout_s=CONNECT_TIMEOUT_S)
            self._pool.extra_headers = self._headers

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            raise RuntimeError("Upstream.start() was not called")
        return self._pool

    async def post(self, path: str, body: bytes) -> UpstreamResponse:
        """POST a JSON body and read the whole answer (bounded)."""
        try:
            async with await self.pool.request("POST", path, body) as response:
                return UpstreamResponse(response.status, await response.read(MAX_RESPONSE_BYTES))
        except ConnectionFailed as exc:
            raise UpstreamUnreachable(str(exc)) from None

    @contextlib.asynccontextmanager
    async def stream(self, path: str, body: bytes) -> AsyncIterator[Response]:
        """POST and hand back the response while its body streams in (`iter_chunks()`). Leaving
        the block before the end closes the connection (the engine aborts the request)."""
        try:
            response = await self.pool.request("POST", path, body)
        except ConnectionFailed as exc:
            raise UpstreamUnreachable(str(exc)) from None
        try:
            yield response
        finally:
            response.release()

    async def get(self, path: str) -> UpstreamResponse:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                async with await self.pool.request("GET", path) as response:
                    return UpstreamResponse(response.status, await response.read(1024 * 1024))
        except (ConnectionFailed, TimeoutError) as exc:
            raise UpstreamUnreachable(type(exc).__name__) from None

    async def healthy(self) -> bool:
        try:
            return (await self.get("/health")).status == 200
        except UpstreamUnreachable:
            return False


async def watch_health(upstream: Upstream, state: EngineState, *, interval_s: float = 2.0, failures_to_down: int = 3) -> None:
    """Keep `state` in step with the engine's /health until cancelled (for `r1nest gateway`)."""
    failures = 0
    while True:
        if await upstream.healthy():
            failures = 0
            state.set_ready()
        else:
            failures += 1
            if state.phase == "ready" and failures >= failures_to_down:
                state.set_down()
        await asyncio.sleep(interval_s)
