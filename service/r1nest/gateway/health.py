"""The engine's /health, watched: one loop for the gateway, the supervisor and the Modal container.

    outcome = await watch_health(probe, state, interval_s=2.0)

Each round stops if `exited()` says the engine (or its container's gateway) is gone, asks
`probe()`, then waits `interval_s` (`wait`, which may end early when the engine exits). What the
answers do to `state` (EngineState):
- a healthy answer resets the count of failures and makes the state ready (from warming or down);
- `failures_to_act` failed answers in a row while the state is ready (or draining) mean the
  engine is stuck: the state goes down and the watch goes on (`r1nest gateway`: the engine may
  come back), or, given `restart_eta_s`, it goes warming with that ETA and the watch returns
  FAILING so that the caller restarts the engine (`r1nest serve`'s supervisor);
- with `ready_within_s`, an engine that has not been ready by then ends the watch (LATE);
- with `until_ready`, the probing stops at the first healthy answer; then only `exited` is
  watched (the Modal container, whose gateway watches the engine itself).

Plain Python (asyncio and the state only): the Modal app imports it without r1nest's dependencies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from r1nest.gateway.state import EngineState

Outcome = Literal["exited", "failing", "late"]
EXITED: Outcome = "exited"
FAILING: Outcome = "failing"
LATE: Outcome = "late"
FAILURES_TO_ACT = 3  # consecutive failed checks of a ready engine before it counts as stuck

Probe = Callable[[], Awaitable[bool]]


async def watch_health(
    probe: Probe,
    state: EngineState,
    *,
    interval_s: float,
    failures_to_act: int = FAILURES_TO_ACT,
    restart_eta_s: float | None = None,
    exited: Callable[[], bool] = lambda: False,
    wait: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ready_within_s: float | None = None,
    until_ready: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """Keep `state` in step with `probe()` until one of the ends above (or until cancelled)."""
    deadline = None if ready_within_s is None else clock() + ready_within_s
    failures = 0
    probing = True
    while not exited():
        if probing:
            if await probe():
                failures = 0
                state.set_ready()
                probing = not until_ready
                deadline = None  # ready once: the start-up deadline is met
            else:
                failures += 1
                if failures >= failures_to_act and state.phase in ("ready", "draining"):
                    if restart_eta_s is not None:
                        state.set_warming(restart_eta_s)
                        return FAILING
                    state.set_down()
            if deadline is not None and clock() > deadline:
                return LATE
        await wait(interval_s)
    return EXITED
