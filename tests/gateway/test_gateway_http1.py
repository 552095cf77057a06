"""The lean upstream client: keep-alive reuse, stale connections, aborts, bounded bodies."""

from __future__ import annotations

import asyncio

import pytest

from r1nest.gateway.http1 import ConnectionFailed, Pool


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
