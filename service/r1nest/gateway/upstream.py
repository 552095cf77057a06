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

import aiohttp
from yarl import URL

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


class ResponseTooLarge(Exception):
    pass


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    body: bytes


class Upstream:
    """A connection pool to the engine. `start()` inside the event loop, `close()` at shutdown."""

    def __init__(self, config: UpstreamConfig, *, read_timeout_s: float, max_connections: int = 1024) -> None:
        self.config = config
        self._base = URL(config.url.rstrip("/"))
        self._read_timeout_s = read_timeout_s
        self._max_connections = max_connections
        self._headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if config.api_key:
            self._headers["Authorization"] = f"Bearer {config.api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_read=self._read_timeout_s),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = self._base.with_path(self._base.path.rstrip("/") + path)
        return url

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Upstream.start() was not called")
        return self._session

    async def post(self, path: str, body: bytes) -> UpstreamResponse:
        """POST a JSON body and read the whole answer (bounded)."""
        try:
            async with self.session.post(self._url(path), data=body, headers=self._headers) as response:
                if response.content_length is not None and response.content_length > MAX_RESPONSE_BYTES:
                    raise ResponseTooLarge
                data = await response.content.read(MAX_RESPONSE_BYTES + 1)
                if len(data) > MAX_RESPONSE_BYTES:
                    raise ResponseTooLarge
                return UpstreamResponse(response.status, data)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise UpstreamUnreachable(type(exc).__name__) from None

    @contextlib.asynccontextmanager
    async def stream(self, path: str, body: bytes) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST and hand back the response while its body streams in. Leaving the block before
        the end closes the connection (the engine aborts the request)."""
        try:
            response = await self.session.post(self._url(path), data=body, headers=self._headers)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise UpstreamUnreachable(type(exc).__name__) from None
        try:
            yield response
        finally:
            if response.content.at_eof():
                response.release()
            else:
                response.close()

    async def get(self, path: str) -> UpstreamResponse:
        try:
            async with self.session.get(
                self._url(path), headers=self._headers, timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
            ) as response:
                return UpstreamResponse(response.status, await response.content.read(1024 * 1024))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
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
