"""Fixtures for the overview tests: a context with a real-format key, a usage panel, and the routes
in an app."""

from __future__ import annotations

import hmac

import pytest

from r1nest.keys import new_key
from r1nest.overview.context import OverviewContext, Readiness

ADMIN_KEY = "r1nadmin-00000000abcd-" + "Q" * 43


def make_context(**overrides) -> OverviewContext:
    fields = dict(
        model="deepseek-r1",
        engine="vllm",
        public_endpoint="http://203.0.113.7:8000",
        internal_endpoint="http://10.0.1.12:8000/v1",
        api_key=new_key()[1],
        remaining_credits=987_654,
        readiness=Readiness("ready"),
        deployment="test",
        source="a test fixture",
    )
    fields.update(overrides)
    return OverviewContext(**fields)


def verify_admin_key(candidate: str) -> bool:
    return hmac.compare_digest(candidate.encode(), ADMIN_KEY.encode())


USAGE_NOW = 1796048707.0  # 2026-11-30T14:25:07Z


def make_usage_panel():
    """A panel built the way read_usage_panel builds it, from buckets the ledger would return."""
    from r1nest.ledger.base import UsageBucket
    from r1nest.overview.usage_panel import Series, UsagePanel
    from r1nest.usage import filled, recent_window

    hours = recent_window("hour", 24, now=USAGE_NOW)
    days = recent_window("day", 30, now=USAGE_NOW)
    hourly = [
        UsageBucket(hours.since + 2 * 3600, 2, 1200, 300, 800, 500),
        UsageBucket(hours.since + 5 * 3600, 1, 10, 0, 0, 0),  # a request that cost nothing still shows
        UsageBucket(hours.since + 10 * 3600, 3, 2000, 0, 4000, 1000),
        UsageBucket(hours.since + 23 * 3600, 1, 1, 1, 1, 1),  # the current hour
    ]
    daily = [UsageBucket(days.since + d * 86400, d, d * 100, d * 10, d * 200, d * 1000) for d in (0, 3, 29)]
    return UsagePanel("0123456789ab", Series(hours, tuple(filled(hours, hourly))), Series(days, tuple(filled(days, daily))))


@pytest.fixture
def context() -> OverviewContext:
    return make_context()



class DeferredApp:
    """An ASGI app whose target is set after its server is bound (so the page knows its URL)."""

    def __init__(self) -> None:
        self.app = None

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)
