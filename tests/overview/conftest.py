"""Fixtures for the overview tests: a context with a real-format key, and the routes in an app."""

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


@pytest.fixture
def context() -> OverviewContext:
    return make_context()



class DeferredApp:
    """An ASGI app whose target is set after its server is bound (so the page knows its URL)."""

    def __init__(self) -> None:
        self.app = None

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)
