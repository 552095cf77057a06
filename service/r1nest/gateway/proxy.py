"""Relay a completion between the engine and the client, as a whole answer or an SSE stream.

Relaying only: this module never touches credits. It returns what the relay produced as a
metering `Outcome`, which the grant settles (gateway/metering.py), and the app writes what
depends on the settlement (the balance header, a stream's final usage chunk).

Streams are forwarded event by event as they arrive. The gateway always asks the engine for
usage on every chunk (see shaping.py), so a stream that ends early is paid exactly:

- normal end: the final usage chunk's numbers (reported);
- client gone, engine failure, drain deadline, time limit: the last usage the engine reported
  (prompt tokens + completion tokens so far); an engine that reports no usage at all is paid one
  completion token per streamed delta and no prompt tokens (estimated);
- nothing reached the client yet (failure before the first token): nothing.

A whole (non-streamed) answer without usage is paid as if each UTF-8 byte of generated text
were one token (an upper bound, estimated); that is logged as an engine fault.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

from r1nest.errors import ApiError, BadRequest, ContextLengthExceeded, PayloadTooLarge, Unavailable, UpstreamError
from r1nest.gateway import sse
from r1nest.gateway.exchange import SSE_HEADERS, Exchange
from r1nest.gateway.interrupts import Interruptible
from r1nest.gateway.metering import NOTHING, Outcome
from r1nest.gateway.http1 import ConnectionFailed, Response
from r1nest.gateway.upstream import Upstream, UpstreamUnreachable

log = logging.getLogger("r1nest.gateway.proxy")

MAX_ENGINE_MESSAGE_CHARS = 500
# vLLM ("maximum context length", "cannot be greater than max_model_len") and SGLang ("longer
# than the model's context length") refusing a request that does not fit the context.
_CONTEXT_MESSAGE = re.compile(r"context length|max_model_len|context window", re.IGNORECASE)


def engine_error(status: int, body: bytes) -> ApiError:
    """The client's answer to an engine error status: the engine's own message for requests it
    refused (400/422), a generic 502 otherwise (no engine internals leak)."""
    message = _engine_message(body)
    if status in (400, 422):
        if message and _CONTEXT_MESSAGE.search(message):
            return ContextLengthExceeded(message)
        return BadRequest(message or "The engine refused the request.")
    if status == 413:
        return PayloadTooLarge(message or "The request is too large for the engine.")
    if status in (429, 503):
        return Unavailable("The engine is busy; retry shortly.", headers={"Retry-After": "5"})
    return UpstreamError(f"The engine failed to answer (status {status}).")


def _engine_message(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else data.get("message")
        if isinstance(message, str) and message:
            return message[:MAX_ENGINE_MESSAGE_CHARS]
    return None


def _generated_bytes(answer: dict[str, Any]) -> int:
    total = 0
    for choice in answer.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if not isinstance(message, dict):
            message = {}
        # the engine's own answer: vLLM names the reasoning `reasoning`, older builds `reasoning_content`
        for text in (choice.get("text"), message.get("content"), message.get("reasoning"), message.get("reasoning_content")):
            if isinstance(text, str):
                total += len(text.encode("utf-8"))
        if message.get("tool_calls"):
            total += len(sse.encode(message["tool_calls"]))
    return total


@dataclass(frozen=True, slots=True)
class WholeAnswer:
    body: bytes  # for the client: reasoning renamed
    outcome: Outcome


async def relay_whole(upstream: Upstream, path: str, body: bytes, *, timeout_s: float) -> WholeAnswer:
    """POST `body` and read the whole answer; an ApiError when there is none to deliver."""
    try:
        async with asyncio.timeout(timeout_s):
            response = await upstream.post(path, body)
    except (UpstreamUnreachable, TimeoutError):
        raise UpstreamError("The engine could not be reached or did not answer in time.") from None
    if response.status != 200:
        raise engine_error(response.status, response.body)
    try:
        answer = json.loads(response.body)
        if not isinstance(answer, dict):
            raise ValueError
    except ValueError:
        raise UpstreamError("The engine sent an answer that is not a JSON object.") from None
    out = sse.rename_reasoning_bytes(response.body)
    if out is None:  # both names present: the JSON way
        for choice in answer.get("choices") or []:
            if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
                sse.rename_reasoning(choice["message"])
        out = sse.encode(answer)
    usage = sse.usage_of(answer)
    if usage is None:
        log.warning("engine answer without usage; charging generated bytes")
        return WholeAnswer(out, Outcome("estimated", 0, _generated_bytes(answer)))
    return WholeAnswer(out, Outcome("reported", usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens))


class StreamTracker:
    """What has flowed through a stream so far; turns engine events into client events."""

    __slots__ = ("keep_usage", "tokens", "last_usage", "final_usage", "usage_payload", "done", "error", "broken",
                 "first", "relayed", "keepalives")

    def __init__(self, *, keep_usage: bool) -> None:
        self.keep_usage = keep_usage
        self.first: bytes | None = None  # the first chunk, to name a usage chunk the engine did not send
        self.tokens = 0  # generated tokens counted in deltas since the last usage report
        self.last_usage: sse.Usage | None = None
        self.final_usage: sse.Usage | None = None
        self.usage_payload: bytes | None = None
        self.done = False  # the engine sent [DONE]
        self.error = False  # the engine sent an error event
        self.broken = False  # the stream ended without [DONE], or was unreadable
        self.relayed = False  # a chunk with generated text went to the client
        self.keepalives = 0  # keep-alive comments sent while the engine was quiet

    def take(self, payload: bytes) -> bytes | None:
        if payload == sse.DONE:
            self.done = True
            return None
        if self.first is None:
            self.first = payload
        info = sse.rewrite_chunk(payload, keep_usage=self.keep_usage)
        if info.is_error:
            self.error = True
            return None
        if info.usage is not None:
            self.last_usage, self.tokens = info.usage, 0
        self.tokens += info.tokens
        if info.is_usage_chunk:
            self.final_usage, self.usage_payload = info.usage, payload
            return None
        if info.payload is None:
            return None
        if not self.relayed:
            self.relayed = sse.carries_text(info.payload)
        return self.emit(info.payload)

    def emit(self, payload: bytes) -> bytes | None:
        """The client's event(s) for one rewritten chunk (another API's stream overrides it)."""
        return sse.event(payload)

    def usage(self) -> sse.Usage:
        """The tokens to pay for what has streamed."""
        if self.done and self.final_usage is not None:
            return self.final_usage
        last = self.last_usage
        if last is None:
            return sse.Usage(0, self.tokens)
        return sse.Usage(last.prompt_tokens, last.completion_tokens + self.tokens, last.cached_tokens)

    @property
    def complete(self) -> bool:
        return self.done and not self.error and not self.broken


KEEPALIVE_EVENT = b": keep-alive\n\n"  # an SSE comment: clients and the SDKs skip it
KEEPALIVE_TICKS = 4  # quiet-stream checks per keep-alive period


async def _pump(response: Response, exchange: Exchange, tracker: StreamTracker, keepalive_s: float) -> None:
    splitter = sse.EventSplitter()
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    tick_s = keepalive_s / KEEPALIVE_TICKS if keepalive_s > 0 else None
    try:
        async for data in response.iter_chunks(tick_s=tick_s):
            if not data:  # a tick: the engine was quiet
                if loop.time() - sent_at >= keepalive_s:
                    await exchange.body(KEEPALIVE_EVENT, more=True)
                    tracker.keepalives += 1
                    sent_at = loop.time()
                continue
            out = [event for event in map(tracker.take, splitter.feed(data)) if event is not None]
            if out:
                await exchange.body(out[0] if len(out) == 1 else b"".join(out), more=True)
                sent_at = loop.time()
            if tracker.done or tracker.error:
                return
    except (ConnectionFailed, sse.StreamFormatError):
        pass
    tracker.broken = True


Ending = Literal["complete", "client", "drain", "timeout", "engine"]


@dataclass(slots=True)
class StreamEnd:
    """How a relayed stream ended, and what it produced."""

    ending: Ending
    started: bool  # the client got the response head (and maybe events)
    tracker: StreamTracker

    @property
    def outcome(self) -> Outcome:
        tracker = self.tracker
        usage = tracker.usage()
        if not tracker.complete and (usage.completion_tokens == 0 or not tracker.relayed):
            # nothing reached the client: a failure before the first token is free, whatever
            # usage the engine reported before it failed
            return NOTHING
        reported = tracker.last_usage is not None or (tracker.final_usage is not None and tracker.complete)
        return Outcome("reported" if reported else "estimated", usage.prompt_tokens, usage.completion_tokens,
                       usage.cached_tokens)


async def relay_stream(
    exchange: Exchange, upstream: Upstream, path: str, body: bytes, *, keep_usage: bool,
    interruptible: Interruptible, timeout_s: float, keepalive_s: float = 0.0,
    tracker: StreamTracker | None = None,
) -> StreamEnd:
    """Stream the engine's answer to the client (the head and every event, not the tail: see
    `finish_stream`). An ApiError when the engine refused or could not be reached before anything
    was sent to the client. `keepalive_s` > 0: an SSE comment whenever the stream has been quiet
    that long (a request queued or thinking in the engine), so that proxies and clients with
    read timeouts keep the connection."""
    tracker = tracker or StreamTracker(keep_usage=keep_usage)
    timed_out = False
    try:
        async with interruptible:
            try:
                async with asyncio.timeout(timeout_s):
                    async with upstream.stream(path, body) as response:
                        if response.status != 200:
                            try:
                                detail = await response.read(64 * 1024)
                            except ConnectionFailed:
                                detail = b""
                            raise engine_error(response.status, detail)
                        await exchange.start(200, SSE_HEADERS)
                        await _pump(response, exchange, tracker, keepalive_s)
            except TimeoutError:
                timed_out = True
    except UpstreamUnreachable:
        raise UpstreamError("The engine could not be reached.") from None
    if interruptible.reason is not None:
        ending: Ending = interruptible.reason
    elif timed_out:
        if not exchange.started:
            raise UpstreamError("The engine did not answer in time.")
        ending = "timeout"
    else:
        ending = "complete" if tracker.complete else "engine"
    end = StreamEnd(ending, exchange.started, tracker)
    if ending != "complete" or tracker.final_usage is None:
        outcome = end.outcome
        log.info("stream ended early or without usage; paying what streamed reason=%s tokens=%d+%d",
                 ending, outcome.prompt_tokens, outcome.completion_tokens)
    return end


def error_event(message: str) -> bytes:
    return sse.event(sse.encode(UpstreamError(message).body()))


ENDING_MESSAGES = {
    "drain": "The server is shutting down; the answer was cut short.",
    "timeout": "The answer exceeded the stream time limit.",
    "engine": "The engine failed while streaming the answer.",
}


async def finish_stream(exchange: Exchange, end: StreamEnd, *, balance: int, client_usage: bool) -> None:
    """The tail of a stream whose client is still there: the final usage chunk (when asked for)
    with the balance after settlement, or an error event; then `[DONE]`."""
    tracker = end.tracker
    if end.ending == "complete":
        if client_usage:
            outcome = end.outcome
            usage_payload = tracker.usage_payload or sse.usage_chunk(
                tracker.first, outcome.prompt_tokens, outcome.completion_tokens)
            await exchange.body(sse.event(sse.with_remaining_credits(usage_payload, balance)), more=True)
    else:
        await exchange.body(error_event(ENDING_MESSAGES[end.ending]), more=True)
    await exchange.body(sse.DONE_EVENT)


def error_tail(exc: ApiError) -> bytes:
    """How a stream that already started ends on a fault: an error event, then `[DONE]`."""
    return sse.event(sse.encode(exc.body())) + sse.DONE_EVENT
