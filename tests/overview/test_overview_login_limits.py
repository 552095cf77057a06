"""The overview login's limits on a real server: who a client is, and who may still log in.

The gateway (with its overview) is served by `uvicorn_server(app, settings)`, what `r1nest gateway`
and `r1nest serve` run, on loopback; the clients are plain HTTP requests that add the
`X-Forwarded-For` / `X-Forwarded-Proto` headers a proxy (or an attacker) would send.

- `X-Forwarded-*` are believed only from `R1NEST_TRUSTED_PROXIES` (none by default; uvicorn alone
  would believe loopback): rotating `X-Forwarded-For` does not give a fresh per-client budget, and
  `X-Forwarded-Proto: https` from anyone else does not make the cookie `Secure`;
- others' failed logins, however many, do not lock out a client that has not failed: the admin
  still logs in with the right key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from r1nest.gateway.app import create_app
from r1nest.gateway.cli import uvicorn_server
from r1nest.gateway.upstream import UpstreamConfig
from r1nest.ledger.memory import MemoryStore
from r1nest.overview.web import (
    COOKIE_NAME,
    LOGIN_FAILURES_PER_CLIENT,
    LOGIN_FAILURES_TOTAL,
    LoginLimiter,
    client_id,
)
from r1nest.settings import load_settings
from r1nest.testing.fake_engine import FakeEngine

from .conftest import ADMIN_KEY

MODEL = "deepseek-r1"
ENGINE_KEY = "engine-secret-0123456789abcdef"


class Gateway:
    """The gateway on 127.0.0.1 from a background thread, through `uvicorn_server`."""

    def __init__(self, engine_url: str, data_dir: Any) -> None:
        import socket
        import threading
        import time

        settings = load_settings(data_dir=data_dir, admin_key=ADMIN_KEY, host="127.0.0.1")  # + R1NEST_* env
        app = create_app(settings=settings, store=MemoryStore(), upstream=UpstreamConfig(engine_url, ENGINE_KEY, MODEL))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.server = uvicorn_server(app, settings)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.01)
        self.client = httpx.Client(base_url=self.url, timeout=10, follow_redirects=False)

    def login(self, key: str, **headers: str) -> httpx.Response:
        """A login from a fresh connection and no cookie, with these headers."""
        self.client.cookies.clear()
        return self.client.post("/overview/login", data={"admin_key": key}, headers=headers)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self._thread.join(20)
        self._sock.close()


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    with FakeEngine(api_key=ENGINE_KEY, served_model=MODEL) as fake:
        yield fake


@pytest.fixture
def serve(engine: FakeEngine, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Gateway]]:
    """serve(trusted_proxies=None) -> a running gateway; with R1NEST_TRUSTED_PROXIES set when given."""
    started: list[Gateway] = []

    def start(trusted_proxies: str | None = None) -> Gateway:
        if trusted_proxies is None:
            monkeypatch.delenv("R1NEST_TRUSTED_PROXIES", raising=False)
        else:
            monkeypatch.setenv("R1NEST_TRUSTED_PROXIES", trusted_proxies)
        gateway = Gateway(engine.url, tmp_path)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def assert_logged_in(response: httpx.Response) -> str:
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/overview"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    return cookie


# on a real server ----------------------------------------------------------------------------


def test_rotating_x_forwarded_for_from_an_untrusted_peer_hits_the_per_client_limit(
    serve: Callable[..., Gateway],
) -> None:
    gateway = serve()  # R1NEST_TRUSTED_PROXIES unset: loopback is not a proxy either
    for n in range(LOGIN_FAILURES_PER_CLIENT):
        assert gateway.login("wrong", **{"X-Forwarded-For": f"198.51.100.{n}"}).status_code == 401
    limited = gateway.login("wrong", **{"X-Forwarded-For": "198.51.100.99"})
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) > 0
    # the right key from the same peer waits too (no oracle while limited)
    assert gateway.login(ADMIN_KEY, **{"X-Forwarded-For": "203.0.113.1"}).status_code == 429


def test_others_failures_do_not_lock_out_the_admin(serve: Callable[..., Gateway]) -> None:
    """60 wrong logins from 12 clients behind a trusted proxy, then the right key from a 13th."""
    gateway = serve(trusted_proxies="127.0.0.1")
    statuses: dict[str, list[int]] = {}
    for n in range(12):
        client = f"198.51.100.{n + 1}"
        statuses[client] = [gateway.login("wrong", **{"X-Forwarded-For": client}).status_code for _ in range(5)]
    # each client is its forwarded address: 5 failures each until the overall cap (50) is spent,
    # then a further client gets its one try (it has not failed yet), and is refused after it
    assert [statuses[f"198.51.100.{n + 1}"] for n in range(10)] == [[401] * 5] * 10
    assert statuses["198.51.100.11"] == statuses["198.51.100.12"] == [401, 429, 429, 429, 429]
    assert LOGIN_FAILURES_TOTAL == 50

    cookie = assert_logged_in(gateway.login(ADMIN_KEY, **{"X-Forwarded-For": "203.0.113.7"}))
    assert "secure" not in cookie.lower()  # plain http, no X-Forwarded-Proto
    page = gateway.client.get("/overview")
    assert page.status_code == 200 and "deepseek-r1" in page.text
    # a client with failures of its own still waits, even with the right key
    refused = gateway.login(ADMIN_KEY, **{"X-Forwarded-For": "198.51.100.3"})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    # and the per-client limit holds for a trusted proxy's clients as for anyone
    for _ in range(LOGIN_FAILURES_PER_CLIENT):
        gateway.login("wrong", **{"X-Forwarded-For": "192.0.2.50"})
    assert gateway.login(ADMIN_KEY, **{"X-Forwarded-For": "192.0.2.50"}).status_code == 429


def test_rotating_ipv6_addresses_within_one_64_hits_the_per_client_limit(serve: Callable[..., Gateway]) -> None:
    gateway = serve(trusted_proxies="127.0.0.1")
    for n in range(LOGIN_FAILURES_PER_CLIENT):
        assert gateway.login("wrong", **{"X-Forwarded-For": f"2001:db8:7:7::{n + 1:x}"}).status_code == 401
    assert gateway.login("wrong", **{"X-Forwarded-For": "2001:db8:7:7:ffff::1"}).status_code == 429
    assert_logged_in(gateway.login(ADMIN_KEY, **{"X-Forwarded-For": "2001:db8:7:8::1"}))  # another /64


def test_x_forwarded_proto_from_an_untrusted_peer_does_not_make_the_cookie_secure(
    serve: Callable[..., Gateway],
) -> None:
    gateway = serve()
    cookie = assert_logged_in(gateway.login(ADMIN_KEY, **{"X-Forwarded-Proto": "https"}))
    assert "secure" not in cookie.lower(), cookie


def test_x_forwarded_proto_from_a_trusted_proxy_makes_the_cookie_secure(serve: Callable[..., Gateway]) -> None:
    gateway = serve(trusted_proxies="10.0.0.0/8, 127.0.0.1/32")
    cookie = assert_logged_in(
        gateway.login(ADMIN_KEY, **{"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"})
    )
    assert "; secure" in cookie.lower(), cookie


# the rules, with a clock ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_total_cap_refuses_only_clients_with_failures_of_their_own() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock=clock, window_s=300, per_client=5, total=10)
    for n in range(10):
        limiter.record_failure(f"c{n}")
        clock.now += 1
    assert limiter.retry_after_s("fresh") == 0  # never failed: not refused by the cap
    # c0 failed at t0; the cap frees when the oldest failure (c0's) leaves the window
    assert 0 < limiter.retry_after_s("c9") <= 300
    assert limiter.retry_after_s("c0") == limiter.retry_after_s("c9")
    clock.now += 300 - 10 + 1  # c0's failure has left the window: 9 in it, cap not reached
    assert limiter.retry_after_s("c0") == 0 and limiter.retry_after_s("c9") == 0


def test_limiter_per_client_limit() -> None:
    clock = Clock()
    limiter = LoginLimiter(clock=clock, window_s=300, per_client=3, total=50)
    for _ in range(3):
        assert limiter.retry_after_s("a") == 0
        limiter.record_failure("a")
        clock.now += 10
    assert limiter.retry_after_s("a") == 300 - 30 + 1
    assert limiter.retry_after_s("b") == 0
    clock.now += 300 - 30 + 1
    assert limiter.retry_after_s("a") == 0
    limiter.record_failure("a")
    limiter.record_success("a")
    assert limiter.retry_after_s("a") == 0


def test_client_id_groups_an_ipv6_client_by_its_64() -> None:
    assert client_id("2001:db8:1:2::1") == client_id("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert client_id("2001:db8:1:3::1") != client_id("2001:db8:1:2::1")
    assert client_id("::ffff:198.51.100.7") == "198.51.100.7"
    assert client_id("198.51.100.7") == "198.51.100.7"
    assert client_id(None) == "unknown"
    assert client_id("unix-socket") == "unix-socket"
