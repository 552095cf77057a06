"""`r1nest bench URL --key K`: load-test any OpenAI-compatible deployment with streaming chats.

Each of `--concurrency` workers sends streaming chat completions back to back until
`--duration` seconds pass or `--requests` have been sent. Per request it records the time to the
first token (TTFT), the gaps between tokens (inter-token latency, ITL), the completion tokens the
server reported in its usage chunk, and the HTTP status. The report gives p50/p90/p99 of each,
output tokens/s over the whole run, errors by status, and the credits spent (the key's balance
from `/v1/credits` before and after; a bare engine has no credits and the line is left out).

Pure functions (`percentile`, `summarize`) turn the records into the report; the load loop is
the only I/O.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import click

from r1nest.errors import ConfigError

MAX_CONCURRENCY = 1024
MAX_REQUESTS = 1_000_000
MAX_DURATION_S = 24 * 3600.0
REQUEST_TIMEOUT_S = 600.0
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


# --- records and statistics (pure) ----------------------------------------------------------


@dataclass
class RequestRecord:
    status: int | None  # HTTP status; None when the connection failed
    started_s: float
    first_token_s: float | None = None  # absolute times (perf_counter)
    ended_s: float = 0.0
    token_times_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0  # from usage; the number of token chunks when usage is missing
    prompt_tokens: int = 0
    error: str | None = None  # "http 503", "stream error", "connection", ...

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass(frozen=True)
class Distribution:
    p50: float | None
    p90: float | None
    p99: float | None
    mean: float | None
    count: int


@dataclass(frozen=True)
class Report:
    url: str
    model: str
    concurrency: int
    requests: int
    ok: int
    errors: dict[str, int]
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_s: Distribution
    itl_s: Distribution
    request_output_tokens_per_s: Distribution
    credits_before: int | None = None
    credits_after: int | None = None

    @property
    def credits_spent(self) -> int | None:
        if self.credits_before is None or self.credits_after is None:
            return None
        return self.credits_before - self.credits_after

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["credits_spent"] = self.credits_spent
        return doc


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float]) -> Distribution:
    return Distribution(
        p50=percentile(values, 50), p90=percentile(values, 90), p99=percentile(values, 99),
        mean=(sum(values) / len(values)) if values else None, count=len(values),
    )


def summarize(
    records: Sequence[RequestRecord], *, wall_s: float, url: str, model: str, concurrency: int,
    credits_before: int | None = None, credits_after: int | None = None,
) -> Report:
    """The report of a run. Tokens of failed streams count in the output (they were produced);
    latencies come from successful requests only."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error or f"http {r.status}" for r in records if not r.ok)
    ttft = [r.first_token_s - r.started_s for r in ok if r.first_token_s is not None]
    itl = [b - a for r in ok for a, b in zip(r.token_times_s, r.token_times_s[1:])]
    per_request = [
        r.completion_tokens / (r.ended_s - r.first_token_s)
        for r in ok
        if r.first_token_s is not None and r.ended_s > r.first_token_s and r.completion_tokens > 1
    ]
    output_tokens = sum(r.completion_tokens for r in records)
    wall_s = max(wall_s, 1e-9)
    return Report(
        url=url, model=model, concurrency=concurrency, requests=len(records), ok=len(ok),
        errors=dict(sorted(errors.items())), duration_s=wall_s,
        prompt_tokens=sum(r.prompt_tokens for r in records), output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / wall_s, requests_per_s=len(records) / wall_s,
        ttft_s=distribution(ttft), itl_s=distribution(itl), request_output_tokens_per_s=distribution(per_request),
        credits_before=credits_before, credits_after=credits_after,
    )


def synthetic_prompt(prompt_tokens: int) -> str:
    """About `prompt_tokens` tokens of text (one short word is about one token)."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(max(prompt_tokens, 1)))


def api_root(url: str) -> str:
    """Base URL without a trailing /v1: both http://h:8000 and http://h:8000/v1 are accepted."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"expected an http(s) URL, got {url!r}")
    return url[: -len("/v1")] if url.endswith("/v1") else url


# --- the load (I/O) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    root: str
    key: str | None
    model: str
    concurrency: int
    prompt_tokens: int
    max_tokens: int
    duration_s: float | None
    requests: int | None


def _headers(key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


async def fetch_model(session: Any, root: str, key: str | None) -> str:
    async with session.get(f"{root}/v1/models", headers=_headers(key)) as response:
        if response.status != 200:
            raise ConfigError(f"GET {root}/v1/models answered {response.status}: pass --model (or check --key)")
        data = await response.json()
    models = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
    if not models:
        raise ConfigError(f"{root}/v1/models lists no model: pass --model")
    return str(models[0])


async def fetch_credits(session: Any, root: str, key: str | None) -> int | None:
    """The key's balance, or None where the server has no credits (a bare engine)."""
    try:
        async with session.get(f"{root}/v1/credits", headers=_headers(key)) as response:
            if response.status != 200:
                return None
            value = (await response.json()).get("remaining_credits")
    except Exception:  # noqa: BLE001 - any failure means "no credits here"
        return None
    return value if isinstance(value, int) else None


async def one_request(session: Any, spec: LoadSpec, body: bytes) -> RequestRecord:
    import aiohttp

    record = RequestRecord(status=None, started_s=time.perf_counter())
    try:
        async with session.post(f"{spec.root}/v1/chat/completions", data=body, headers=_headers(spec.key)) as response:
            record.status = response.status
            if response.status != 200:
                await response.read()
                record.error = f"http {response.status}"
                return record
            chunks = 0
            done = False
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = "stream error"
                    continue
                usage = event.get("usage")
                if usage:
                    record.completion_tokens = int(usage.get("completion_tokens") or 0)
                    record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                for choice in event.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                        now = time.perf_counter()
                        if record.first_token_s is None:
                            record.first_token_s = now
                        record.token_times_s.append(now)
                        chunks += 1
            if not record.completion_tokens:
                record.completion_tokens = chunks
            if not done and record.error is None:
                record.error = "stream cut"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        record.error = "connection" if not isinstance(exc, ValueError) else "bad stream"
    finally:
        record.ended_s = time.perf_counter()
    return record


async def run_load(spec: LoadSpec, *, on_done: Callable[[RequestRecord], None] = lambda r: None,
                   session: Any = None) -> tuple[list[RequestRecord], float]:
    """(records, wall seconds). Workers loop until the deadline or the request budget."""
    import aiohttp

    body = json.dumps({
        "model": spec.model, "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": spec.max_tokens,
        "messages": [{"role": "user", "content": synthetic_prompt(spec.prompt_tokens)}],
    }).encode()
    records: list[RequestRecord] = []
    budget = [spec.requests if spec.requests is not None else MAX_REQUESTS]
    own_session = session is None
    if own_session:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=spec.concurrency),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )
    started = time.perf_counter()
    deadline = started + spec.duration_s if spec.duration_s is not None else math.inf

    async def worker() -> None:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            record = await one_request(session, spec, body)
            records.append(record)
            on_done(record)

    try:
        await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    finally:
        wall_s = time.perf_counter() - started
        if own_session:
            await session.close()
    return records, wall_s


async def bench_async(url: str, key: str | None, *, model: str | None, concurrency: int, prompt_tokens: int,
                      max_tokens: int, duration_s: float | None, requests: int | None,
                      on_done: Callable[[RequestRecord], None] = lambda r: None) -> Report:
    import aiohttp

    root = api_root(url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as probe:
        try:
            model = model or await fetch_model(probe, root, key)
        except aiohttp.ClientError as exc:
            raise ConfigError(f"cannot reach {root}: {exc}") from None
        before = await fetch_credits(probe, root, key)
    spec = LoadSpec(root=root, key=key, model=model, concurrency=concurrency, prompt_tokens=prompt_tokens,
                    max_tokens=max_tokens, duration_s=duration_s, requests=requests)
    records, wall_s = await run_load(spec, on_done=on_done)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as probe:
        after = await fetch_credits(probe, root, key) if before is not None else None
    return summarize(records, wall_s=wall_s, url=root, model=model, concurrency=concurrency,
                     credits_before=before, credits_after=after)


# --- output -------------------------------------------------------------------------------------


def render(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f} ms"

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    console = Console()
    console.print(f"[bold]{report.url}[/] model {report.model}, concurrency {report.concurrency}: "
                  f"{report.requests} requests in {report.duration_s:.1f} s, {report.ok} ok")
    table = Table("metric", "p50", "p90", "p99", "mean")
    for name, dist, fmt in (("TTFT", report.ttft_s, ms), ("inter-token latency", report.itl_s, ms),
                            ("output tokens/s per request", report.request_output_tokens_per_s, rate)):
        table.add_row(name, fmt(dist.p50), fmt(dist.p90), fmt(dist.p99), fmt(dist.mean))
    console.print(table)
    console.print(f"output tokens/s (all requests): [bold]{report.output_tokens_per_s:.1f}[/]  "
                  f"({report.output_tokens} tokens; {report.prompt_tokens} prompt tokens)")
    if report.errors:
        console.print("errors: " + ", ".join(f"{k}: {v}" for k, v in report.errors.items()))
    if report.credits_spent is not None:
        console.print(f"credits spent: {report.credits_spent} ({report.credits_before} -> {report.credits_after})")


@click.command()
@click.argument("url")
@click.option("--key", help="API key (a gateway key, or the engine's key when pointed at vLLM directly).")
@click.option("--concurrency", type=click.IntRange(1, MAX_CONCURRENCY), default=8, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(1, 1_000_000), default=128, show_default=True,
              help="Approximate prompt length.")
@click.option("--max-tokens", type=click.IntRange(1, 1_000_000), default=256, show_default=True)
@click.option("--duration", "duration_s", type=click.FloatRange(0.1, MAX_DURATION_S), help="Seconds to run (default 30).")
@click.option("--requests", type=click.IntRange(1, MAX_REQUESTS), help="Number of requests instead of a duration.")
@click.option("--model", help="Model name (default: the first of /v1/models).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench(url: str, key: str | None, concurrency: int, prompt_tokens: int, max_tokens: int,
          duration_s: float | None, requests: int | None, model: str | None, as_json: bool) -> None:
    """Load-test a deployment at URL: TTFT, inter-token latency, output tokens/s, errors, credits."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if duration_s is not None and requests is not None:
        raise ConfigError("give --duration or --requests, not both")
    if duration_s is None and requests is None:
        duration_s = 30.0
    progress = Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[errors]} errors"), transient=True)
    total = requests if requests is not None else duration_s
    assert total is not None  # one of the two is set above
    errors = [0]

    with progress:
        task = progress.add_task("bench", total=total, errors=0)
        started = time.monotonic()

        def on_done(record: RequestRecord) -> None:
            errors[0] += 0 if record.ok else 1
            completed = progress.tasks[0].completed + 1 if requests is not None else time.monotonic() - started
            progress.update(task, completed=min(completed, total), errors=errors[0])

        report = asyncio.run(bench_async(url, key, model=model, concurrency=concurrency, prompt_tokens=prompt_tokens,
                                         max_tokens=max_tokens, duration_s=duration_s, requests=requests,
                                         on_done=on_done))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        render(report)
