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


class LoopbackServer:
    """An ASGI app served by uvicorn on a free loopback port, in a thread; bounded start/stop."""

    def __init__(self, app) -> None:
        import socket

        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="auto")
        self._server = uvicorn.Server(config)
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LoopbackServer":
        import threading
        import time

        self._thread = threading.Thread(target=self._server.run, name="overview-test-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
