"""The engine behind the gateway: where it is, and the pooled HTTP client that talks to it.

Only this module does upstream I/O. Requests carry the engine's own key and nothing from the
client's headers. Closing a streamed response closes its TCP connection, which is how vLLM and
SGLang learn that a request was abandoned (they abort it and free the GPU).

Two read bounds besides the callers' overall time limits:
- a stream fails when the engine sends nothing for `idle_timeout_s` (IDLE_TIMEOUT_S by default):
  the response breaks off with ConnectionFailed, as when the engine drops the connection, so
  what streamed is paid, and the connection is closed so the engine aborts the request. Time
  the gateway itself is not reading (a slow client) does not count. An engine streams every
  token as it comes, so silence that long is a stalled engine, or a request queued behind that
  many minutes of others;
- a whole (non-streamed) answer, which the engine sends only when it has finished, fails after
  `read_timeout_s` without a byte.

Besides completions it asks the engine two things, for the `max_tokens` rules (shaping.py):
- its context length: `max_model_len` in `/v1/models` (vLLM and SGLang), unless the launch
  already said (`UpstreamConfig.max_model_len`, from the planner); asked once, then kept;
- the exact prompt length of a request: vLLM's `/tokenize` renders the same chat template with
  the same messages and tools and counts the tokens. An engine without it (404) is not asked
  again, and the gateway keeps to its byte bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from r1nest.gateway.health import FAILURES_TO_ACT
from r1nest.gateway.health import watch_health as watch_engine_health
from r1nest.gateway.http1 import ConnectionFailed, Pool, Response
from r1nest.gateway.shaping import TEMPLATE_FIELDS
from r1nest.gateway.sse import encode

if TYPE_CHECKING:
    from r1nest.gateway.state import EngineState

MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a whole (non-streamed) answer larger than this is refused
CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 300.0  # a stream with no byte from the engine for this long has failed
HEALTH_TIMEOUT_S = 5.0
TOKENIZE_TIMEOUT_S = 10.0
MAX_TOKENIZE_ANSWER_BYTES = 64 * 1024 * 1024  # vLLM lists the token ids too

log = logging.getLogger("r1nest.gateway.upstream")


@dataclass(frozen=True)
class UpstreamConfig:
    url: str  # base URL of the engine, e.g. http://127.0.0.1:8100
    api_key: str | None = field(default=None, repr=False)
    served_model: str = "deepseek-r1"
    max_model_len: int | None = None  # the engine's context, when the launch knows it


class UpstreamUnreachable(Exception):
    """The engine could not be reached or broke the connection."""


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    body: bytes


class Upstream:
    """A connection pool to the engine. `start()` inside the event loop, `close()` at shutdown."""

    def __init__(
        self, config: UpstreamConfig, *, read_timeout_s: float, idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_connections: int = 1024,
    ) -> None:
        self.config = config
        self._read_timeout_s = read_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._max_connections = max_connections
        headers = b"Content-Type: application/json\r\nAccept-Encoding: identity\r\n"
        if config.api_key:
            headers += b"Authorization: Bearer " + config.api_key.encode("latin-1") + b"\r\n"
        self._headers = headers
        self._pool: Pool | None = None
        self._context_tokens: int | None = config.max_model_len
        self._can_tokenize = True

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
        """POST a JSON body and read the whole answer (bounded in size, and in time without a byte)."""
        try:
            async with await self.pool.request("POST", path, body, idle_timeout_s=self._read_timeout_s) as response:
                return UpstreamResponse(response.status, await response.read(MAX_RESPONSE_BYTES))
        except ConnectionFailed as exc:
            raise UpstreamUnreachable(str(exc)) from None

    @contextlib.asynccontextmanager
    async def stream(self, path: str, body: bytes) -> AsyncIterator[Response]:
        """POST and hand back the response while its body streams in (`iter_chunks()`). Leaving
        the block before the end closes the connection (the engine aborts the request). No byte
        from the engine for `idle_timeout_s`, headers or body: ConnectionFailed from the response
        (as a dropped connection), or UpstreamUnreachable before the headers."""
        try:
            response = await self.pool.request("POST", path, body, idle_timeout_s=self._idle_timeout_s)
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

    async def context_tokens(self) -> int | None:
        """The engine's context length (max_model_len), or None while it cannot be learnt."""
        if self._context_tokens is None:
            try:
                answer = await self.get("/v1/models")
                models = json.loads(answer.body)["data"] if answer.status == 200 else []
                lengths = [m.get("max_model_len") for m in models if m.get("id") == self.config.served_model]
                length = (lengths or [m.get("max_model_len") for m in models])[0]
            except (UpstreamUnreachable, ValueError, KeyError, IndexError, TypeError, AttributeError):
                return None
            if isinstance(length, int) and not isinstance(length, bool) and length > 0:
                self._context_tokens = length
        return self._context_tokens

    @property
    def can_tokenize(self) -> bool:
        """Whether the engine's /tokenize counts prompts (until it showed that it does not)."""
        return self._can_tokenize

    async def count_prompt_tokens(self, body: dict[str, Any], *, chat: bool) -> int | None:
        """The exact prompt length of a completion body as the engine will render it, or None
        when the engine cannot say (no /tokenize, a failure, more than one prompt)."""
        if not self._can_tokenize:
            return None
        request: dict[str, Any] = {"model": body.get("model")}
        if chat:
            request["messages"] = body["messages"]
            request.update((name, body[name]) for name in TEMPLATE_FIELDS if name in body)
        elif isinstance(body.get("prompt"), str):
            request["prompt"] = body["prompt"]
        else:
            return None
        try:
            async with asyncio.timeout(TOKENIZE_TIMEOUT_S):
                async with await self.pool.request("POST", "/tokenize", encode(request)) as response:
                    status, answer = response.status, await response.read(MAX_TOKENIZE_ANSWER_BYTES)
        except (ConnectionFailed, TimeoutError) as exc:
            log.warning("the engine's /tokenize did not answer (%s); using the byte bound", type(exc).__name__)
            return None
        try:
            count = json.loads(answer)["count"] if status == 200 else None
        except (ValueError, KeyError, TypeError):
            count = None
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            return count
        if status in (200, 404, 405, 422):  # no such route, or not one that renders chat templates
            log.warning("the engine's /tokenize does not count this request (status %d): "
                        "prompt lengths use the byte bound from now on", status)
            self._can_tokenize = False
        elif status != 400:  # a 400 is the request's fault: the completion will say why
            log.warning("the engine's /tokenize answered %d; using the byte bound", status)
        return None

    async def healthy(self) -> bool:
        try:
            return (await self.get("/health")).status == 200
        except UpstreamUnreachable:
            return False


async def watch_health(upstream: Upstream, state: EngineState, *, interval_s: float = 2.0,
                       failures_to_down: int = FAILURES_TO_ACT) -> None:
    """Keep `state` in step with the engine's /health until cancelled (for `r1nest gateway`)."""
    await watch_engine_health(upstream.healthy, state, interval_s=interval_s, failures_to_act=failures_to_down)
