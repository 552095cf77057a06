"""A fake OpenAI-compatible engine that answers like vLLM, on a real loopback HTTP server.

It speaks the parts of vLLM's HTTP API that r1nest relies on, byte for byte where it matters:
`/v1/chat/completions` and `/v1/completions` (streaming or not), `/v1/models` (with
`max_model_len`), `/tokenize` (`count`, with the fake tokenizer below), `/health` and `/metrics`
(`vllm:num_requests_running`). It holds requests to its context as vLLM does: `max_tokens` over
the context, a prompt that fills it, or prompt + `max_tokens` over it get vLLM's 400 (vLLM 0.32
itself lets the last case through and stops at the context; the fake is stricter, so a gateway
that sends such a request is caught). A streamed chat answer is what vLLM with
`--reasoning-parser deepseek_r1` sends: a role chunk, `reasoning` deltas, `content` deltas, a
finish chunk, a usage chunk when `stream_options.include_usage` is set (usage on every chunk with
`continuous_usage_stats`), then `data: [DONE]`. One delta is one token.

Tests steer it through `Behavior` (slow tokens, fail before or during the stream, drop the
connection, stall mid-stream, omit or inflate usage, require an API key) and read what it saw:
every request with its headers (`requests`) and every stream the client abandoned (`aborts`).

    with FakeEngine(Behavior(token_delay_s=0.01)) as engine:
        url = engine.url          # http://127.0.0.1:<port>
        ...
        assert engine.aborts[0].completion_tokens_sent == 3

Runs in its own thread and event loop (`start()` / context manager), or as a process:
`python -m r1nest.testing.fake_engine --port 8100` (what the gateway benchmark uses).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from r1nest.ports import ENGINE_PORT

ABSURD_TOKENS = 10**12
_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@dataclass(frozen=True)
class Behavior:
    reasoning_tokens: int = 3
    content_tokens: int = 4
    token_delay_s: float = 0.0  # before each streamed token
    fail_before_stream: bool = False  # answer 500 instead of a completion
    fail_after_chunks: int | None = None  # vLLM-style error event + [DONE] after N token chunks
    drop_after_chunks: int | None = None  # close the TCP connection after N token chunks
    hold_after_chunks: int | None = None  # stall after N token chunks: nothing more for hold_s
    hold_s: float = 30.0  # (a stream that stays open, whatever the scheduler, until the test acts)
    omit_usage: bool = False  # no usage anywhere, even when asked
    absurd_usage: bool = False  # usage reports ABSURD_TOKENS completion tokens
    cached_tokens: int = 0  # prompt tokens reported as read from the prefix cache (at most the prompt)
    api_key: str | None = None  # when set, requests need `Authorization: Bearer <api_key>`
    served_model: str = "fake-r1"
    context_length: int = 4096  # max_model_len
    tokenize: bool = True  # offer /tokenize (SGLang's /tokenize renders no chat template: False)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # raw path as received, query included
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Abort:
    """A stream whose client went away before it ended."""

    path: str
    chunks_sent: int  # token chunks written before the disconnect was seen
    completion_tokens_sent: int


@dataclass
class _Counters:
    running: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    aborts: list[Abort] = field(default_factory=list)


def prompt_token_count(body: dict[str, Any]) -> int:
    """The fake tokenizer: one token per whitespace-separated word, plus 2 per chat message.

    Never more than the UTF-8 byte length of the text plus a small template overhead, as with
    a real byte-level BPE tokenizer.
    """
    if "messages" in body:
        total = 0
        for message in body["messages"]:
            content = message.get("content") or ""
            if isinstance(content, list):
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            total += len(str(content).split()) + 2
        return total
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return sum(len(p) if isinstance(p, list) else len(str(p).split()) for p in prompt) or 1
    return len(str(prompt).split()) or 1


def token_texts(behavior: Behavior, max_tokens: int | None) -> tuple[list[str], list[str], str]:
    """(reasoning tokens, content tokens, finish_reason) the fake model produces."""
    reasoning = [f"think{i} " for i in range(behavior.reasoning_tokens)]
    content = [f"word{i} " for i in range(behavior.content_tokens)]
    if max_tokens is not None and len(reasoning) + len(content) > max_tokens:
        keep = max(max_tokens, 0)
        reasoning, content = reasoning[:keep], content[: max(keep - len(reasoning), 0)]
        return reasoning, content, "length"
    return reasoning, content, "stop"


class _EngineApp:
    def __init__(self, engine: "FakeEngine") -> None:
        self.engine = engine

    @property
    def behavior(self) -> Behavior:
        return self.engine.behavior

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.engine._record(
            RecordedRequest(request.method, request.raw_path, dict(request.headers), body)
        )
        route = (request.method, request.path)
        if route == ("GET", "/health"):
            return web.Response(status=200)
        if route == ("GET", "/metrics"):
            return web.Response(text=self._metrics(), content_type="text/plain")
        if not self._authorized(request):
            return _error(401, "Unauthorized", "authentication_error")
        if route == ("GET", "/v1/models"):
            return web.json_response(self._models())
        if route == ("POST", "/tokenize") and self.behavior.tokenize:
            try:
                count = prompt_token_count(json.loads(body))
            except (ValueError, TypeError, AttributeError):
                return _error(400, "invalid tokenize request", "BadRequestError")
            return web.json_response({"count": count, "max_model_len": self.behavior.context_length,
                                      "tokens": list(range(count)), "token_strs": None})
        if route in {("POST", "/v1/chat/completions"), ("POST", "/v1/completions")}:
            try:
                payload = json.loads(body)
            except ValueError:
                return _error(400, "invalid JSON", "BadRequestError")
            if payload.get("model") not in (None, self.behavior.served_model):
                return _error(404, f"The model `{payload.get('model')}` does not exist.", "NotFoundError")
            return await self._completion(request, payload, chat=request.path.endswith("chat/completions"))
        if route == ("POST", "/tokenize"):
            return _error(404, "Not Found", "NotFoundError")
        # Engine-only routes (/pause, /invocations, ...) answer 200 here, so a gateway
        # that forwarded one would be caught by the test that looks at `requests`.
        return web.json_response({"engine_only_route": request.path})

    def _authorized(self, request: web.Request) -> bool:
        key = self.behavior.api_key
        return key is None or request.headers.get("Authorization") == f"Bearer {key}"

    def _models(self) -> dict[str, Any]:
        model = self.behavior.served_model
        return {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "vllm", "root": model, "parent": None, "max_model_len": self.behavior.context_length}],
        }

    def _metrics(self) -> str:
        model = self.behavior.served_model
        return (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="{model}"}} {float(self.engine._counters.running)}\n'
        )

    async def _completion(self, request: web.Request, payload: dict[str, Any], *, chat: bool) -> web.StreamResponse:
        behavior = self.behavior
        if behavior.fail_before_stream:
            return _error(500, "engine failure (fake)", "InternalServerError")
        refusal = _context_refusal(payload, behavior.context_length)
        if refusal is not None:
            return _error(400, refusal, "BadRequestError")
        if payload.get("max_tokens") is None:  # vLLM's default: the rest of the context
            payload = {**payload, "max_tokens": behavior.context_length - prompt_token_count(payload)}
        self.engine._counters.running += 1
        try:
            if payload.get("stream"):
                return await self._stream(request, payload, chat=chat, behavior=behavior)
            return await self._whole(payload, chat=chat, behavior=behavior)
        finally:
            self.engine._counters.running -= 1

    def _usage(self, behavior: Behavior, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        if behavior.absurd_usage:
            completion_tokens = ABSURD_TOKENS
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }
        if behavior.cached_tokens:  # vLLM with --enable-prompt-tokens-details
            usage["prompt_tokens_details"] = {"cached_tokens": min(behavior.cached_tokens, prompt_tokens)}
        return usage

    async def _whole(self, payload: dict[str, Any], *, chat: bool, behavior: Behavior) -> web.Response:
        reasoning, content, finish = token_texts(behavior, payload.get("max_tokens"))
        if behavior.token_delay_s:
            await asyncio.sleep(behavior.token_delay_s * (len(reasoning) + len(content)))
        created = int(time.time())
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(content),
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning": "".join(reasoning) or None,
                },
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
        else:
            choice = {"index": 0, "text": "".join(reasoning + content), "logprobs": None, "finish_reason": finish, "stop_reason": None}
        body: dict[str, Any] = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": behavior.served_model,
            "choices": [choice],
        }
        if not behavior.omit_usage:
            body["usage"] = self._usage(behavior, prompt_token_count(payload), len(reasoning) + len(content))
        return web.Response(body=_DUMPS(body).encode(), content_type="application/json")

    async def _stream(self, request: web.Request, payload: dict[str, Any], *, chat: bool, behavior: Behavior) -> web.StreamResponse:
        options = payload.get("stream_options") or {}
        include_usage = bool(options.get("include_usage")) and not behavior.omit_usage
        continuous = include_usage and bool(options.get("continuous_usage_stats"))
        prompt_tokens = prompt_token_count(payload)
        reasoning, content, finish = token_texts(behavior, payload.get("max_tokens"))
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        head = (
            f'{{"id":"{request_id}","object":"{"chat.completion.chunk" if chat else "text_completion"}",'
            f'"created":{created},"model":{_DUMPS(behavior.served_model)},"choices":['
        )

        response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        sent = 0

        def usage_suffix(completion_tokens: int) -> str:
            if not continuous:
                return ""
            return ',"usage":' + _DUMPS(self._usage(behavior, prompt_tokens, completion_tokens))

        async def emit(choice: str, completion_tokens: int) -> None:
            await response.write(f"data: {head}{choice}]{usage_suffix(completion_tokens)}}}\n\n".encode())

        try:
            if chat:
                await emit('{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}', 0)
            tokens = [("reasoning", t) for t in reasoning] + [("content", t) for t in content]
            for kind, text in tokens:
                if behavior.fail_after_chunks is not None and sent >= behavior.fail_after_chunks:
                    error = {"error": {"message": "engine failure mid-stream (fake)", "type": "InternalServerError", "param": None, "code": 500}}
                    await response.write(f"data: {_DUMPS(error)}\n\ndata: [DONE]\n\n".encode())
                    return response
                if behavior.drop_after_chunks is not None and sent >= behavior.drop_after_chunks:
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if behavior.hold_after_chunks is not None and sent == behavior.hold_after_chunks:
                    await asyncio.sleep(behavior.hold_s)  # cancelled when the client goes away
                if behavior.token_delay_s:
                    await asyncio.sleep(behavior.token_delay_s)
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError
                if chat:
                    delta = f'{{"{kind}":{_DUMPS(text)}}}'
                    await emit(f'{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":null}}', sent + 1)
                else:
                    await emit(f'{{"index":0,"text":{_DUMPS(text)},"logprobs":null,"finish_reason":null,"stop_reason":null}}', sent + 1)
                sent += 1
            if chat:
                await emit(f'{{"index":0,"delta":{{"content":""}},"logprobs":null,"finish_reason":"{finish}","stop_reason":null}}', sent)
            else:
                await emit(f'{{"index":0,"text":"","logprobs":null,"finish_reason":"{finish}","stop_reason":null}}', sent)
            if include_usage:
                usage = _DUMPS(self._usage(behavior, prompt_tokens, sent))
                await response.write(f'data: {head}],"usage":{usage}}}\n\n'.encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.engine._record_abort(Abort(request.path, sent, sent))
            raise
        return response


def _context_refusal(payload: dict[str, Any], context_length: int) -> str | None:
    """vLLM's answer to a request that does not fit its context, or None when it fits."""
    max_tokens = payload.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > context_length:
        return (f"max_tokens={max_tokens} cannot be greater than max_model_len={context_length}. "
                "Please request fewer output tokens. (parameter=max_tokens, value={max_tokens})")
    prompt_tokens = prompt_token_count(payload)
    if prompt_tokens >= context_length:
        return (f"This model's maximum context length is {context_length} tokens. However, your prompt "
                f"contains at least {prompt_tokens} input tokens, which exceeds this limit even without "
                "any output tokens. Please reduce the length of the input prompt.")
    if isinstance(max_tokens, int) and prompt_tokens + max_tokens > context_length:
        return (f"This model's maximum context length is {context_length} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.")
    return None


def _error(status: int, message: str, error_type: str) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    return web.Response(status=status, body=_DUMPS(body).encode(), content_type="application/json")


class FakeEngine:
    """The fake engine's server. `start()` runs it on 127.0.0.1 in a daemon thread."""

    def __init__(self, behavior: Behavior | None = None, *, port: int = 0, **behavior_fields: Any) -> None:
        self.behavior = replace(behavior or Behavior(), **behavior_fields)
        self._port = port
        self._counters = _Counters()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._start_error: BaseException | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("fake engine not started")
        return f"http://127.0.0.1:{self.port}"

    def configure(self, **fields: Any) -> None:
        self.behavior = replace(self.behavior, **fields)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._counters.requests)

    @property
    def aborts(self) -> list[Abort]:
        with self._lock:
            return list(self._counters.aborts)

    @property
    def running(self) -> int:
        return self._counters.running

    def clear(self) -> None:
        with self._lock:
            self._counters.requests.clear()
            self._counters.aborts.clear()

    def wait_for_aborts(self, count: int, timeout_s: float = 5.0) -> list[Abort]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            aborts = self.aborts
            if len(aborts) >= count:
                return aborts
            time.sleep(0.01)
        return self.aborts

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            if len(self._counters.requests) < 100_000:  # bounded, even under a benchmark
                self._counters.requests.append(request)

    def _record_abort(self, abort: Abort) -> None:
        with self._lock:
            self._counters.aborts.append(abort)

    async def serve(self, *, host: str = "127.0.0.1", record: bool = True) -> None:
        """Serve on the current event loop until `stop()`."""
        if not record:
            self._record = lambda request: None  # type: ignore[method-assign]
        self._stopped = asyncio.Event()
        self._runner = web.AppRunner(_EngineApp(self).build(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, self._port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            await self._runner.cleanup()

    def start(self) -> "FakeEngine":
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self.serve())
            except BaseException as exc:  # surfaced to start()'s caller
                self._start_error = exc
                self._ready.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake engine did not start within 10 s")
        if self._start_error is not None:
            raise RuntimeError(f"fake engine failed to start: {self._start_error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> "FakeEngine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake vLLM-compatible engine (tests, benchmarks).")
    parser.add_argument("--port", type=int, default=ENGINE_PORT)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-model", default="fake-r1")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--reasoning-tokens", type=int, default=3)
    parser.add_argument("--content-tokens", type=int, default=4)
    parser.add_argument("--token-delay-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    engine = FakeEngine(
        Behavior(
            served_model=args.served_model,
            api_key=args.api_key,
            reasoning_tokens=args.reasoning_tokens,
            content_tokens=args.content_tokens,
            token_delay_s=args.token_delay_s,
        ),
        port=args.port,
    )
    run: Callable[[Coroutine[Any, Any, None]], None]
    try:
        from uvloop import run as uvloop_run
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop_run
    try:
        run(engine.serve(host=args.host, record=False))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
