"""The gateway's HTTP protocol (r1nest.gateway.http_protocol) on a real server.

The server is the one `r1nest gateway` and `r1nest serve` run: `uvicorn_server` (uvloop, the
gateway's httptools protocol), on a loopback port, in front of the fake engine; clients are the
real `curl` binary (Computing Nest's documented example sends `-X Post`) and raw sockets, so
each byte on the wire is the test's.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from r1nest.gateway.app import create_app
from r1nest.gateway.cli import uvicorn_server
from r1nest.gateway.http_protocol import normalise_method
from r1nest.gateway.state import EngineState
from r1nest.gateway.upstream import UpstreamConfig
from r1nest.ledger.memory import MemoryStore
from r1nest.testing.fake_engine import FakeEngine

from .conftest import ADMIN_KEY, ENGINE_KEY, MODEL, make_settings

CHAT_BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
ERROR_KEYS = {"message", "type", "param", "code"}


class GatewayServer:
    """`uvicorn_server(app, settings)` serving on 127.0.0.1 from a background thread."""

    def __init__(self, app: Any, settings: Any, **config: Any) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn_server(app, settings, **config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.01)

    def new_key(self) -> str:
        response = httpx.post(
            self.url + "/admin/keys", json={"name": "proto", "credits": 1_000_000},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10,
        )
        assert response.status_code == 201, response.text
        return response.json()["key"]

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(20)
        self._sock.close()


class EchoAndBoomApp:
    """Wraps the gateway app with two test-only routes, to see what reaches an app."""

    def __init__(self, app: Any) -> None:
        self.state = app.state  # uvicorn_server drains app.state.gateway
        self._app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/test/boom":
            raise RuntimeError("a bug before the response started")
        if scope["type"] == "http" and scope["path"] == "/test/echo":
            body, more = b"", True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            payload = json.dumps({"method": scope["method"], "body": body.decode("latin-1")}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        await self._app(scope, receive, send)


@pytest.fixture
def serve(engine: FakeEngine, tmp_path: Any) -> Iterator[Callable[..., GatewayServer]]:
    started: list[GatewayServer] = []

    def start(*, wrap: Callable[[Any], Any] | None = None, **config: Any) -> GatewayServer:
        settings = make_settings(tmp_path, host="127.0.0.1")
        app = create_app(
            settings=settings, store=MemoryStore(), upstream=UpstreamConfig(engine.url, ENGINE_KEY, MODEL),
            state=EngineState(),
        )
        server = GatewayServer(wrap(app) if wrap else app, settings, **config)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def gateway(serve: Callable[..., GatewayServer]) -> GatewayServer:
    return serve()


# clients -------------------------------------------------------------------------------------


def curl(*args: str) -> tuple[int, bytes]:
    """(status, body) of the real curl binary's request."""
    binary = shutil.which("curl")
    if binary is None:
        pytest.skip("curl is not installed")
    done = subprocess.run(
        [binary, "-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


class RawConnection:
    """One TCP connection: send bytes exactly as given, read whole responses back."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def send(self, *pieces: bytes, pause_s: float = 0.2) -> None:
        """Each piece in its own send, with a pause between, so the server reads them apart."""
        for index, piece in enumerate(pieces):
            if index:
                time.sleep(pause_s)
            self.sock.sendall(piece)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: (status, headers with lower-case names, body)."""
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed before a response; got {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        assert "content-length" in headers, head
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            assert self._fill(), "connection closed in the middle of a body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split(" ")[1]), headers, body

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def request(method: str, path: str, *, key: str | None = None, body: bytes = b"", close: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_chat_completion(status: int, body: bytes) -> None:
    assert status == 200, body
    completion = json.loads(body)
    assert completion["object"] == "chat.completion"
    assert completion["model"] == MODEL
    assert completion["choices"][0]["message"]["role"] == "assistant"


def assert_json_error(
    status: int, headers: dict[str, str], body: bytes, *, expect_status: int, code: str, kind: str
) -> dict[str, Any]:
    assert status == expect_status, body
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert set(error) == ERROR_KEYS
    assert error["type"] == kind and error["code"] == code and error["param"] is None
    assert isinstance(error["message"], str) and error["message"]
    return error


def assert_refused(response: tuple[int, dict[str, str], bytes]) -> dict[str, Any]:
    status, headers, body = response
    return assert_json_error(
        status, headers, body, expect_status=400, code="invalid_http_request", kind="invalid_request_error"
    )


# method names in any case --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["Post", "post"])
def test_curl_with_a_case_variant_method_gets_a_chat_completion(gateway: GatewayServer, method: str) -> None:
    """Computing Nest's documented example, exactly as written (`-X Post`)."""
    key = gateway.new_key()
    status, body = curl(
        "-X", method, gateway.url + "/v1/chat/completions", "-H", "Content-Type: application/json",
        "-H", f"Authorization: Bearer {key}", "-d", CHAT_BODY,
    )
    assert_chat_completion(status, body)


def test_curl_with_an_unknown_method_gets_a_json_400(gateway: GatewayServer) -> None:
    status, body = curl("-X", "FOO", gateway.url + "/v1/models")
    assert status == 400, body
    assert json.loads(body)["error"]["code"] == "invalid_http_request"


@pytest.mark.parametrize("method", ["gEt", "get", "Get"])
def test_get_in_any_case_reaches_the_route(gateway: GatewayServer, method: str) -> None:
    key = gateway.new_key()
    connection = RawConnection(gateway.port)
    try:
        connection.send(request(method, "/v1/models", key=key, close=True))
        status, _, body = connection.response()
    finally:
        connection.close()
    assert status == 200, body
    assert json.loads(body)["data"][0]["id"] == MODEL


def test_keep_alive_second_request_with_a_case_variant_method_is_served(gateway: GatewayServer) -> None:
    key = gateway.new_key()
    connection = RawConnection(gateway.port)
    try:
        connection.send(request("GET", "/v1/models", key=key))
        status, headers, body = connection.response()
        assert status == 200, body
        assert headers.get("connection") != "close"
        connection.send(request("Post", "/v1/chat/completions", key=key, body=CHAT_BODY.encode()))
        assert_chat_completion(*connection.response()[::2])
        connection.send(request("pAtCh", "/v1/models", key=key, close=True))  # a third: the route answers 405
        status, headers, body = connection.response()
        assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"
    finally:
        connection.close()


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param((b"Po", b"st /v1/chat/completions HTTP/1.1\r\n"), id="Po|st"),
        pytest.param((b"P", b"o", b"s", b"t", b" /v1/chat/completions HTTP/1.1\r\n"), id="byte-by-byte"),
        pytest.param((b"Post", b" /v1/chat/completions HTTP/1.1\r\n"), id="Post|space"),
    ],
)
def test_a_request_line_split_across_sends_is_served(gateway: GatewayServer, pieces: tuple[bytes, ...]) -> None:
    key = gateway.new_key()
    rest = request("POST", "/v1/chat/completions", key=key, body=CHAT_BODY.encode(), close=True)
    rest = rest.split(b"\r\n", 1)[1]  # the headers and body, after the request line
    connection = RawConnection(gateway.port)
    try:
        connection.send(*pieces[:-1], pieces[-1] + rest)
        assert_chat_completion(*connection.response()[::2])
    finally:
        connection.close()


def test_a_split_request_line_on_a_keep_alive_connection_is_served(gateway: GatewayServer) -> None:
    key = gateway.new_key()
    connection = RawConnection(gateway.port)
    try:
        connection.send(request("GET", "/v1/models", key=key))
        assert connection.response()[0] == 200
        second = request("post", "/v1/chat/completions", key=key, body=CHAT_BODY.encode(), close=True)
        connection.send(second[:2], second[2:])
        assert_chat_completion(*connection.response()[::2])
    finally:
        connection.close()


def test_only_the_method_token_is_rewritten(serve: Callable[..., GatewayServer]) -> None:
    """Bytes inside a request (a body read apart from its headers) reach the app as sent."""
    server = serve(wrap=EchoAndBoomApp)
    body = b"post /v1/x HTTP/1.1\r\n"
    connection = RawConnection(server.port)
    try:
        whole = request("Post", "/test/echo", body=body)
        head, _, _ = whole.partition(b"\r\n\r\n")
        connection.send(head + b"\r\n\r\n", body)  # the body starts a read of its own
        status, _, answer = connection.response()
        assert status == 200, answer
        assert json.loads(answer) == {"method": "POST", "body": body.decode()}
        # A pipelined request in the same read as the previous one's end goes to the parser as is.
        connection.send(request("POST", "/test/echo", body=b"get") + request("PUT", "/test/echo", body=b"put x"))
        assert json.loads(connection.response()[2]) == {"method": "POST", "body": "get"}
        assert json.loads(connection.response()[2]) == {"method": "PUT", "body": "put x"}
    finally:
        connection.close()


def test_normalise_method() -> None:
    assert normalise_method(b"Post /x HTTP/1.1\r\n") == b"POST /x HTTP/1.1\r\n"
    assert normalise_method(b"\r\noptions * HTTP/1.1\r\n") == b"\r\nOPTIONS * HTTP/1.1\r\n"
    assert normalise_method(b"GET / HTTP/1.1\r\n") == b"GET / HTTP/1.1\r\n"
    for kept in (b"FOO / HTTP/1.1", b"Connect x:1 HTTP/1.1", b"propfind / HTTP/1.1", b"\x00\x01 nonsense", b"\r\n"):
        assert normalise_method(kept) == kept
    for partial in (b"P", b"po", b"\r\nDel", b"OPTIONS", b"options"):
        assert normalise_method(partial) is None  # hold: the token may not be whole yet
    for decided in (b"X", b"Postx", b"OPTIONSX", b"\x00"):
        assert normalise_method(decided) == decided


# JSON errors ---------------------------------------------------------------------------------


def test_an_invalid_method_gets_a_json_400(gateway: GatewayServer) -> None:
    connection = RawConnection(gateway.port)
    try:
        connection.send(b"FOO /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        error = assert_refused(connection.response())
        assert "method" in error["message"].lower()
        assert connection.closed_by_server()
    finally:
        connection.close()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x00\x01 nonsense\r\n\r\n", id="garbage"),
        pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: x\r\n\r\n", id="bad-header"),
        pytest.param(b"GET /v1/models NOTHTTP\r\n\r\n", id="bad-request-line"),
    ],
)
def test_what_the_parser_refuses_gets_a_json_400(gateway: GatewayServer, data: bytes) -> None:
    connection = RawConnection(gateway.port)
    try:
        connection.send(data)
        assert_refused(connection.response())
        assert connection.closed_by_server()
    finally:
        connection.close()


def test_an_app_that_raises_before_answering_gets_a_json_500(serve: Callable[..., GatewayServer]) -> None:
    server = serve(wrap=EchoAndBoomApp)
    connection = RawConnection(server.port)
    try:
        connection.send(request("GET", "/test/boom"))
        status, headers, body = connection.response()
        error = assert_json_error(status, headers, body, expect_status=500, code="internal_error", kind="server_error")
        assert "boom" not in error["message"] and "Traceback" not in error["message"]
    finally:
        connection.close()


def test_over_the_concurrency_limit_gets_a_json_503(serve: Callable[..., GatewayServer]) -> None:
    server = serve(limit_concurrency=1)  # the connection itself counts: every request is over it
    connection = RawConnection(server.port)
    try:
        connection.send(request("GET", "/health"))
        status, headers, body = connection.response()
        assert_json_error(status, headers, body, expect_status=503, code="server_busy", kind="server_error")
        assert headers["retry-after"] == "1"
    finally:
        connection.close()
