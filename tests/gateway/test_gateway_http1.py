"""The lean upstream client: keep-alive reuse and expiry, stale connections, aborts, bounded
bodies, bodies delimited by the close, the read-idle timeout."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from r1nest.gateway.http1 import ConnectionFailed, Pool
from r1nest.gateway.upstream import Upstream, UpstreamConfig, UpstreamUnreachable

from .conftest import Harness


async def _server(handler) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_connections_are_reused_and_stale_ones_replaced() -> None:
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        served = 0
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            served += 1
            if served == 3:  # the engine's keep-alive timeout: it closes an idle connection
                writer.close()
                return

    server, port = await _server(handle)
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=4, connect_timeout_s=5)
    for _ in range(7):
        async with await pool.request("POST", "/v1/x", b"{}") as response:
            assert response.status == 200 and await response.read(100) == b"ok"
        await asyncio.sleep(0.01)
    assert connections == 3  # reused three times each, replaced when closed
    await pool.close()
    server.close()


async def test_leaving_a_stream_early_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)  # the body, {}
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        if await reader.read(1) == b"":  # the client went away
            closed.set()

    server, port = await _server(handle)
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=4, connect_timeout_s=5)
    async with await pool.request("POST", "/s", b"{}") as response:
        async for chunk in response.iter_chunks():
            assert chunk == b"hello"
            break
    await asyncio.wait_for(closed.wait(), 5)
    server.close()


async def test_broken_and_oversized_answers_fail_cleanly() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    server, port = await _server(handle)
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=4, connect_timeout_s=5)
    with pytest.raises(ConnectionFailed):
        async with await pool.request("POST", "/", b"") as response:
            await response.read(1000)
    with pytest.raises(ConnectionFailed):
        async with await pool.request("POST", "/", b"") as response:
            await response.read(3)
    server.close()
    with pytest.raises(ConnectionFailed):
        await Pool("http://127.0.0.1:1", max_connections=1, connect_timeout_s=2).request("GET", "/")


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head, with its Content-Length body read off; b"" at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return head


async def test_a_body_delimited_by_the_close_is_read_to_the_end() -> None:
    """No Content-Length, no chunked encoding: the body is all that came before a clean close."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        head = await _read_request(reader)
        version = b"HTTP/1.0" if b"/old" in head else b"HTTP/1.1"
        writer.write(version + b" 200 OK\r\nContent-Type: application/json\r\n\r\n")
        for part in (b'{"answer":', b'"all of it"', b"}"):  # in pieces, as a stream would come
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.close()

    server, port = await _server(handle)
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=4, connect_timeout_s=5)
    for path in ("/v1/x", "/old", "/v1/x"):
        async with await pool.request("POST", path, b"{}") as response:
            assert response.status == 200
            assert await response.read(100) == b'{"answer":"all of it"}'
    async with await pool.request("POST", "/v1/x", b"{}") as response:
        assert b"".join([chunk async for chunk in response.iter_chunks()]) == b'{"answer":"all of it"}'
        assert [chunk async for chunk in response.iter_chunks()] == []  # at its end: nothing more
    assert connections == 4  # never reused: the close ended each body
    with pytest.raises(ConnectionFailed):  # still bounded
        async with await pool.request("POST", "/v1/x", b"{}") as response:
            await response.read(5)

    upstream = Upstream(UpstreamConfig(f"http://127.0.0.1:{port}"), read_timeout_s=5)
    await upstream.start()
    answer = await upstream.post("/v1/chat/completions", b"{}")
    assert (answer.status, answer.body) == (200, b'{"answer":"all of it"}')
    await upstream.close()
    await pool.close()
    server.close()


async def test_a_reset_ends_a_close_delimited_body_as_a_failure() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with SO_LINGER 0: a reset, not a clean close

    server, port = await _server(handle)
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=4, connect_timeout_s=5)
    with pytest.raises(ConnectionFailed):
        async with await pool.request("POST", "/", b"{}") as response:
            await response.read(1000)
    server.close()


async def test_a_stalled_stream_fails_after_the_idle_timeout() -> None:
    closed = asyncio.Event()
    requests = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        head = await _read_request(reader)
        requests += 1
        if b"/silent" not in head:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
        if await reader.read(1) == b"":  # the client gave up and closed the connection
            closed.set()

    server, port = await _server(handle)
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=4, connect_timeout_s=5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    received = []
    with pytest.raises(ConnectionFailed, match="no data from upstream"):
        async with await pool.request("POST", "/s", b"{}", idle_timeout_s=0.3) as response:
            async for chunk in response.iter_chunks():
                received.append(chunk)
    assert received == [b"hello"]  # what came before the stall is delivered first
    assert 0.25 < loop.time() - started < 3
    await asyncio.wait_for(closed.wait(), 5)  # so the engine aborts the request

    # silent before the headers too, and a timed-out request is not sent again
    closed.clear()
    requests = 0
    with pytest.raises(ConnectionFailed, match="no data from upstream"):
        await pool.request("POST", "/silent", b"{}", idle_timeout_s=0.3)
    await asyncio.wait_for(closed.wait(), 5)
    assert requests == 1

    # through Upstream: the stream's idle bound, raised as a dropped connection is
    upstream = Upstream(UpstreamConfig(f"http://127.0.0.1:{port}"), read_timeout_s=60, idle_timeout_s=0.3)
    await upstream.start()
    started = loop.time()
    with pytest.raises(ConnectionFailed):
        async with upstream.stream("/v1/chat/completions", b"{}") as response:
            assert response.status == 200
            async for _ in response.iter_chunks():
                pass
    assert loop.time() - started < 3
    with pytest.raises(UpstreamUnreachable):
        async with upstream.stream("/silent", b"{}"):
            pass
    await upstream.close()
    await pool.close()
    server.close()


async def test_a_slow_but_steady_stream_and_a_slow_reader_do_not_time_out() -> None:
    big = 16 * 1024 * 1024  # far more than the socket buffers and BUFFER_HIGH_BYTES: reading pauses

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await _read_request(reader):
            if b"/big" in head:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big)
                writer.write(b"x" * big)
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(8):  # one byte every 0.1 s, 0.8 s in all: never 0.3 s of silence
                await asyncio.sleep(0.1)
                writer.write(b"1\r\nx\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    server, port = await _server(handle)
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=4, connect_timeout_s=5)
    async with await pool.request("POST", "/slow", b"{}", idle_timeout_s=0.3) as response:
        assert await response.read(100) == b"x" * 8
    async with await pool.request("POST", "/big", b"{}", idle_timeout_s=0.3) as response:
        await asyncio.sleep(1.0)  # the reader is slow: the server waits on us, not we on it
        assert len(await response.read(2 * big)) == big
    await pool.close()
    server.close()


async def test_pooled_connections_expire_and_closed_ones_are_replaced() -> None:
    connections = 0
    client_closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        while await _read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        if number == 1:
            client_closed.set()  # EOF from the client: it closed the expired connection

    server, port = await _server(handle)
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=4, connect_timeout_s=5, keepalive_expiry_s=0.2)
    for _ in range(3):  # within the expiry: one connection
        async with await pool.request("POST", "/", b"{}") as response:
            assert await response.read(10) == b"ok"
    assert connections == 1
    await asyncio.sleep(0.4)
    async with await pool.request("POST", "/", b"{}") as response:
        assert await response.read(10) == b"ok"
    assert connections == 2
    await asyncio.wait_for(client_closed.wait(), 5)
    await pool.close()
    server.close()


async def test_a_reused_connection_the_server_closed_unanswered_is_retried_once() -> None:
    """The race keep-alive expiry makes rare: the engine closes an idle connection as a request
    goes out on it. Nothing was answered, so the request goes again on a new connection."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        served = 0
        while await _read_request(reader):
            if number == 1 and served == 1:
                writer.close()  # closes instead of answering the second request
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            served += 1

    server, port = await _server(handle)
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=4, connect_timeout_s=5)
    for _ in range(2):
        async with await pool.request("POST", "/", b"{}") as response:
            assert response.status == 200 and await response.read(10) == b"ok"
    assert connections == 2
    await pool.close()
    server.close()



def test_a_stalled_engine_ends_the_stream_as_an_engine_failure_and_what_streamed_is_paid(harness: Harness) -> None:
    """Through the gateway: the engine stalls after two tokens; the idle bound ends the stream
    (not the 30 s stall, not the stream's time limit), the client gets the engine-failure event,
    the two tokens are paid, and the engine sees the connection close (it aborts the request)."""
    harness.gateway.upstream._idle_timeout_s = 0.5  # what Upstream(idle_timeout_s=...) sets
    harness.engine.configure(hold_after_chunks=2, hold_s=30, reasoning_tokens=20)
    key_id, key = harness.new_key(credits=10_000)
    response = harness.chat(key, stream=True)
    assert response.status_code == 200 and response.elapsed.total_seconds() < 20
    payloads = [block[6:] for block in response.text.split("\n\n") if block.startswith("data: ")]
    assert payloads[-1] == "[DONE]" and "The engine failed while streaming" in payloads[-2]
    assert sum('"reasoning_content"' in payload for payload in payloads) == 2
    aborts = harness.engine.wait_for_aborts(1, timeout_s=20)
    assert aborts[0].completion_tokens_sent == 2
    paid = -sum(p.credits for p in harness.postings(key_id) if p.kind in ("reserve", "settle", "void"))
    assert paid == 4 + 2 * 2  # 4 prompt tokens at 1 credit, 2 completion tokens at 2
