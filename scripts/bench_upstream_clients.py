#!/usr/bin/env python3
"""Upstream HTTP client candidates side by side: the gateway's own `http1` client, httpcore's
async connection pool and aiohttp's ClientSession, against the fake engine in its own process.

    .venv/bin/python scripts/bench_upstream_clients.py [--rounds 7] [--json]
    .venv/bin/python scripts/bench_upstream_clients.py --gateway [--rounds 5] [--json]

Clients (default): one process (uvloop, as the gateway runs) holds all three clients, each used
the way `gateway/upstream.py` uses its pool: the engine key header, a bounded whole-body read,
a streamed body read chunk by chunk, the response closed at the end, a read-idle timeout
(IDLE_TIMEOUT_S) and keep-alive expiry (KEEPALIVE_EXPIRY_S) set. In rounds that alternate
the clients (the order rotates every round), it measures for each:

  whole    --requests sequential non-streamed chat completions (max_tokens 16):
           this process's CPU per request (`time.process_time()`) and requests/s
  whole16  the same with --concurrency requests in flight
  stream   --streams streamed chat answers (--stream-tokens tokens, usage on every chunk as the
           gateway asks the engine), --stream-concurrency at a time: CPU per SSE event received
           and events/s

and prints the medians over the rounds and each client's ratio to `http1`.

--gateway: the end-to-end view. It starts the fake engine, then one gateway per client (the
in-memory ledger, as `scripts/bench_gateway.py`'s "gateway, memory ledger", with
`gateway.upstream.Upstream` given that client's pool; nothing in the gateway changes otherwise)
and a separate aiohttp load generator; per round and gateway (order rotating): non-streamed
requests with --concurrency in flight and streams of --gateway-stream-tokens with
--stream-concurrency in flight, each for --seconds; req/s, chunks/s and the gateway process's
CPU (/proc) per request and per relayed chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, AsyncIterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gateway import (  # noqa: E402
    ADMIN_KEY, ENGINE_KEY, MODEL, cpu_seconds, create_key, free_port, saturate_chat, wait_http,
)

CLIENTS = ("http1", "httpcore", "aiohttp")
LIMIT = 64 * 1024 * 1024
IDLE_TIMEOUT_S = 300.0
KEEPALIVE_EXPIRY_S = 4.0


# The candidates, each behind the interface of http1.Pool: request(method, path, body) -> a
# response with status, read(limit), iter_chunks(), used as an async context manager that
# closes the connection unless the body was read to its end. ----------------------------------

def _failed(message: str) -> Exception:
    from r1nest.gateway.http1 import ConnectionFailed

    return ConnectionFailed(message)


class _Http1Pool:
    def __init__(self, url: str, key: str, max_connections: int) -> None:
        from r1nest.gateway.http1 import Pool

        self.pool = Pool(url, max_connections=max_connections, connect_timeout_s=10.0, keepalive_expiry_s=KEEPALIVE_EXPIRY_S)
        self.pool.extra_headers = (b"Content-Type: application/json\r\nAccept-Encoding: identity\r\n"
                                   b"Authorization: Bearer " + key.encode() + b"\r\n")

    async def request(self, method: str, path: str, body: bytes = b"", *, idle_timeout_s: float | None = IDLE_TIMEOUT_S) -> Any:
        return await self.pool.request(method, path, body, idle_timeout_s=idle_timeout_s)

    async def close(self) -> None:
        await self.pool.close()


class _HttpcoreResponse:
    __slots__ = ("_response", "status", "_done")

    def __init__(self, response: Any) -> None:
        self._response = response
        self.status = response.status
        self._done = False

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        import httpcore

        try:
            async for chunk in self._response.stream:
                yield chunk
        except (httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError) as exc:
            raise _failed(type(exc).__name__) from None
        self._done = True

    async def read(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if size > limit:
                raise _failed("upstream response too large")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        await self._response.aclose()  # closes the connection unless the body was read to its end

    async def __aenter__(self) -> "_HttpcoreResponse":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _HttpcorePool:
    def __init__(self, url: str, key: str, max_connections: int) -> None:
        import httpcore

        self.httpcore = httpcore
        self.pool = httpcore.AsyncConnectionPool(max_connections=max_connections, keepalive_expiry=KEEPALIVE_EXPIRY_S)
        self.url = url.rstrip("/").encode()
        self.headers = [(b"Host", url.split("://", 1)[1].split("/", 1)[0].encode()), (b"Content-Type", b"application/json"),
                        (b"Accept-Encoding", b"identity"), (b"Authorization", b"Bearer " + key.encode())]
        self.extensions: dict[float | None, dict] = {}

    async def request(self, method: str, path: str, body: bytes = b"", *, idle_timeout_s: float | None = IDLE_TIMEOUT_S) -> _HttpcoreResponse:
        httpcore = self.httpcore
        extensions = self.extensions.get(idle_timeout_s)
        if extensions is None:
            extensions = self.extensions[idle_timeout_s] = {
                "timeout": {"connect": 10.0, "read": idle_timeout_s, "write": idle_timeout_s, "pool": None}}
        request = httpcore.Request(
            method.encode(), self.url + path.encode(), headers=self.headers + [(b"Content-Length", str(len(body)).encode())],
            content=body, extensions=extensions,
        )
        try:
            return _HttpcoreResponse(await self.pool.handle_async_request(request))
        except (httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError) as exc:
            raise _failed(type(exc).__name__) from None

    async def close(self) -> None:
        await self.pool.aclose()


class _AiohttpResponse:
    __slots__ = ("_response", "status")

    def __init__(self, response: Any) -> None:
        self._response = response
        self.status = response.status

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        import aiohttp

        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _failed(type(exc).__name__) from None

    async def read(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if size > limit:
                raise _failed("upstream response too large")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()  # the connection, so the engine aborts

    async def __aenter__(self) -> "_AiohttpResponse":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _AiohttpPool:
    def __init__(self, url: str, key: str, max_connections: int) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        self.url = url.rstrip("/")
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=KEEPALIVE_EXPIRY_S),
            timeout=aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=IDLE_TIMEOUT_S),  # per request below
            headers={"Content-Type": "application/json", "Accept-Encoding": "identity", "Authorization": f"Bearer {key}"},
            auto_decompress=False, skip_auto_headers=("User-Agent",),
        )
        self.timeouts: dict[float | None, Any] = {}

    async def request(self, method: str, path: str, body: bytes = b"", *, idle_timeout_s: float | None = IDLE_TIMEOUT_S) -> _AiohttpResponse:
        timeout = self.timeouts.get(idle_timeout_s)
        if timeout is None:
            timeout = self.timeouts[idle_timeout_s] = self.aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=idle_timeout_s)
        try:
            return _AiohttpResponse(await self.session.request(method, self.url + path, data=body, timeout=timeout))
        except (self.aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _failed(type(exc).__name__) from None

    async def close(self) -> None:
        await self.session.close()


POOLS = {"http1": _Http1Pool, "httpcore": _HttpcorePool, "aiohttp": _AiohttpPool}


# client-side benchmark -------------------------------------------------------------------------

WHOLE = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 16}).encode()


def _stream_body(tokens: int) -> bytes:
    return json.dumps({
        "model": MODEL, "messages": [{"role": "user", "content": "Count."}], "max_tokens": tokens, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }).encode()


async def _whole(pool: Any) -> None:
    async with await pool.request("POST", "/v1/chat/completions", WHOLE) as response:
        body = await response.read(LIMIT)
        assert response.status == 200 and body.startswith(b"{"), (response.status, body[:200])


async def _stream(pool: Any, body: bytes) -> int:
    """SSE events received (a blank line ends each)."""
    events, newline = 0, False
    async with await pool.request("POST", "/v1/chat/completions", body) as response:
        assert response.status == 200, response.status
        async for data in response.iter_chunks():
            events += data.count(b"\n\n") + (newline and data[:1] == b"\n")
            newline = data[-1:] == b"\n"
    return events


async def _measure(coro_factory: Any, total: int, concurrency: int) -> tuple[float, float, int]:
    """(CPU seconds of this process, wall seconds, units) for `total` calls, `concurrency` at a time."""
    remaining = total
    units = 0

    async def worker() -> None:
        nonlocal remaining, units
        while remaining > 0:
            remaining -= 1
            done = await coro_factory()
            units += done or 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - cpu, time.perf_counter() - wall, units


async def _clients(args: argparse.Namespace, url: str) -> dict[str, Any]:
    pools = {name: POOLS[name](url, ENGINE_KEY, 1024) for name in args.clients}
    stream_body = _stream_body(args.stream_tokens)
    for pool in pools.values():  # warm-up; also checks each client reads the whole stream
        for _ in range(50):
            await _whole(pool)
        events = [await _stream(pool, stream_body) for _ in range(5)]
        assert len(set(events)) == 1 and events[0] >= args.stream_tokens, events
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in pools}
    names = list(pools)
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in order:
            pool, figures = pools[name], runs[name]
            cpu, wall, n = await _measure(functools.partial(_whole, pool), args.requests, 1)
            figures.setdefault("whole_cpu_us_per_request", []).append(1e6 * cpu / n)
            figures.setdefault("whole_rps", []).append(n / wall)
            cpu, wall, n = await _measure(functools.partial(_whole, pool), args.requests, args.concurrency)
            figures.setdefault("whole16_cpu_us_per_request", []).append(1e6 * cpu / n)
            figures.setdefault("whole16_rps", []).append(n / wall)
            cpu, wall, n = await _measure(
                functools.partial(_stream, pool, stream_body), args.streams, args.stream_concurrency
            )
            figures.setdefault("stream_cpu_us_per_event", []).append(1e6 * cpu / n)
            figures.setdefault("stream_events_per_s", []).append(n / wall)
    for pool in pools.values():
        await pool.close()
    return runs


def clients_main(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = subprocess.Popen(
        [sys.executable, "-m", "r1nest.testing.fake_engine", "--port", str(port), "--served-model", MODEL, "--api-key", ENGINE_KEY,
         "--reasoning-tokens", str(args.stream_tokens // 2), "--content-tokens", str(args.stream_tokens - args.stream_tokens // 2)],
    )
    try:
        wait_http(url + "/health")
        load_start = os.getloadavg()[0]
        runs = _run(_clients(args, url))
    finally:
        engine.send_signal(signal.SIGTERM)
        engine.wait(20)
    return {"mode": "clients", "runs": runs, "load_average_1m": [load_start, os.getloadavg()[0]]}


# gateway-level benchmark -----------------------------------------------------------------------

def serve_gateway(args: argparse.Namespace) -> None:
    """A memory-ledger gateway whose Upstream talks through the named client."""
    import r1nest.gateway.app as app_module
    from r1nest.gateway.app import create_app
    from r1nest.gateway.cli import configure_logging, uvicorn_server
    from r1nest.gateway.upstream import Upstream, UpstreamConfig
    from r1nest.ledger.memory import MemoryStore
    from r1nest.settings import load_settings

    make_pool = POOLS[args.serve_gateway]

    class ClientUpstream(Upstream):
        async def start(self) -> None:
            if self._pool is None:
                self._pool = make_pool(self.config.url, self.config.api_key or "", self._max_connections)

        @contextlib.asynccontextmanager
        async def stream(self, path: str, body: bytes) -> AsyncIterator[Any]:
            from r1nest.gateway.http1 import ConnectionFailed
            from r1nest.gateway.upstream import UpstreamUnreachable

            try:
                response = await self.pool.request("POST", path, body)
            except ConnectionFailed as exc:
                raise UpstreamUnreachable(str(exc)) from None
            async with response:
                yield response

    if args.serve_gateway != "http1":
        app_module.Upstream = ClientUpstream  # type: ignore[misc]
    settings = load_settings(host="127.0.0.1", port=args.port, data_dir=tempfile.mkdtemp(prefix="r1nest-bench-"))
    configure_logging(settings.log_level)
    app = create_app(settings=settings, store=MemoryStore(), upstream=UpstreamConfig(args.engine, ENGINE_KEY, MODEL))
    uvicorn_server(app, settings).run()


async def _gateway_load(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    targets = dict(zip(args.clients, zip(args.gateway_urls.split(","), args.key.split(","), map(int, args.pids.split(",")))))
    short = WHOLE
    streamed = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Count."}],
                           "max_tokens": args.gateway_stream_tokens, "stream": True}).encode()
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in targets}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json"}) as session:

        async def saturate(base: str, key: str, body: bytes, concurrency: int, *, stream: bool) -> tuple[int, int, float]:
            headers = {"Authorization": f"Bearer {key}"}
            return await saturate_chat(session, base, headers, body, concurrency, args.seconds, stream=stream)

        for base, key, _ in targets.values():  # warm-up
            await saturate(base, key, short, 4, stream=False)
        names = list(targets)
        for round_ in range(args.rounds):
            order = names[round_ % len(names):] + names[: round_ % len(names)]
            for name in order:
                base, key, pid = targets[name]
                figures = runs[name]
                cpu = cpu_seconds(pid)
                done, _, wall = await saturate(base, key, short, args.concurrency, stream=False)
                figures.setdefault("rps", []).append(done / wall)
                figures.setdefault("gateway_cpu_us_per_request", []).append(1e6 * (cpu_seconds(pid) - cpu) / done)
                cpu = cpu_seconds(pid)
                _, chunks, wall = await saturate(base, key, streamed, args.stream_concurrency, stream=True)
                figures.setdefault("chunks_per_s", []).append(chunks / wall)
                figures.setdefault("gateway_cpu_us_per_chunk", []).append(1e6 * (cpu_seconds(pid) - cpu) / chunks)
    return runs


def gateway_main(args: argparse.Namespace) -> dict[str, Any]:
    python = sys.executable
    engine_port = free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("R1NEST_")}
    env.update(R1NEST_UPSTREAM_KEY=ENGINE_KEY, R1NEST_ADMIN_KEY=ADMIN_KEY, R1NEST_LOG_LEVEL="warning")
    tokens = args.gateway_stream_tokens
    children: list[subprocess.Popen] = []
    try:
        children.append(subprocess.Popen(
            [python, "-m", "r1nest.testing.fake_engine", "--port", str(engine_port), "--served-model", MODEL,
             "--api-key", ENGINE_KEY, "--reasoning-tokens", str(tokens // 2), "--content-tokens", str(tokens - tokens // 2)],
            env=env,
        ))
        wait_http(engine_url + "/health")
        urls = []
        for name in args.clients:
            port = free_port()
            children.append(subprocess.Popen(
                [python, __file__, "--serve-gateway", name, "--port", str(port), "--engine", engine_url], env=env))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_http(url + "/health")
        keys = [create_key(url) for url in urls]
        load_start = os.getloadavg()[0]
        load = subprocess.run(
            [python, __file__, "--gateway-load", "--clients", ",".join(args.clients), "--gateway-urls", ",".join(urls),
             "--key", ",".join(keys), "--pids", ",".join(str(child.pid) for child in children[1:]),
             "--rounds", str(args.rounds), "--seconds", str(args.seconds), "--concurrency", str(args.concurrency),
             "--stream-concurrency", str(args.stream_concurrency), "--gateway-stream-tokens", str(tokens)],
            env=env, capture_output=True, text=True, timeout=3600,
        )
        if load.returncode != 0:
            raise SystemExit(f"load generator failed:\n{load.stderr[-3000:]}")
        runs = json.loads(load.stdout.strip().splitlines()[-1])
    finally:
        for child in reversed(children):
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
    return {"mode": "gateway", "runs": runs, "load_average_1m": [load_start, os.getloadavg()[0]]}


# report --------------------------------------------------------------------------------------

def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    runs = result["runs"]
    medians = {name: {metric: statistics.median(values) for metric, values in figures.items()} for name, figures in runs.items()}
    base = medians.get("http1")
    ratios = {}
    if base:
        ratios = {name: {metric: value / base[metric] for metric, value in figures.items()} for name, figures in medians.items()}
    return {**result, "medians": medians, "ratios_to_http1": ratios, "cpus": os.cpu_count()}


def report(summary: dict[str, Any]) -> None:
    medians, ratios = summary["medians"], summary["ratios_to_http1"]
    names = list(medians)
    print(f"{summary['mode']}: {summary['cpus']} CPUs, 1-min load average {summary['load_average_1m'][0]:.1f} -> "
          f"{summary['load_average_1m'][1]:.1f}; medians over {len(next(iter(next(iter(summary['runs'].values())).values())))} rounds"
          " (ratio to http1)")
    print(f"{'':28}" + "".join(f"{name:>22}" for name in names))
    for metric in medians[names[0]]:
        cells = []
        for name in names:
            value = medians[name][metric]
            ratio = ratios.get(name, {}).get(metric)
            cells.append(f"{value:,.1f}" + (f" ({ratio:.2f}x)" if ratio is not None else ""))
        print(f"{metric:28}" + "".join(f"{cell:>22}" for cell in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated, from: " + ", ".join(CLIENTS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=500, help="non-streamed requests per client, phase and round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--streams", type=int, default=60, help="streams per client and round")
    parser.add_argument("--stream-concurrency", type=int, default=4)
    parser.add_argument("--stream-tokens", type=int, default=64)
    parser.add_argument("--gateway", action="store_true", help="the end-to-end benchmark: one gateway per client")
    parser.add_argument("--seconds", type=float, default=3.0, help="--gateway: length of each load run")
    parser.add_argument("--gateway-stream-tokens", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    parser.add_argument("--serve-gateway", help=argparse.SUPPRESS)
    parser.add_argument("--gateway-load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gateway-urls", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--pids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.clients = [name for name in args.clients.split(",") if name]
    if unknown := set(args.clients) - set(CLIENTS):
        raise SystemExit(f"unknown clients: {', '.join(sorted(unknown))}")
    if args.serve_gateway:
        return serve_gateway(args)
    if args.gateway_load:
        print(json.dumps(_run(_gateway_load(args))))
        return
    summary = summarize(gateway_main(args) if args.gateway else clients_main(args))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        report(summary)


if __name__ == "__main__":
    main()
