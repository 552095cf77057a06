#!/usr/bin/env python3
"""Serve benchmark: `r1nest serve` on the tiny DeepSeek-V3-architecture model, real vLLM CPU build.

    .venv/bin/python scripts/bench_serve.py [--rounds 3] [--duration 10] [--max-tokens 128] [--json OUT]

In one run:
1. starts `r1nest serve` (fresh data dir) and measures the time from the start of the process to
   `/health` ready and to the first streamed token of a chat request;
2. at concurrency 1, 8 and 32 measures output tokens/s of streaming chats through the gateway
   and directly against the engine (same requests, same load generator as `r1nest bench`),
   alternating the order over several rounds, and reports the medians and their ratio.

The engine's key is read from the engine process's environment (/proc), which only the same
user can do: the benchmark runs on the serving box.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CONCURRENCIES = (1, 8, 32)


def engine_key(pid: int) -> str:
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"VLLM_API_KEY="):
            return item.split(b"=", 1)[1].decode()
    raise RuntimeError("the engine process has no VLLM_API_KEY")


def first_token_s(url: str, key: str, model: str, since: float) -> float:
    """Seconds from `since` to the first reasoning or content token of a streamed chat."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}"}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            for choice in json.loads(line[5:]).get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("reasoning_content") or delta.get("content"):
                    return time.monotonic() - since
    raise RuntimeError("no token came back")


async def measure(root: str, key: str, model: str, concurrency: int, args: argparse.Namespace) -> float:
    from r1nest.bench import LoadSpec, run_load, summarize

    spec = LoadSpec(root=root, key=key, model=model, concurrency=concurrency, prompt_tokens=args.prompt_tokens,
                    max_tokens=args.max_tokens, duration_s=args.duration, requests=None)
    records, wall_s = await run_load(spec)
    report = summarize(records, wall_s=wall_s, url=root, model=model, concurrency=concurrency)
    if report.errors:
        raise RuntimeError(f"errors against {root} at concurrency {concurrency}: {report.errors}")
    return report.output_tokens_per_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from r1nest.testing.serve_process import start_serve
    from r1nest.tinymodel import write_tiny_model

    with tempfile.TemporaryDirectory(prefix="r1nest-bench-") as tmp:
        root = Path(tmp)
        model_dir = write_tiny_model(root / "tiny-deepseek-v3", arch="deepseek_v3")
        print(f"starting r1nest serve --model {model_dir}", file=sys.stderr)
        started = time.monotonic()
        served = start_serve(model_dir, root / "data", root / "serve.log",
                             settings_env={"R1NEST_DEMO_CREDITS": str(10**15)})
        try:
            ready_s = served.startup_s
            ttft_from_start_s = first_token_s(served.url, served.key, served.state["served_model"], started)
            print(f"ready after {ready_s:.1f} s, first token after {ttft_from_start_s:.1f} s", file=sys.stderr)
            model = served.state["served_model"]
            direct_key = engine_key(served.engine_pid)
            targets = {"gateway": (served.url, served.key), "direct": (served.engine_url, direct_key)}
            asyncio.run(measure(served.url, served.key, model, 8, argparse.Namespace(**{**vars(args), "duration": 3.0})))
            results: dict[int, dict[str, list[float]]] = {c: {"gateway": [], "direct": []} for c in CONCURRENCIES}
            for round_index in range(args.rounds):
                for concurrency in CONCURRENCIES:
                    order = ("direct", "gateway") if round_index % 2 == 0 else ("gateway", "direct")
                    for name in order:
                        url, key = targets[name]
                        value = asyncio.run(measure(url, key, model, concurrency, args))
                        results[concurrency][name].append(value)
                        print(f"round {round_index + 1} c={concurrency:>2} {name:>7}: {value:8.1f} tok/s", file=sys.stderr)
        finally:
            exit_code = served.stop()
        if exit_code != 0:
            print(f"warning: r1nest serve exited with {exit_code}", file=sys.stderr)

    summary = {
        "serve_to_ready_s": round(ready_s, 1),
        "serve_to_first_token_s": round(ttft_from_start_s, 1),
        "settings": {"rounds": args.rounds, "duration_s": args.duration, "prompt_tokens": args.prompt_tokens,
                     "max_tokens": args.max_tokens},
        "concurrency": {},
    }
    print("\n| concurrency | direct to vLLM (tok/s) | through the gateway (tok/s) | gateway / direct |")
    print("|---:|---:|---:|---:|")
    for concurrency, values in results.items():
        direct = statistics.median(values["direct"])
        gateway = statistics.median(values["gateway"])
        summary["concurrency"][str(concurrency)] = {
            "direct_tok_s": round(direct, 1), "gateway_tok_s": round(gateway, 1), "ratio": round(gateway / direct, 3),
            "direct_all": [round(v, 1) for v in values["direct"]], "gateway_all": [round(v, 1) for v in values["gateway"]],
        }
        print(f"| {concurrency} | {direct:,.1f} | {gateway:,.1f} | {gateway / direct:.3f} |")
    print(f"\n`r1nest serve` start -> ready: {ready_s:.1f} s; -> first token: {ttft_from_start_s:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
