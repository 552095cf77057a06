#!/usr/bin/env python3
"""Gateway overhead benchmark: the gateway in front of the fake engine vs the fake engine alone.

    .venv/bin/python scripts/bench_gateway.py [--seconds 5] [--json] [--baseline DIR]

One run starts four processes: the fake engine (zero token delay); `r1nest gateway` in front of it
(one uvicorn worker, the default durable SQLite ledger in a temporary data dir); the same gateway
with the in-memory ledger ("gw+memory": the gateway's own cost, without ledger fsyncs); and a
separate load generator (aiohttp on uvloop). It measures, for each gateway and for direct calls
to the engine:

  latency     sequential short non-streaming chat requests (max_tokens 16): p50, p99;
              added latency = gateway - direct
  throughput  non-streaming req/s with --concurrency requests in flight
  streaming   streamed chunks/s with --stream-concurrency streams of --stream-tokens tokens

Every side is measured in alternating blocks (latency: blocks of 100 requests; throughput and
streaming: one run per side per repeat), the order reversed every other round, so load swings on
a shared box hit every side alike.

--baseline DIR (a source checkout of another version, e.g. a `git worktree` of an older commit)
adds two more gateways running the code in DIR/service (PYTHONPATH=DIR/service; each child checks
that it imported r1nest from there): `baseline` (SQLite ledger) and `baseline_memory`. They are
measured in the same alternating blocks, and the table shows before (DIR) and after (this tree)
side by side: after/before ratios for req/s, chunks/s and CPU, and after - before for latency.

Targets (issue 2): added p50 <= 1 ms, >= 1000 req/s on one worker, streaming >= 95% of direct.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

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


async def saturate_chat(
    session: "aiohttp.ClientSession", base: str, headers: dict, body: bytes, concurrency: int, seconds: float, *, stream: bool
) -> tuple[int, int, float]:
    """`concurrency` aiohttp workers posting `body` to base/v1/chat/completions for `seconds`:
    (answers, SSE data chunks, elapsed seconds)."""
    import asyncio

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
    return done, chunks, time.perf_counter() - started

async def _load(args: argparse.Namespace) -> dict:
    import aiohttp

    targets = {"direct": (args.engine, {"Authorization": f"Bearer {ENGINE_KEY}"})}
    for name, url, key in zip(args.sides.split(","), args.gateway.split(","), args.key.split(",")):
        targets[name] = (url, {"Authorization": f"Bearer {key}"})
    short = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 16}).encode()
    streamed = json.dumps({
        "model": MODEL, "messages": [{"role": "user", "content": "Count."}], "max_tokens": args.stream_tokens,
        "stream": True,
    }).encode()
    results: dict = {}

    def rounds(count: int):  # noqa: ANN202 - the sides in order, reversed every other round
        names = list(targets)
        for index in range(count):
            yield names if index % 2 == 0 else names[::-1]

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

        # latency: sequential, alternating blocks so drift hits every side alike
        latencies: dict[str, list[float]] = {name: [] for name in targets}
        block = 100
        for names in rounds(args.latency_requests // block):
            for name in names:
                base, headers = targets[name]
                for _ in range(block):
                    started = time.perf_counter()
                    await call(base, headers, short)
                    latencies[name].append(time.perf_counter() - started)
        for name, values in latencies.items():
            values.sort()
            results[f"{name}_latency_p50_ms"] = 1000 * values[len(values) // 2]
            results[f"{name}_latency_p99_ms"] = 1000 * values[int(len(values) * 0.99)]

        # throughput: N requests in flight for a fixed time
        async def saturate(base: str, headers: dict, body: bytes, concurrency: int, seconds: float, *, stream: bool) -> tuple[int, int]:
            done, chunks, elapsed = await saturate_chat(session, base, headers, body, concurrency, seconds, stream=stream)
            return int(done / elapsed), int(chunks / elapsed)

        pids = dict(zip(["direct", *args.sides.split(",")], map(int, args.pids.split(","))))
        for names in rounds(args.repeats):
            for name in names:
                base, headers = targets[name]
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

# `python -m r1nest gateway ...`, but the child first says (and asserts) where r1nest came from
_SQLITE_GATEWAY = """\
import os, runpy, sys
import r1nest
where, expected = os.path.realpath(r1nest.__file__), os.path.realpath(os.environ["BENCH_EXPECT_R1NEST"])
print(f"bench: {os.environ['BENCH_SIDE']} (pid {os.getpid()}) runs r1nest from {where}", file=sys.stderr, flush=True)
assert where.startswith(expected + os.sep), f"r1nest from {where}, expected under {expected}"
sys.argv[0] = "r1nest"
runpy.run_module("r1nest", run_name="__main__", alter_sys=True)
"""


def r1nest_root() -> str:
    """The directory this interpreter imports r1nest from (without any PYTHONPATH change)."""
    spec = importlib.util.find_spec("r1nest")
    if spec is None or not spec.origin:
        raise SystemExit("r1nest is not importable here")
    return os.path.dirname(os.path.dirname(os.path.realpath(spec.origin)))


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
    parser.add_argument("--baseline", metavar="DIR",
                        help="a source checkout of another version: its gateways run (PYTHONPATH=DIR/service) "
                             "and are measured side by side as 'before'")
    parser.add_argument("--profile", metavar="DIR",
                        help="run the memory-ledger gateways under cProfile; stats to DIR/<side>.prof "
                             "(slows them: figures from such a run are not comparable)")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-memory-gateway", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--expect-r1nest", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pids", help=argparse.SUPPRESS)
    parser.add_argument("--sides", default="gateway,gateway_memory", help=argparse.SUPPRESS)
    parser.add_argument("--gateway", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        return load_main(args)
    if args.serve_memory_gateway:
        return serve_memory_gateway(args)

    python = sys.executable
    here = r1nest_root()
    trees = {"gateway": here}
    if args.baseline:
        baseline = os.path.realpath(os.path.join(args.baseline, "service"))
        if not os.path.isfile(os.path.join(baseline, "r1nest", "__init__.py")):
            raise SystemExit(f"--baseline {args.baseline}: no r1nest package under {baseline}")
        if baseline == here:
            raise SystemExit(f"--baseline {args.baseline} is the tree being measured")
        trees["baseline"] = baseline
    # before and after next to each other, so that each pair shares the same stretch of load
    sides = ["gateway", "gateway_memory"] if not args.baseline else [
        "baseline", "gateway", "baseline_memory", "gateway_memory"]
    engine_port = free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    urls = {side: f"http://127.0.0.1:{free_port()}" for side in sides}
    children: dict[str, subprocess.Popen] = {}

    def on_cpu(cpu: int):  # noqa: ANN202 - a preexec_fn
        if not args.pin:
            return None
        return lambda: os.sched_setaffinity(0, {cpu})

    with tempfile.TemporaryDirectory(prefix="r1nest-bench-") as data_dir:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("R1NEST_", "BENCH_"))}
        env.update(R1NEST_UPSTREAM_KEY=ENGINE_KEY, R1NEST_ADMIN_KEY=ADMIN_KEY, R1NEST_LOG_LEVEL="warning")

        def tree_env(tree: str, side: str) -> dict:
            child_env = dict(env, BENCH_EXPECT_R1NEST=trees[tree], BENCH_SIDE=side)
            if tree == "baseline":
                child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [trees[tree], env.get("PYTHONPATH")]))
            return child_env

        try:
            children["direct"] = subprocess.Popen(
                [python, "-m", "r1nest.testing.fake_engine", "--port", str(engine_port), "--served-model", MODEL,
                 "--api-key", ENGINE_KEY, "--reasoning-tokens", str(args.stream_tokens // 2),
                 "--content-tokens", str(args.stream_tokens - args.stream_tokens // 2)],
                env=env, preexec_fn=on_cpu(0),
            )
            wait_http(engine_url + "/health")
            for tree in trees:
                port = urls[tree].rsplit(":", 1)[1]
                children[tree] = subprocess.Popen(
                    [python, "-c", _SQLITE_GATEWAY, "gateway", "--upstream", engine_url, "--served-model", MODEL,
                     "--host", "127.0.0.1", "--port", port, "--data-dir", os.path.join(data_dir, tree)],
                    env=tree_env(tree, tree), preexec_fn=on_cpu(1),
                )
                wait_http(urls[tree] + "/health")
                memory = f"{tree}_memory"
                command = [python, __file__, "--serve-memory-gateway", "--side", memory, "--expect-r1nest", trees[tree],
                           "--port", urls[memory].rsplit(":", 1)[1], "--engine", engine_url]
                if args.profile:
                    command += ["--profile", os.path.abspath(args.profile)]
                children[memory] = subprocess.Popen(command, env=tree_env(tree, memory), preexec_fn=on_cpu(1))
                wait_http(urls[memory] + "/health")
            keys = ",".join(create_key(urls[side]) for side in sides)
            started_at, load_at_start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.getloadavg()[0]
            load = subprocess.run(
                [python, __file__, "--load", "--sides", ",".join(sides), "--gateway", ",".join(urls[s] for s in sides),
                 "--engine", engine_url, "--key", keys,
                 "--pids", ",".join(str(children[name].pid) for name in ["direct", *sides]),
                 "--seconds", str(args.seconds), "--repeats", str(args.repeats),
                 "--latency-requests", str(args.latency_requests), "--concurrency", str(args.concurrency),
                 "--stream-concurrency", str(args.stream_concurrency), "--stream-tokens", str(args.stream_tokens)],
                env=env, capture_output=True, text=True, timeout=3600, preexec_fn=on_cpu(0),
            )
            if load.returncode != 0:
                raise SystemExit(f"load generator failed:\n{load.stderr[-3000:]}")
            figures = json.loads(load.stdout.strip().splitlines()[-1])
        finally:
            for child in reversed(list(children.values())):
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(20)
                except subprocess.TimeoutExpired:
                    child.kill()
    for side in sides:
        figures[f"{side}_added_latency_p50_ms"] = figures[f"{side}_latency_p50_ms"] - figures["direct_latency_p50_ms"]
        figures[f"{side}_added_latency_p99_ms"] = figures[f"{side}_latency_p99_ms"] - figures["direct_latency_p99_ms"]
        figures[f"{side}_rps_ratio"] = figures[f"{side}_rps"] / figures["direct_rps"]
        figures[f"{side}_streaming_ratio"] = figures[f"{side}_chunks_per_s"] / figures["direct_chunks_per_s"]
    if args.baseline:
        for after, before in (("gateway", "baseline"), ("gateway_memory", "baseline_memory")):
            figures[f"{after}_latency_p50_ms_minus_before"] = figures[f"{after}_latency_p50_ms"] - figures[f"{before}_latency_p50_ms"]
            figures[f"{after}_latency_p99_ms_minus_before"] = figures[f"{after}_latency_p99_ms"] - figures[f"{before}_latency_p99_ms"]
            for name in ("rps", "chunks_per_s", "cpu_us_per_request", "cpu_us_per_chunk"):
                figures[f"{after}_{name}_over_before"] = figures[f"{after}_{name}"] / figures[f"{before}_{name}"]
                # each repeat's after / before: the two ran next to each other, under the same load
                pairs = [a / b for a, b in zip(figures[f"{after}_{name}_runs"], figures[f"{before}_{name}_runs"])]
                figures[f"{after}_{name}_over_before_pairs"] = pairs
                figures[f"{after}_{name}_over_before_pairs_median"] = statistics.median(pairs)
        figures["baseline_r1nest"] = trees["baseline"]
    figures["r1nest"] = here
    figures["cpus"] = os.cpu_count()
    figures["pinned"] = args.pin
    figures["started"] = started_at
    figures["load_average_1m_start"] = load_at_start
    figures["load_average_1m"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load_at_start:.1f} at the start, "
          f"{figures['load_average_1m']:.1f} at the end{' (pinned)' if args.pin else ''}")
    rows = [("latency p50 (ms)", "latency_p50_ms", "%.3f"), ("latency p99 (ms)", "latency_p99_ms", "%.3f"),
            ("non-streaming req/s", "rps", "%.0f"), ("streamed chunks/s", "chunks_per_s", "%.0f"),
            ("CPU us per request", "cpu_us_per_request", "%.0f"), ("CPU us per chunk", "cpu_us_per_chunk", "%.1f")]
    if args.baseline:
        return print_before_after(figures, rows, args)
    print(f"{'':24}{'direct':>10}{'gateway':>10}{'(ratio)':>9}{'gw+memory':>11}{'(ratio)':>9}")
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


def print_before_after(figures: dict, rows: list, args: argparse.Namespace) -> None:
    """Before (--baseline) and after (this tree) side by side, per ledger."""
    print(f"before: {figures['baseline_r1nest']}\nafter:  {figures['r1nest']}")
    print("latency: value (added over direct); after/before: after - before in ms for latency, a ratio otherwise")
    header = ["", "direct", "SQLite before", "SQLite after", "after/before", "memory before", "memory after", "after/before"]
    widths = [22, 9, 16, 16, 13, 16, 16, 13]
    print("".join(f"{h:>{w}}" if i else f"{h:{w}}" for i, (h, w) in enumerate(zip(header, widths))))
    for label, name, fmt in rows:
        direct = figures[f"direct_{name}"]
        cells = [label, fmt % direct]
        for before, after in (("baseline", "gateway"), ("baseline_memory", "gateway_memory")):
            b, a = figures[f"{before}_{name}"], figures[f"{after}_{name}"]
            if name.startswith("latency"):
                cells += [f"{fmt % b} (+{b - direct:.2f})", f"{fmt % a} (+{a - direct:.2f})", f"{a - b:+.3f}"]
            else:
                cells += [fmt % b, fmt % a, f"{a / b:.2f}"]
        print("".join(f"{c:>{w}}" if i else f"{c:{w}}" for i, (c, w) in enumerate(zip(cells, widths))))
    for side in ("direct", "baseline", "gateway", "baseline_memory", "gateway_memory"):
        print(f"runs {side:16} req/s {figures[f'{side}_rps_runs']}  chunks/s {figures[f'{side}_chunks_per_s_runs']}")
    for after in ("gateway", "gateway_memory"):
        for name in ("rps", "chunks_per_s", "cpu_us_per_request"):
            pairs = figures[f"{after}_{name}_over_before_pairs"]
            print(f"after/before per repeat, {after} {name}: {', '.join(f'{p:.2f}' for p in pairs)}; "
                  f"median {figures[f'{after}_{name}_over_before_pairs_median']:.3f}")
    for ledger, before, after in (("SQLite", "baseline", "gateway"), ("memory", "baseline_memory", "gateway_memory")):
        added = figures[f"{after}_latency_p50_ms"] - figures[f"{before}_latency_p50_ms"]
        ratio = figures[f"{after}_rps"] / figures[f"{before}_rps"]
        print(f"targets, {ledger} ledger: p50 after - before {added:+.3f} ms (< 0.5: {'met' if added < 0.5 else 'MISSED'}); "
              f"req/s after/before {ratio:.3f} (>= 0.90: {'met' if ratio >= 0.9 else 'MISSED'}) "
              f"at concurrency {args.concurrency}")


def serve_memory_gateway(args: argparse.Namespace) -> None:
    """The same gateway with the in-memory ledger: what the gateway itself costs, without fsyncs."""
    import r1nest

    if args.expect_r1nest:
        where, expected = os.path.realpath(r1nest.__file__), os.path.realpath(args.expect_r1nest)
        print(f"bench: {args.side} (pid {os.getpid()}) runs r1nest from {where}", file=sys.stderr, flush=True)
        assert where.startswith(expected + os.sep), f"r1nest from {where}, expected under {expected}"
    from r1nest.gateway.app import create_app
    from r1nest.gateway.cli import configure_logging, uvicorn_server
    from r1nest.gateway.upstream import UpstreamConfig
    from r1nest.ledger.memory import MemoryStore
    from r1nest.settings import load_settings

    # uvicorn re-raises the exit signal once it has shut down; with this handler that ends run()
    # with SystemExit, so the data dir is removed and a profile written (the default would kill us)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="r1nest-bench-") as data_dir:
        settings = load_settings(host="127.0.0.1", port=args.port, data_dir=data_dir)
        configure_logging(settings.log_level)
        app = create_app(settings=settings, store=MemoryStore(), upstream=UpstreamConfig(args.engine, ENGINE_KEY, MODEL))
        server = uvicorn_server(app, settings)
        if not getattr(args, "profile", None):
            return server.run()
        import cProfile

        profiler = cProfile.Profile()  # wall time (perf_counter, the cheapest timer): profile on a quiet box
        profiler.enable()
        try:
            server.run()
        finally:
            profiler.disable()
            os.makedirs(args.profile, exist_ok=True)
            profiler.dump_stats(os.path.join(args.profile, f"{args.side or 'gateway_memory'}.prof"))


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
