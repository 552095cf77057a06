#!/usr/bin/env python3
"""Anthropic's Messages API two ways, on the real vLLM CPU build: translated by the gateway onto
the metered chat path (what r1nest does) against the engine's own `/v1/messages`, with the plain
chat paths next to them to separate the costs.

    .venv/bin/python scripts/bench_anthropic.py [--rounds 5] [--requests 100] [--streams 32] [--json]

One run writes the tiny Qwen2 model (`r1nest.tinymodel`; Qwen2 because vLLM's CPU build turns
prefix caching and chunked prefill off for MLA models such as the tiny DeepSeek-V3) or takes
--model, starts vLLM's OpenAI server from .venv on it (`--reasoning-parser deepseek_r1`, the
engine key in VLLM_API_KEY), starts `r1nest gateway` in front of it (the default SQLite ledger in
a temporary data dir) and creates a key through POST /admin/keys. It then measures four sides,
from this process (aiohttp on uvloop):

  a  engine_chat        the engine directly, POST /v1/chat/completions
  b  engine_messages    the engine directly, POST /v1/messages (vLLM's own translation)
  c  gateway_chat       the gateway, POST /v1/chat/completions (metered)
  d  gateway_messages   the gateway, POST /v1/messages (metered, translated to a chat completion)

In rounds that alternate the sides (the order rotates every round), each side does:

  whole     --requests sequential non-streamed requests (max_tokens 16): latency, requests/s
  whole4    --requests non-streamed requests, --concurrency in flight: latency, requests/s
  stream    --streams sequential streams (max_tokens --stream-tokens; chat streams ask for
            `stream_options.include_usage`, so both APIs end with the token count): time to the
            first SSE event, to the first event with a token and to the last event; events/s of
            one stream
  stream4   --streams streams, --concurrency in flight: the same times; events/s in all

with the CPU (`/proc/<pid>/stat`, in 10 ms ticks, hence summed over all rounds before dividing) of
the gateway process and of vLLM's API-server process (its front end; the model runs in its
EngineCore child) per request or stream. Every answer is
checked (status 200; a `thinking` block with the model's scripted reasoning and a `text` block
for Messages, `reasoning` and `content` for chat; the requested number of tokens; a stream's
closing event), so a broken path cannot produce a fast number.

It prints the medians over the rounds with their min-max, and the differences taken within each
round (the sides of a round ran next to each other) with their median and min-max:

  translation overhead      d - c
  gateway relay overhead    c - a
  forwarding, estimated     b + (c - a): what forwarding /v1/messages through the same gateway
                            would take, assuming it relays a Messages answer as cheaply as a chat
                            answer; compared with d as d - (b + c - a) = (d - c) - (b - a)

vLLM and the gateway are stopped at the end, on errors and on Ctrl-C (vLLM runs in its own
process group, so its EngineCore goes with it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gateway import ADMIN_KEY, ENGINE_KEY, cpu_seconds, create_key, free_port, wait_http  # noqa: E402

MODEL = "tiny"
SIDES = {  # name -> (label, target, path)
    "engine_chat": ("a", "engine", "/v1/chat/completions"),
    "engine_messages": ("b", "engine", "/v1/messages"),
    "gateway_chat": ("c", "gateway", "/v1/chat/completions"),
    "gateway_messages": ("d", "gateway", "/v1/messages"),
}
WHOLE_TOKENS = 16
PROMPT = [{"role": "user", "content": "Hi there!"}]
ENGINE_START_TIMEOUT_S = 600.0


class BenchError(Exception):
    """A side answered wrongly or a process failed: the run stops, nothing is reported."""


# requests and their checks ----------------------------------------------------------------------

def request_body(side: str, max_tokens: int, *, stream: bool) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "messages": PROMPT, "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
        if not side.endswith("messages"):  # the token count in the last chunk, as Messages has it
            body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _check(condition: bool, side: str, what: str, detail: Any) -> None:
    if not condition:
        raise BenchError(f"{side}: {what}: {str(detail)[:600]}")


def check_answer(side: str, answer: dict[str, Any], max_tokens: int) -> None:
    """A whole answer: the scripted reasoning, then the start of the scripted answer."""
    from r1nest.tinymodel import SCRIPT_CONTENT, SCRIPT_REASONING

    if side.endswith("messages"):
        blocks = answer.get("content") or []
        kinds = [block.get("type") for block in blocks]
        _check(kinds == ["thinking", "text"], side, "not a thinking and a text block", answer)
        thinking, text = blocks[0].get("thinking", ""), blocks[1].get("text", "")
        produced = answer.get("usage", {}).get("output_tokens")
    else:
        message = (answer.get("choices") or [{}])[0].get("message") or {}
        thinking = message.get("reasoning") or message.get("reasoning_content") or ""
        text = message.get("content") or ""
        produced = answer.get("usage", {}).get("completion_tokens")
    _check(thinking.strip() == SCRIPT_REASONING, side, "reasoning is not the model's", answer)
    _check(bool(text.strip()) and SCRIPT_CONTENT.startswith(text.strip()[:len(SCRIPT_CONTENT)]), side, "answer text", answer)
    _check(produced == max_tokens, side, f"{produced} tokens, asked for {max_tokens}", answer)


class StreamCheck:
    """Follows one stream's events: the times of the first event, the first token and the last
    event, and what the answer must contain when it ends."""

    def __init__(self, side: str, max_tokens: int, started: float) -> None:
        self.side, self.max_tokens, self.started = side, max_tokens, started
        self.messages = side.endswith("messages")
        self.events = 0
        self.first_event = self.first_token = self.last_event = 0.0
        self.thinking: list[str] = []
        self.text: list[str] = []
        self.blocks: list[str] = []
        self.types: list[str] = []
        self.produced: int | None = None
        self.done = False

    def event(self, data: bytes, now: float) -> None:
        self.events += 1
        self.last_event = now
        if not self.first_event:
            self.first_event = now
        if data == b"[DONE]":
            self.done = True
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise BenchError(f"{self.side}: an event that is not JSON: {data[:300]!r}") from None
        token = self._tokens(event)
        if token and not self.first_token:
            self.first_token = now

    def _tokens(self, event: dict[str, Any]) -> bool:
        if self.messages:
            kind = event.get("type", "")
            self.types.append(kind)
            if kind == "content_block_start":
                self.blocks.append(event["content_block"]["type"])
            elif kind == "content_block_delta":
                delta = event["delta"]
                (self.thinking if delta["type"] == "thinking_delta" else self.text).append(
                    delta.get("thinking") or delta.get("text") or "")
                return True
            elif kind == "message_delta":
                self.produced = event.get("usage", {}).get("output_tokens")
            elif kind == "message_stop":
                self.done = True
            return False
        if event.get("usage"):
            self.produced = event["usage"].get("completion_tokens")
        if not event.get("choices"):
            return False
        delta = event["choices"][0].get("delta") or {}
        reasoning = delta.get("reasoning") or delta.get("reasoning_content") or ""
        self.thinking.append(reasoning)
        self.text.append(delta.get("content") or "")
        return bool(reasoning or delta.get("content"))

    def finish(self) -> dict[str, float]:
        from r1nest.tinymodel import SCRIPT_REASONING

        side = self.side
        _check(self.done, side, "the stream did not end with its closing event", self.types[-5:])
        _check("".join(self.thinking).strip() == SCRIPT_REASONING, side, "streamed reasoning", "".join(self.thinking))
        _check(bool("".join(self.text).strip()), side, "no streamed answer text", self.types)
        if self.messages:
            _check(self.blocks == ["thinking", "text"], side, "streamed blocks", self.blocks)
            _check(self.types[0] == "message_start" and self.types[-1] == "message_stop", side, "event order", self.types)
        _check(self.produced == self.max_tokens, side, f"{self.produced} tokens, asked for {self.max_tokens}",
               self.types[-3:])
        total = self.last_event - self.started
        return {"first_event_ms": 1e3 * (self.first_event - self.started),
                "first_token_ms": 1e3 * (self.first_token - self.started),
                "last_event_ms": 1e3 * total, "events": self.events}


# the load ---------------------------------------------------------------------------------------

class Sides:
    """One aiohttp session; a side's URL and key; one request or stream at a time, checked."""

    def __init__(self, session: Any, engine_url: str, gateway_url: str, gateway_key: str) -> None:
        self.session = session
        self.targets = {"engine": (engine_url, ENGINE_KEY), "gateway": (gateway_url, gateway_key)}

    def _post(self, side: str, body: bytes) -> Any:
        _, target, path = SIDES[side]
        base, key = self.targets[target]
        return self.session.post(base + path, data=body, headers={"Authorization": f"Bearer {key}"})

    async def whole(self, side: str, body: bytes) -> float:
        """Seconds for one non-streamed answer."""
        started = time.perf_counter()
        async with self._post(side, body) as response:
            data = await response.read()
            elapsed = time.perf_counter() - started
            _check(response.status == 200, side, f"status {response.status}", data)
        check_answer(side, json.loads(data), WHOLE_TOKENS)
        return elapsed

    async def stream(self, side: str, body: bytes, max_tokens: int) -> dict[str, float]:
        started = time.perf_counter()
        check = StreamCheck(side, max_tokens, started)
        async with self._post(side, body) as response:
            if response.status != 200:
                raise BenchError(f"{side}: stream status {response.status}: {(await response.read())[:600]!r}")
            async for line in response.content:
                if line.startswith(b"data:"):
                    check.event(line[5:].strip(), time.perf_counter())
        return check.finish()


async def in_flight(call: Callable[[], Any], total: int, concurrency: int) -> tuple[list[Any], float]:
    """(each call's result, wall seconds) for `total` calls, `concurrency` at a time."""
    remaining = total
    results: list[Any] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            results.append(await call())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - started


async def measure_side(sides: Sides, side: str, args: argparse.Namespace, pids: dict[str, int]) -> dict[str, float]:
    whole = request_body(side, WHOLE_TOKENS, stream=False)
    streamed = request_body(side, args.stream_tokens, stream=True)
    figures: dict[str, float] = {}

    def cpu() -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in pids.items()}

    def cpu_per(before: dict[str, float], phase: str, count: int) -> None:
        """CPU seconds and the count they are for: summed over the rounds before dividing, as
        /proc counts in clock ticks (10 ms), more than one round's phase may spend."""
        after = cpu()
        figures[f"{phase}_count"] = count
        for name in pids:
            figures[f"{phase}_{name}_cpu_s"] = after[name] - before[name]

    for phase, concurrency in (("whole", 1), ("whole4", args.concurrency)):
        before = cpu()
        latencies, wall = await in_flight(lambda: sides.whole(side, whole), args.requests, concurrency)
        cpu_per(before, phase, len(latencies))
        figures[f"{phase}_latency_ms"] = 1e3 * statistics.median(latencies)
        figures[f"{phase}_rps"] = len(latencies) / wall
    for phase, concurrency in (("stream", 1), ("stream4", args.concurrency)):
        before = cpu()
        streams, wall = await in_flight(lambda: sides.stream(side, streamed, args.stream_tokens), args.streams, concurrency)
        cpu_per(before, phase, len(streams))
        for metric in ("first_event_ms", "first_token_ms", "last_event_ms"):
            figures[f"{phase}_{metric}"] = statistics.median(s[metric] for s in streams)
        figures[f"{phase}_events"] = statistics.median(s["events"] for s in streams)
        if concurrency == 1:
            figures[f"{phase}_events_per_s"] = statistics.median(1e3 * s["events"] / s["last_event_ms"] for s in streams)
        else:
            figures[f"{phase}_events_per_s"] = sum(s["events"] for s in streams) / wall
    return figures


async def run_rounds(args: argparse.Namespace, engine_url: str, gateway_url: str, key: str,
                     pids: dict[str, int]) -> tuple[dict[str, dict[str, list[float]]], list[float]]:
    import aiohttp

    runs: dict[str, dict[str, list[float]]] = {side: {} for side in SIDES}
    loads = [os.getloadavg()[0]]
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout,
                                     headers={"Content-Type": "application/json"}) as session:
        sides = Sides(session, engine_url, gateway_url, key)
        for side in SIDES:  # warm-up, checked like every measured answer
            for _ in range(3):
                await sides.whole(side, request_body(side, WHOLE_TOKENS, stream=False))
            await sides.stream(side, request_body(side, args.stream_tokens, stream=True), args.stream_tokens)
        names = list(SIDES)
        for round_ in range(args.rounds):
            order = names[round_ % len(names):] + names[: round_ % len(names)]
            for side in order:
                for metric, value in (await measure_side(sides, side, args, pids)).items():
                    runs[side].setdefault(metric, []).append(value)
                loads.append(os.getloadavg()[0])
            progress(f"round {round_ + 1}/{args.rounds} done (order {' '.join(SIDES[s][0] for s in order)}), "
                     f"1-min load average {loads[-1]:.1f}")
    return runs, loads


# processes --------------------------------------------------------------------------------------

def progress(message: str) -> None:
    print(f"bench_anthropic: {message}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_engine(model: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("R1NEST_", "VLLM_"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_API_KEY=ENGINE_KEY)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", MODEL,
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "16384", "--dtype", "bfloat16",
            "--max-num-seqs", "16", "--reasoning-parser", "deepseek_r1", "--enable-prompt-tokens-details"]
    with open(log, "ab") as out:  # its own process group: stopping it stops its EngineCore too
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_engine(engine: subprocess.Popen, url: str, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if engine.poll() is not None:
            raise BenchError(f"vLLM exited with {engine.returncode} while starting; the end of its log:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise BenchError(f"vLLM did not answer /health within {ENGINE_START_TIMEOUT_S:.0f} s; the end of its log:\n{_tail(log)}")


def start_gateway(engine_url: str, port: int, data_dir: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("R1NEST_")}
    env.update(R1NEST_UPSTREAM_KEY=ENGINE_KEY, R1NEST_ADMIN_KEY=ADMIN_KEY, R1NEST_LOG_LEVEL="warning")
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "r1nest", "gateway", "--upstream", engine_url, "--served-model", MODEL,
             "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )


def stop(process: subprocess.Popen | None, *, group: bool = False) -> None:
    if process is None or process.poll() is not None:
        if process is not None and group:
            _signal_group(process, signal.SIGKILL)  # a child left behind by a leader that already exited
        return
    if group:
        _signal_group(process, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        if group:
            _signal_group(process, signal.SIGKILL)
        else:
            process.kill()
        process.wait(10)
    if group:
        _signal_group(process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the group this script created for it (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def _terminated(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    engine = gateway = None
    signal.signal(signal.SIGTERM, _terminated)
    with tempfile.TemporaryDirectory(prefix="r1nest-bench-anthropic-") as tmp:
        work = Path(tmp)
        engine_log, gateway_log = work / "vllm.log", work / "gateway.log"
        try:
            model = args.model
            if model is None:
                from r1nest.tinymodel import write_tiny_model

                progress("writing the tiny Qwen2 model")
                model = write_tiny_model(work / "tiny-qwen2", arch="qwen2")
            engine_port, gateway_port = free_port(), free_port()
            engine_url, gateway_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{gateway_port}"
            progress(f"starting vLLM on port {engine_port} (1-3 minutes on a small CPU box)")
            engine = start_engine(Path(model), engine_port, engine_log)
            wait_engine(engine, engine_url, engine_log)
            progress(f"starting the gateway on port {gateway_port}")
            gateway = start_gateway(engine_url, gateway_port, work / "data", gateway_log)
            try:
                wait_http(gateway_url + "/health", timeout_s=60)
            except SystemExit as exc:
                raise BenchError(f"{exc}; the gateway's log:\n{_tail(gateway_log)}") from None
            try:
                key = create_key(gateway_url)
            except OSError as exc:
                raise BenchError(f"creating a key failed: {exc}; the gateway's log:\n{_tail(gateway_log)}") from None
            started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            progress(f"measuring {args.rounds} rounds")
            pids = {"gateway": gateway.pid, "engine": engine.pid}
            runs, loads = _run(run_rounds(args, engine_url, gateway_url, key, pids))
            ended = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        except BenchError as exc:
            raise SystemExit(f"bench_anthropic: {exc}") from None
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise SystemExit(f"bench_anthropic: a request failed: {exc!r}") from None
        finally:
            stop(gateway)
            stop(engine, group=True)
    import vllm

    return {"runs": runs, "load_average_1m": loads, "started": started, "ended": ended, "cpus": os.cpu_count(),
            "vllm": vllm.__version__, "model": "tiny Qwen2 (r1nest.tinymodel)" if args.model is None else str(args.model),
            "settings": {name: getattr(args, name)
                         for name in ("rounds", "requests", "streams", "stream_tokens", "concurrency")}}


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# report -----------------------------------------------------------------------------------------

ROWS = [  # (metric, label, format)
    ("whole_latency_ms", "latency, sequential, ms", "{:.1f}"),
    ("whole_rps", "requests/s, sequential", "{:.1f}"),
    ("whole4_latency_ms", "latency, 4 in flight, ms", "{:.1f}"),
    ("whole4_rps", "requests/s, 4 in flight", "{:.1f}"),
    ("stream_first_event_ms", "stream: first event, ms", "{:.1f}"),
    ("stream_first_token_ms", "stream: first token, ms", "{:.1f}"),
    ("stream_last_event_ms", "stream: last event, ms", "{:.1f}"),
    ("stream_events", "stream: SSE events", "{:.0f}"),
    ("stream_events_per_s", "stream: events/s", "{:.1f}"),
    ("stream4_first_token_ms", "4 streams: first token, ms", "{:.1f}"),
    ("stream4_last_event_ms", "4 streams: last event, ms", "{:.1f}"),
    ("stream4_events_per_s", "4 streams: events/s in all", "{:.1f}"),
]
PHASES = {"whole": "request, seq.", "whole4": "request, 4", "stream": "stream, seq.", "stream4": "stream, 4"}
PROCESSES = {"gateway": "gateway", "engine": "vLLM API"}
# what the derived differences are taken of: times (requests/s and events/s are their inverses)
DERIVED = [metric for metric, _, _ in ROWS if metric.endswith("_ms") and "first_event" not in metric]
CPU_SIDES = ("gateway_chat", "gateway_messages")


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cpu_figures(figures: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """µs per request or stream, per phase and process: all rounds' CPU over all rounds' count
    ("total"), and the rounds' own quotients (coarse: 10 ms ticks) as min and max."""
    out = {}
    for phase in PHASES:
        counts = figures[f"{phase}_count"]
        for name in PROCESSES:
            seconds = figures[f"{phase}_{name}_cpu_s"]
            rounds = [1e6 * s / n for s, n in zip(seconds, counts)]
            out[f"{phase}_{name}"] = {"total": 1e6 * sum(seconds) / sum(counts), "min": min(rounds), "max": max(rounds)}
    return out


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    runs = result["runs"]
    medians = {side: {metric: spread(runs[side][metric]) for metric, _, _ in ROWS} for side in SIDES}
    cpu = {side: cpu_figures(runs[side]) for side in SIDES}
    a, b, c, d = (runs[side] for side in SIDES)
    derived: dict[str, dict[str, dict[str, float]]] = {}
    for metric in DERIVED:  # per round: the four sides of a round ran next to each other
        rounds = list(zip(a[metric], b[metric], c[metric], d[metric]))
        derived[metric] = {
            "translation_d_minus_c": spread([rd - rc for _, _, rc, rd in rounds]),
            "relay_c_minus_a": spread([rc - ra for ra, _, rc, _ in rounds]),
            "engine_translation_b_minus_a": spread([rb - ra for ra, rb, _, _ in rounds]),
            "forwarding_estimate_b_plus_c_minus_a": spread([rb + rc - ra for ra, rb, rc, _ in rounds]),
            "d_minus_forwarding_estimate": spread([rd - (rb + rc - ra) for ra, rb, rc, rd in rounds]),
        }
    cpu_derived = {}
    for key in cpu["gateway_chat"]:
        for x, y in (("gateway_chat", "gateway_messages"), ("engine_chat", "engine_messages")):
            cx, cy = cpu[x][key]["total"], cpu[y][key]["total"]
            cpu_derived[f"{key}_{y}_minus_{x}"] = {"difference": cy - cx, "ratio": cy / cx if cx else None}
    loads = result["load_average_1m"]
    return {**result, "medians": medians, "cpu_us": cpu, "derived": derived, "cpu_derived": cpu_derived,
            "load_average_1m_spread": spread(loads)}


def report(summary: dict[str, Any]) -> None:
    medians, loads, settings = summary["medians"], summary["load_average_1m_spread"], summary["settings"]
    print(f"{summary['started']} - {summary['ended']}: {summary['cpus']} CPUs, vLLM {summary['vllm']}, "
          f"{summary['model']}; 1-min load average {loads['min']:.1f}-{loads['max']:.1f} (median {loads['median']:.1f})")
    print(f"medians over {settings['rounds']} rounds [min-max]; {settings['requests']} requests and {settings['streams']} "
          f"streams of {settings['stream_tokens']} tokens per side, phase and round\n")
    header = f"{'':34}" + "".join(f"{SIDES[side][0] + ' ' + side:>26}" for side in SIDES)
    print(header)
    for metric, label, fmt in ROWS:
        cells = [medians[side][metric] for side in SIDES]
        print(f"{label:34}" + "".join(
            f"{fmt.format(c['median'])} [{fmt.format(c['min'])}-{fmt.format(c['max'])}]".rjust(26) for c in cells))
    print(f"\nCPU µs per request or stream: all rounds together [the rounds' min-max]\n{header}")
    for phase, unit in PHASES.items():
        for name, label in PROCESSES.items():
            cells = [summary["cpu_us"][side][f"{phase}_{name}"] for side in SIDES]
            shown = [f"{c['total']:.0f} [{c['min']:.0f}-{c['max']:.0f}]" if name == "engine" or side in CPU_SIDES else "-"
                     for side, c in zip(SIDES, cells)]
            print(f"{label + ' CPU/' + unit:34}" + "".join(cell.rjust(26) for cell in shown))
    print("\ndifferences within each round, ms: median [min to max]")
    columns = ["translation_d_minus_c", "relay_c_minus_a", "engine_translation_b_minus_a",
               "forwarding_estimate_b_plus_c_minus_a", "d_minus_forwarding_estimate"]
    print(f"{'':34}" + "".join(f"{name:>26}" for name in ("d - c", "c - a", "b - a", "b + c - a", "d - (b + c - a)")))
    labels = {metric: label for metric, label, _ in ROWS}
    for metric in DERIVED:
        cells = [summary["derived"][metric][name] for name in columns]
        shown = [f"{s['median']:.1f} [{s['min']:.1f} to {s['max']:.1f}]" for s in cells]
        print(f"{labels[metric]:34}" + "".join(cell.rjust(26) for cell in shown))
    print("\nCPU µs, all rounds together: the gateway's, d against c; vLLM's API server's, b against a")
    for phase, unit in PHASES.items():
        line = []
        for name, (x, y) in (("gateway", ("gateway_chat", "gateway_messages")),
                             ("engine", ("engine_chat", "engine_messages"))):
            cx, cy = summary["cpu_us"][x][f"{phase}_{name}"]["total"], summary["cpu_us"][y][f"{phase}_{name}"]["total"]
            first, second = SIDES[y][0], SIDES[x][0]
            line.append(f"{first} - {second} {cy - cx:+.0f}, {first} / {second} " + (f"{cy / cx:.2f}x" if cx else "-"))
        print(f"{'per ' + unit:34}" + "".join(f"{part:<34}" for part in line))


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive, default=5, help="rounds over the four sides (default 5)")
    parser.add_argument("--requests", type=positive, default=100,
                        help="non-streamed requests per side, phase and round (default 100)")
    parser.add_argument("--streams", type=positive, default=32, help="streams per side, phase and round (default 32)")
    parser.add_argument("--stream-tokens", type=positive, default=64, help="max_tokens of each stream (default 64)")
    parser.add_argument("--concurrency", type=positive, default=4, help="requests or streams in flight in the "
                        "concurrent phases (default 4)")
    parser.add_argument("--model", type=Path, help="a model directory written by r1nest.tinymodel (e.g. "
                        "scripts/make-tiny-model) to serve instead of a fresh tiny Qwen2 model: the answers are "
                        "checked against its scripted reasoning and answer")
    parser.add_argument("--json", action="store_true", help="print the figures (every round's) as JSON")
    args = parser.parse_args()
    if args.stream_tokens < 24:
        parser.error("--stream-tokens must be at least 24: the model reasons for 13 tokens before it answers")
    if args.model is not None and not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there")
    try:
        summary = summarize(bench(args))
    except KeyboardInterrupt:
        raise SystemExit("bench_anthropic: interrupted; vLLM and the gateway were stopped") from None
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        report(summary)


if __name__ == "__main__":
    main()
