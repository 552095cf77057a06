"""Stopping a request's work early: when its client disconnects, or when a drain runs out of time.

`Interruptible` is an async context manager around the part of a handler that talks to the
engine. Interrupting cancels the handler's task inside the block (so the upstream connection is
closed and the engine aborts); the block then exits quietly with `reason` set, and the handler
settles what was produced.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from r1nest.gateway.exchange import Receive

Reason = Literal["client", "drain"]


class Interruptible:
    __slots__ = ("_receive", "_registry", "_task", "_watcher", "_inside", "reason")

    def __init__(self, receive: Receive | None, registry: set["Interruptible"]) -> None:
        self._receive = receive  # None: do not watch the client (whole answers run to the end)
        self._registry = registry
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._inside = False
        self.reason: Reason | None = None

    async def __aenter__(self) -> "Interruptible":
        self._task = asyncio.current_task()
        self._inside = True
        self._registry.add(self)
        if self._receive is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        self._inside = False
        self._registry.discard(self)
        if self._watcher is not None:
            self._watcher.cancel()
        if self.reason is not None and exc_type is asyncio.CancelledError:
            assert self._task is not None
            self._task.uncancel()
            return True
        return False

    def interrupt(self, reason: Reason) -> None:
        if self._inside and self.reason is None and self._task is not None:
            self.reason = reason
            self._task.cancel()

    async def _watch(self) -> None:
        assert self._receive is not None
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.interrupt("client")
                return
