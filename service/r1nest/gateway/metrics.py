"""Counters the gateway keeps and their Prometheus text exposition (served at /metrics).

Plain in-process numbers: one gateway process, one event loop, no locks needed. Labels are
route names and status codes only, never keys or key ids (bounded cardinality).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from r1nest.gateway.state import PHASES, EngineState

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))
    total: int = 0
    sum_s: float = 0.0

    def observe(self, value_s: float) -> None:
        self.total += 1
        self.sum_s += value_s
        for index, bound in enumerate(LATENCY_BUCKETS_S):
            if value_s <= bound:
                self.counts[index] += 1
                break


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = defaultdict(_Histogram)
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.credits_charged = 0
        self.usage_clamped = 0
        self.aborted_streams = 0
        self.rate_limited = 0
        self.keepalives = 0
        self.open_requests = 0

    def observe_request(self, route: str, status: int, duration_s: float) -> None:
        self.requests[(route, status)] += 1
        self.latency[route].observe(duration_s)

    def observe_charge(self, prompt_tokens: int, completion_tokens: int, credits: int, cached_tokens: int = 0) -> None:
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        self.completion_tokens += completion_tokens
        self.credits_charged += credits

    def render(self, state: EngineState) -> str:
        lines = [
            "# HELP r1nest_requests_total Requests answered, by route and status.",
            "# TYPE r1nest_requests_total counter",
        ]
        for (route, status), count in sorted(self.requests.items()):
            lines.append(f'r1nest_requests_total{{route="{route}",status="{status}"}} {count}')
        lines += [
            "# HELP r1nest_request_duration_seconds Time to the end of the response, by route.",
            "# TYPE r1nest_request_duration_seconds histogram",
        ]
        for route, histogram in sorted(self.latency.items()):
            cumulative = 0
            for bound, count in zip(LATENCY_BUCKETS_S, histogram.counts):
                cumulative += count
                lines.append(f'r1nest_request_duration_seconds_bucket{{route="{route}",le="{bound}"}} {cumulative}')
            lines.append(f'r1nest_request_duration_seconds_bucket{{route="{route}",le="+Inf"}} {histogram.total}')
            lines.append(f'r1nest_request_duration_seconds_sum{{route="{route}"}} {histogram.sum_s:.6f}')
            lines.append(f'r1nest_request_duration_seconds_count{{route="{route}"}} {histogram.total}')
        lines += [
            "# HELP r1nest_tokens_total Tokens charged, by kind (reasoning tokens are completion tokens;",
            "# cached_prompt tokens are the prompt tokens served from the engine's prefix cache).",
            "# TYPE r1nest_tokens_total counter",
            f'r1nest_tokens_total{{kind="prompt"}} {self.prompt_tokens}',
            f'r1nest_tokens_total{{kind="cached_prompt"}} {self.cached_tokens}',
            f'r1nest_tokens_total{{kind="completion"}} {self.completion_tokens}',
            "# HELP r1nest_credits_charged_total Credits charged at settlement.",
            "# TYPE r1nest_credits_charged_total counter",
            f"r1nest_credits_charged_total {self.credits_charged}",
            "# HELP r1nest_usage_clamped_total Settlements where the engine reported more than was reserved.",
            "# TYPE r1nest_usage_clamped_total counter",
            f"r1nest_usage_clamped_total {self.usage_clamped}",
            "# HELP r1nest_aborted_streams_total Streams ended early by the client or by draining.",
            "# TYPE r1nest_aborted_streams_total counter",
            f"r1nest_aborted_streams_total {self.aborted_streams}",
            "# HELP r1nest_rate_limited_total Requests refused by a per-key limit (429).",
            "# TYPE r1nest_rate_limited_total counter",
            f"r1nest_rate_limited_total {self.rate_limited}",
            "# HELP r1nest_keepalives_total SSE keep-alive comments sent on quiet streams.",
            "# TYPE r1nest_keepalives_total counter",
            f"r1nest_keepalives_total {self.keepalives}",
            "# HELP r1nest_open_requests Requests in progress.",
            "# TYPE r1nest_open_requests gauge",
            f"r1nest_open_requests {self.open_requests}",
            "# HELP r1nest_engine_phase The engine's phase as the gateway sees it (1 = current).",
            "# TYPE r1nest_engine_phase gauge",
        ]
        for phase in PHASES:
            lines.append(f'r1nest_engine_phase{{phase="{phase}"}} {1 if state.phase == phase else 0}')
        return "\n".join(lines) + "\n"
