#!/usr/bin/env python3
"""Gateway overhead benchmark: the gateway in front of the fake engine vs the fake engine alone.

    .venv/bin/python scripts/bench_gateway.py [--seconds 5] [--json]

One run starts four processes: the fake engine (zero token delay); `r1nest gateway` in front of it
(one uvicorn worker, the default durable SQLite ledger in a temporary data dir); the same gateway
with the in-memory ledger ("gw+memory": the gateway's own cost, without ledger fsyncs); and a
separate load generator (aiohttp on uvloop). It measures, for each gateway and for direct calls
to the engine:

  latency     sequential short non-streaming chat requests (max_tokens 16): p50, p99;
              added latency = gateway - direct
  throughput  non-streaming req/s with --concurrency requests in flight
  streaming   streamed chunks/s with --stream-concurrency streams of --stream-tokens tokens

Targets (issue 2): added p50 <= 1 ms, >= 1000 req/s on one worker, streaming >= 95% of direct.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ENGINE_KEY = "bench-engine-key-0123456789"
ADMIN_KEY = "r1nadmin-0b0b0b0b0b0b-" + "B" * 43
MODEL = "deepseek-r1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout_s: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer 200 within {timeout_s} s")


# load generator (runs in its own process) --------------------------------------------------------

async def _load(args: argparse.Namespace) -> dict:
    import aiohttp

    targets = {"direct": (args.engine, {"Authorization": f"Bearer {ENGINE_KEY}"})}
    for name, url, key in zip(("gateway", "gateway_memory"), args.gateway.split(","), args.key.split(",")):
        targets[name] = (url, {"Authorization": f"Bearer {key}"})
    short = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 16}).encode()
    streamed = json.dumps({
        "model": MODEL, "messages": [{"role": "user", "content": "Count."}], "max_tokens": args.stream_tokens,
        "stream": True,
    }).encode()
    results: dict = {}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json"}) as session:

        async def call(base: str, headers: dict, body: bytes) -> None:
            async with session.post(base + "/v1/chat/completions", data=body, headers=headers) as response:
                await response.read()
                assert response.status == 200, response.status

        # warm-up
        for base, headers in targets.values():
            for _ in range(200):
                await call(base, headers, short)

        # latency: sequential, alternating blocks so drift hits both sides alike
        latencies: dict[str, list[float]] = {name: [] for name in targets}
        block = 100
        for _ in range(args.latency_requests // block):
            for name, (base, headers) in targets.items():
                for _ in range(block):
                    started = time.perf_counter()
                    await call(base, headers, short)
                    latencies[name].append(time.perf_counter() - started)
        for name, values in latencies.items():
            values.sort()
            results[f"{name}_latency_p50_ms"] = 1000 * values[len(values) // 2]
            results[f"{name}_latency_p99_ms"] = 1000 * values[int(len(values) * 0.99)]

        # throughput: N requests in flight for a fixed time
        import asyncio

        async def saturate(base: str, headers: dict, body: bytes, concurrency: int, seconds: float, *, stream: bool) -> tuple[int, int]:
            deadline = time.perf_counter() + seconds
            done = chunks = 0

            async def worker() -> None:
                nonlocal done, chunks
                while time.perf_counter() < deadline:
                    async with session.post(base + "/v1/chat/completions", data=body, headers=headers) as response:
                        assert response.status == 200, response.status
                        if stream:
                            async for line in response.content:
                                if line.startswith(b"data: {"):
                                    chunks += 1
                        else:
                            await response.read()
                    done += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            return int(done / elapsed), int(chunks / elapsed)

        pids = dict(zip(("direct", "gateway", "gateway_memory"), map(int, args.pids.split(","))))
        for _ in range(args.repeats):
            for name, (base, headers) in targets.items():
                cpu_s, started = cpu_seconds(pids[name]), time.perf_counter()
                rps, _ = await saturate(base, headers, short, args.concurrency, args.seconds, stream=False)
                results.setdefault(f"{name}_rps", []).append(rps)
                results.setdefault(f"{name}_cpu_us_per_request", []).append(
                    1e6 * (cpu_seconds(pids[name]) - cpu_s) / (rps * (time.perf_counter() - started)))
                cpu_s, started = cpu_seconds(pids[name]), time.perf_counter()
                _, cps = await saturate(base, headers, streamed, args.stream_concurrency, args.seconds, stream=True)
                results.setdefault(f"{name}_chunks_per_s", []).append(cps)
                results.setdefault(f"{name}_cpu_us_per_chunk", []).append(
                    1e6 * (cpu_seconds(pids[name]) - cpu_s) / (cps * (time.perf_counter() - started)))
    for name in [n for n in results if n.endswith(("_rps", "_chunks_per_s", "_per_request", "_per_chunk"))]:
        results[name + "_runs"] = results[name]
        results[name] = statistics.median(results[name])
    return results


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_main(args: argparse.Namespace) -> None:
    import asyncio

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(_load(args))))


# orchestration -----------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per side (median reported)")
    parser.add_argument("--latency-requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stream-concurrency", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    parser.add_argument("--pin", action="store_true",
                        help="engine and load generator on CPU 0, the gateways on CPU 1 (the gateway gets a core)")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-memory-gateway", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pids", help=argparse.SUPPRESS)
    parser.add_argument("--gateway", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        return load_main(args)
    if args.serve_memory_gateway:
        return serve_memory_gateway(args)

    python = sys.executable
    engine_port, gateway_port, memory_port = free_port(), free_port(), free_port()
    engine_url, gateway_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{gateway_port}"
    memory_url = f"http://127.0.0.1:{memory_port}"
    children: list[subprocess.Popen] = []

    def on_cpu(cpu: int):  # noqa: ANN202 - a preexec_fn
        if not args.pin:
            return None
        return lambda: os.sched_setaffinity(0, {cpu})

    with tempfile.TemporaryDirectory(prefix="r1nest-bench-") as data_dir:
        env = {k: v for k, v in os.environ.items() if not k.startswith("R1NEST_")}
        env.update(R1NEST_UPSTREAM_KEY=ENGINE_KEY, R1NEST_ADMIN_KEY=ADMIN_KEY, R1NEST_LOG_LEVEL="warning")
        try:
            children.append(subprocess.Popen(
                [python, "-m", "r1nest.testing.fake_engine", "--port", str(engine_port), "--served-model", MODEL,
                 "--api-key", ENGINE_KEY, "--reasoning-tokens", str(args.stream_tokens // 2),
                 "--content-tokens", str(args.stream_tokens - args.stream_tokens // 2)],
                env=env, preexec_fn=on_cpu(0),
            ))
            wait_http(engine_url + "/health")
            children.append(subprocess.Popen(
                [python, "-m", "r1nest", "gateway", "--upstream", engine_url, "--served-model", MODEL,
                 "--host", "127.0.0.1", "--port", str(gateway_port), "--data-dir", data_dir],
                env=env, preexec_fn=on_cpu(1),
            ))
            wait_http(gateway_url + "/health")
            children.append(subprocess.Popen(
                [python, __file__, "--serve-memory-gateway", "--port", str(memory_port), "--engine", engine_url], env=env,
                preexec_fn=on_cpu(1),
            ))
            wait_http(memory_url + "/health")
            keys = ",".join(create_key(url) for url in (gateway_url, memory_url))
            load = subprocess.run(
                [python, __file__, "--load", "--gateway", f"{gateway_url},{memory_url}", "--engine", engine_url, "--key", keys,
                 "--pids", ",".join(str(child.pid) for child in children),
                 "--seconds", str(args.seconds), "--repeats", str(args.repeats),
                 "--latency-requests", str(args.latency_requests), "--concurrency", str(args.concurrency),
                 "--stream-concurrency", str(args.stream_concurrency), "--stream-tokens", str(args.stream_tokens)],
                env=env, capture_output=True, text=True, timeout=1200, preexec_fn=on_cpu(0),
            )
            if load.returncode != 0:
                raise SystemExit(f"load generator failed:\n{load.stderr[-3000:]}")
            figures = json.loads(load.stdout.strip().splitlines()[-1])
        finally:
            for child in reversed(children):
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(20)
                except subprocess.TimeoutExpired:
                    child.kill()
    for side in ("gateway", "gateway_memory"):
        figures[f"{side}_added_latency_p50_ms"] = figures[f"{side}_latency_p50_ms"] - figures["direct_latency_p50_ms"]
        figures[f"{side}_added_latency_p99_ms"] = figures[f"{side}_latency_p99_ms"] - figures["direct_latency_p99_ms"]
        figures[f"{side}_rps_ratio"] = figures[f"{side}_rps"] / figures["direct_rps"]
        figures[f"{side}_streaming_ratio"] = figures[f"{side}_chunks_per_s"] / figures["direct_chunks_per_s"]
    figures["cpus"] = os.cpu_count()
    figures["pinned"] = args.pin
    figures["load_average_1m"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {figures['load_average_1m']:.1f} at the end")
    print(f"{'':24}{'direct':>10}{'gateway':>10}{'(ratio)':>9}{'gw+memory':>11}{'(ratio)':>9}")
    rows = [("latency p50 (ms)", "latency_p50_ms", "%.3f"), ("latency p99 (ms)", "latency_p99_ms", "%.3f"),
            ("non-streaming req/s", "rps", "%.0f"), ("streamed chunks/s", "chunks_per_s", "%.0f"),
            ("CPU us per request", "cpu_us_per_request", "%.0f"), ("CPU us per chunk", "cpu_us_per_chunk", "%.1f")]
    for label, name, fmt in rows:
        cells = [fmt % figures[f"direct_{name}"]]
        for side in ("gateway", "gateway_memory"):
            value = figures[f"{side}_{name}"]
            if name.startswith("cpu"):
                extra = ""  # each process's own CPU: the gateway's is its whole cost
            elif name.startswith("latency"):
                extra = "+%.2f" % (value - figures[f"direct_{name}"])
            else:
                extra = "%.2f" % (value / figures[f"direct_{name}"])
            cells += [fmt % value, extra]
        print(f"{label:24}{cells[0]:>10}{cells[1]:>10}{cells[2]:>9}{cells[3]:>11}{cells[4]:>9}")


def serve_memory_gateway(args: argparse.Namespace) -> None:
    """The same gateway with the in-memory ledger: what the gateway itself costs, without fsyncs."""
    from r1nest.gateway.app import create_app
    from r1nest.gateway.cli import configure_logging, uvicorn_server
    from r1nest.gateway.upstream import UpstreamConfig
    from r1nest.ledger.memory import MemoryStore
    from r1nest.settings import load_settings

    settings = load_settings(host="127.0.0.1", port=args.port, data_dir=tempfile.mkdtemp(prefix="r1nest-bench-"))
    configure_logging(settings.log_level)
    app = create_app(settings=settings, store=MemoryStore(), upstream=UpstreamConfig(args.engine, ENGINE_KEY, MODEL))
    uvicorn_server(app, settings).run()


def create_key(gateway_url: str) -> str:
    import urllib.request

    request = urllib.request.Request(
        gateway_url + "/admin/keys", data=json.dumps({"name": "bench", "credits": 2**53 - 1}).encode(),
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["key"]


if __name__ == "__main__":
    main()
