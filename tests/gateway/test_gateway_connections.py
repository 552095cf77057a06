"""Connection limits of the gateway's HTTP protocol (r1nest.gateway.http_protocol), on a real server.

- request heads (request line + headers) over `R1NEST_MAX_HEADER_BYTES` get a JSON `431` and the
  connection is closed as soon as the bound is passed, whatever is still to come;
- a connection that has not sent a whole request head within `R1NEST_HEADER_TIMEOUT_S` of opening,
  or of its previous response, is closed (`408` when part of a head came); request bodies and
  responses, however slow or long, are not on that clock.

The server is `uvicorn_server(app, settings)` (what `r1nest gateway` and `r1nest serve` run) in
front of the fake engine; clients are raw sockets, so each byte and each pause is the test's.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from r1nest.errors import ConfigError
from r1nest.gateway.app import create_app
from r1nest.gateway.cli import trusted_proxy_networks, uvicorn_server
from r1nest.gateway.http_protocol import GatewayHttpProtocol
from r1nest.gateway.state import EngineState
from r1nest.gateway.upstream import UpstreamConfig
from r1nest.ledger.memory import MemoryStore
from r1nest.settings import load_settings
from r1nest.testing.fake_engine import FakeEngine

from .conftest import ENGINE_KEY, MODEL, make_settings
from .test_gateway_http_protocol import (
    EchoAndBoomApp,
    GatewayServer,
    RawConnection,
    assert_json_error,
    request,
)

DEFAULT_LIMIT = 64 * 1024
CLOSE_BOUND_S = 5.0  # generous: the timers under test are 0.5-1 s


@pytest.fixture
def start(engine: FakeEngine, tmp_path: Any) -> Iterator[Callable[..., GatewayServer]]:
    """start(wrap=None, **settings) -> a running gateway with those settings."""
    started: list[GatewayServer] = []

    def start(*, wrap: Callable[[Any], Any] | None = None, **settings: Any) -> GatewayServer:
        config = make_settings(tmp_path, host="127.0.0.1", **settings)
        app = create_app(
            settings=config, store=MemoryStore(), upstream=UpstreamConfig(engine.url, ENGINE_KEY, MODEL),
            state=EngineState(),
        )
        server = GatewayServer(wrap(app) if wrap else app, config)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class EarlyAnswerApp(EchoAndBoomApp):
    """Adds /test/early: answers 200 without reading the request body."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/test/early":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await super().__call__(scope, receive, send)


def connect(port: int, timeout_s: float = CLOSE_BOUND_S) -> RawConnection:
    connection = RawConnection(port)
    connection.sock.settimeout(timeout_s)
    return connection


def head_of(size: int, *, path: str = "/health", method: str = "GET", extra: bytes = b"") -> bytes:
    """A request head of exactly `size` bytes (padded with one X-Pad header), `extra` headers in it."""
    start = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + extra + b"X-Pad: "
    end = b"\r\n\r\n"
    pad = size - len(start) - len(end)
    assert pad > 0
    return start + b"a" * pad + end


def wait_closed(connection: RawConnection, bound_s: float = CLOSE_BOUND_S) -> tuple[bytes, float]:
    """(bytes the server sent, seconds) until it closed the connection; fails after bound_s."""
    began = time.monotonic()
    received = connection.buffer
    connection.buffer = b""
    connection.sock.settimeout(bound_s)
    while True:
        try:
            chunk = connection.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        except socket.timeout:
            pytest.fail(f"the server kept the connection open over {bound_s} s (got {received!r})")
        if not chunk:
            return received, time.monotonic() - began
        received += chunk


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


def assert_431(response: tuple[int, dict[str, str], bytes]) -> dict[str, Any]:
    status, headers, body = response
    return assert_json_error(
        status, headers, body, expect_status=431, code="request_header_fields_too_large", kind="invalid_request_error"
    )


# request head size ---------------------------------------------------------------------------


def test_a_head_over_the_limit_gets_431_as_soon_as_it_passes(start: Callable[..., GatewayServer]) -> None:
    """The head never ends: the answer comes when the bound is passed, not when the head ends."""
    server = start()
    connection = connect(server.port)
    try:
        start_of_head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
        connection.send(start_of_head + b"a" * (DEFAULT_LIMIT - len(start_of_head)))  # at the bound
        time.sleep(0.3)
        connection.send(b"a")  # one byte over it
        error = assert_431(connection.response())
        assert str(DEFAULT_LIMIT) in error["message"]
        assert connection.closed_by_server()
    finally:
        connection.close()


def test_megabytes_of_headers_are_cut_off_at_the_limit(start: Callable[..., GatewayServer]) -> None:
    """What the adversarial run did (64 MB heads): the server stops reading near the bound."""
    server = start()
    connection = connect(server.port)
    chunk = b"X-Big-" + b"a" * (1024 * 1024 - 8) + b": "  # header names that never end
    sent = 0
    try:
        connection.sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while sent < 64 * 1024 * 1024:
                connection.sock.sendall(chunk)
                sent += len(chunk)
    finally:
        connection.close()
    # the kernel's buffers take a few MB after the server closed; never the whole 64 MB
    assert sent < 32 * 1024 * 1024


def test_a_head_at_the_limit_is_served_and_body_bytes_do_not_count(
    start: Callable[..., GatewayServer],
) -> None:
    server = start(wrap=EchoAndBoomApp)
    body = b"b" * (3 * DEFAULT_LIMIT)
    extra = f"Content-Length: {len(body)}\r\n".encode()
    connection = connect(server.port)
    try:
        # one send: the head's end and a body of three times the bound arrive in the same reads
        connection.send(head_of(DEFAULT_LIMIT, method="POST", path="/test/echo", extra=extra) + body)
        status, _, answer = connection.response()
        assert status == 200, answer
        assert json.loads(answer) == {"method": "POST", "body": body.decode()}
        # the same head with one byte more is refused (sent alone: unread bytes would reset the
        # connection before the answer is read)
        connection.send(head_of(DEFAULT_LIMIT + 1, method="POST", path="/test/echo", extra=extra))
        assert_431(connection.response())
    finally:
        connection.close()


def test_each_request_on_a_connection_has_the_whole_bound(start: Callable[..., GatewayServer]) -> None:
    server = start()
    connection = connect(server.port)
    try:
        for _ in range(3):  # 3 x 40 KiB on one keep-alive connection: each head is under the bound
            connection.send(head_of(40 * 1024))
            status, headers, body = connection.response()
            assert status == 200, body
            assert headers.get("connection") != "close"
        # two pipelined in one send, each under the bound, together over it
        connection.send(head_of(40 * 1024) + head_of(40 * 1024))
        assert connection.response()[0] == 200
        assert connection.response()[0] == 200
    finally:
        connection.close()


def test_the_bound_is_the_setting(start: Callable[..., GatewayServer]) -> None:
    server = start(max_header_bytes=8192)
    connection = connect(server.port)
    try:
        connection.send(head_of(8192))
        assert connection.response()[0] == 200
        connection.send(head_of(8193))
        error = assert_431(connection.response())
        assert "8192" in error["message"]
        assert connection.closed_by_server()
    finally:
        connection.close()


# request head deadline -----------------------------------------------------------------------


def test_idle_connections_are_closed_after_the_header_timeout(start: Callable[..., GatewayServer]) -> None:
    """The adversarial run's 200 idle connections stayed open 50 s and more."""
    server = start(header_timeout_s=0.5)
    connections = [connect(server.port) for _ in range(50)]
    try:
        for connection in connections:
            received, waited = wait_closed(connection)
            assert received == b""  # nothing was sent: nothing to answer, just closed
            assert waited < CLOSE_BOUND_S
    finally:
        for connection in connections:
            connection.close()


def test_a_head_that_does_not_arrive_in_time_gets_408(start: Callable[..., GatewayServer]) -> None:
    """Slowloris: a byte of header every 0.1 s keeps the connection busy, never complete."""
    server = start(header_timeout_s=0.5)
    connection = connect(server.port)
    began = time.monotonic()
    try:
        connection.sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        connection.sock.settimeout(0.1)
        while b"\r\n\r\n" not in connection.buffer:
            assert time.monotonic() - began < CLOSE_BOUND_S, "no answer to a head that never ends"
            try:
                connection.sock.sendall(b"a")
                connection._fill()
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        connection.sock.settimeout(CLOSE_BOUND_S)
        status, headers, body = connection.response()
        assert_json_error(status, headers, body, expect_status=408, code="request_timeout", kind="invalid_request_error")
        assert connection.closed_by_server()
    finally:
        connection.close()


def test_the_deadline_restarts_after_each_response(start: Callable[..., GatewayServer]) -> None:
    """uvicorn's keep-alive timeout (30 s) is not what closes these: the header deadline is."""
    server = start(header_timeout_s=0.5)
    idle = connect(server.port)
    partial = connect(server.port)
    try:
        for connection in (idle, partial):
            connection.send(request("GET", "/health"))
            assert connection.response()[0] == 200
        partial.send(b"GET /health HTTP/1.1\r\nHost: 1")  # the next request's head, never finished
        received, _ = wait_closed(idle)
        assert received == b""
        received, _ = wait_closed(partial)
        status, headers, body = parse_response(received)
        assert_json_error(status, headers, body, expect_status=408, code="request_timeout", kind="invalid_request_error")
    finally:
        idle.close()
        partial.close()


def test_a_client_within_the_deadline_is_served(start: Callable[..., GatewayServer]) -> None:
    server = start(header_timeout_s=1.0)
    connection = connect(server.port)
    try:
        for _ in range(4):  # keep-alive, with pauses shorter than the deadline
            time.sleep(0.4)
            connection.send(request("GET", "/health"))
            status, headers, _ = connection.response()
            assert status == 200 and headers.get("connection") != "close"
        # a head in three pieces over 0.6 s, after a response: complete in time
        whole = request("GET", "/health")
        connection.send(whole[:10], whole[10:30], whole[30:], pause_s=0.3)
        assert connection.response()[0] == 200
    finally:
        connection.close()


def test_a_slow_body_and_a_long_stream_are_not_cut(
    start: Callable[..., GatewayServer], engine: FakeEngine
) -> None:
    """The deadline covers the head only: a body sent after it, and a stream four times as long
    as it, go through whole."""
    engine.configure(token_delay_s=0.3)  # 7 tokens: a stream of about 2 s
    server = start(header_timeout_s=0.5)
    key = server.new_key()
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    whole = request("POST", "/v1/chat/completions", key=key, body=body, close=True)
    head, _, _ = whole.partition(b"\r\n\r\n")
    connection = connect(server.port, timeout_s=30)
    try:
        connection.send(head + b"\r\n\r\n")
        time.sleep(1.0)  # twice the deadline between the head and the body
        connection.send(body)
        began = time.monotonic()
        received, _ = wait_closed(connection, bound_s=30)
    finally:
        connection.close()
    assert time.monotonic() - began > 1.0  # the stream did outlast the deadline
    status, headers, chunked = parse_response(received)
    assert status == 200, chunked
    assert headers["content-type"].startswith("text/event-stream")
    assert b"data: [DONE]" in chunked
    assert b'"finish_reason":"stop"' in chunked.replace(b" ", b"")


def test_the_deadline_starts_at_the_request_end_when_the_app_answered_first(
    start: Callable[..., GatewayServer],
) -> None:
    """The app answers before reading the body; the body's rest comes later: from its end, the
    connection waits for a next head on the deadline again (not forever)."""
    server = start(header_timeout_s=0.5, wrap=EarlyAnswerApp)
    connection = connect(server.port)
    try:
        connection.send(b"POST /test/early HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n12345")
        status, headers, body = connection.response()
        assert status == 200 and body == b"ok" and headers.get("connection") != "close"
        time.sleep(0.8)  # past the deadline: the request body is not on it
        connection.send(b"67890")
        received, waited = wait_closed(connection)
        assert received == b"" and waited < CLOSE_BOUND_S
    finally:
        connection.close()


# configuration -------------------------------------------------------------------------------


def test_uvicorn_server_takes_the_limits_and_proxies_from_the_settings(
    engine: FakeEngine, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("R1NEST_MAX_HEADER_BYTES", "8192")
    monkeypatch.setenv("R1NEST_HEADER_TIMEOUT_S", "2.5")
    monkeypatch.setenv("R1NEST_TRUSTED_PROXIES", " 10.42.0.0/20, 10.42.16.0/20,127.0.0.1 ")
    settings = load_settings(data_dir=tmp_path, admin_key="r1nadmin-0a0a0a0a0a0a-" + "A" * 43)
    assert (settings.max_header_bytes, settings.header_timeout_s) == (8192, 2.5)
    app = create_app(settings=settings, store=MemoryStore(), upstream=UpstreamConfig(engine.url, ENGINE_KEY, MODEL))
    config = uvicorn_server(app, settings).config
    assert issubclass(config.http, GatewayHttpProtocol)
    assert (config.http.max_header_bytes, config.http.header_timeout_s) == (8192, 2.5)
    assert (GatewayHttpProtocol.max_header_bytes, GatewayHttpProtocol.header_timeout_s) == (64 * 1024, 10.0)
    assert config.proxy_headers is True
    assert config.forwarded_allow_ips == ["10.42.0.0/20", "10.42.16.0/20", "127.0.0.1"]

    for name in ("R1NEST_MAX_HEADER_BYTES", "R1NEST_HEADER_TIMEOUT_S", "R1NEST_TRUSTED_PROXIES"):
        monkeypatch.delenv(name)
    default = make_settings(tmp_path)
    assert (default.max_header_bytes, default.header_timeout_s, default.trusted_proxies) == (64 * 1024, 10.0, "")
    config = uvicorn_server(app, default).config
    assert config.proxy_headers is False  # no X-Forwarded-* believed, from loopback either
    assert config.forwarded_allow_ips == []


@pytest.mark.parametrize("value", ["*", "10.0.0.0/33", "proxy.internal", "127.0.0.1,nope"])
def test_trusted_proxies_must_be_addresses_or_networks(value: str) -> None:
    with pytest.raises(ConfigError, match="R1NEST_TRUSTED_PROXIES"):
        trusted_proxy_networks(value)


def test_trusted_proxies_are_normalised() -> None:
    assert trusted_proxy_networks("") == []
    assert trusted_proxy_networks("10.42.1.7/20, ::1 ,") == ["10.42.0.0/20", "::1"]
