"""Serve an ASGI app (the gateway) with uvicorn on 127.0.0.1 in a background thread, for tests.

    with ServedApp(app) as served:
        httpx.get(served.url + "/health")

A real HTTP server: real sockets, real disconnects, real lifespan; the app runs on the
thread's own event loop, so async stores are used from that loop only.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any


class ServedApp:
    def __init__(self, app: Any, *, log_level: str = "warning") -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, loop="asyncio", http="httptools", lifespan="on", access_log=False,
                log_config=None, log_level=log_level, timeout_graceful_shutdown=5,
            )
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "ServedApp":
        def run() -> None:
            self.loop = asyncio.new_event_loop()
            try:
                self.loop.run_until_complete(self.server.serve(sockets=[self._sock]))
            finally:
                self.loop.close()

        self._thread = threading.Thread(target=run, name="asgi-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the app did not start (see its log)")
            time.sleep(0.01)
        return self

    def call(self, coroutine: Any, timeout_s: float = 30.0) -> Any:
        """Run a coroutine on the server's loop (e.g. a store call) and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def stop(self) -> None:
        if self._thread is not None:
            self.server.should_exit = True
            self._thread.join(20)
            self._thread = None
        self._sock.close()

    def __enter__(self) -> "ServedApp":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
