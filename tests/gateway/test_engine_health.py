"""The one engine-health loop (r1nest.gateway.health) in each of its callers' modes, on a fake clock."""

from __future__ import annotations

import asyncio

from r1nest.gateway.health import EXITED, FAILING, LATE, watch_health
from r1nest.gateway.state import EngineState


class Script:
    """Answers /health from a list, then stops the watch (exited) when the list runs out."""

    def __init__(self, answers: list[bool]) -> None:
        self.answers = list(answers)
        self.phases: list[str] = []
        self.now = 0.0
        self.state = EngineState(phase="warming", clock=lambda: self.now)

    async def probe(self) -> bool:
        return self.answers.pop(0)

    def exited(self) -> bool:
        return not self.answers

    async def wait(self, seconds: float) -> None:
        self.phases.append(self.state.phase)
        self.now += seconds


def run(script: Script, **options: object) -> str:
    return asyncio.run(watch_health(script.probe, script.state, interval_s=2.0, exited=script.exited,
                                    wait=script.wait, clock=lambda: script.now, **options))  # type: ignore[arg-type]


def test_the_gateway_goes_down_after_three_failures_and_back_up() -> None:
    script = Script([True, False, False, False, False, True])
    assert run(script) == EXITED
    assert script.phases == ["ready", "ready", "ready", "down", "down", "ready"]


def test_failures_while_warming_never_mark_the_engine_down() -> None:
    script = Script([False] * 5)
    assert run(script) == EXITED
    assert script.phases == ["warming"] * 5


def test_the_supervisor_restarts_a_stuck_engine() -> None:
    script = Script([True, False, True, False, False, False, True])
    assert run(script, restart_eta_s=42.0) == FAILING
    assert script.state.phase == "warming" and script.state.eta_s == 42.0
    assert script.answers == [True]  # the watch ended at the third failure in a row


def test_the_container_leaves_when_the_engine_is_late_and_stops_probing_once_ready() -> None:
    assert run(Script([False] * 100), ready_within_s=10.0) == LATE
    script = Script([False, True] + [False] * 10)
    probes = []
    original = script.probe

    async def counted() -> bool:
        probes.append(1)
        return await original()

    script.probe = counted  # type: ignore[method-assign]
    outcome = asyncio.run(watch_health(script.probe, script.state, interval_s=2.0, ready_within_s=3.0,
                                       until_ready=True, exited=lambda: len(script.phases) >= 20,
                                       wait=script.wait, clock=lambda: script.now))
    assert outcome == EXITED and len(probes) == 2 and script.state.phase == "ready"
