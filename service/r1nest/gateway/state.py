"""What the gateway knows of its engine: warming (with an ETA), ready, down, or draining."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal

Phase = Literal["warming", "ready", "down", "draining"]
PHASES: tuple[Phase, ...] = ("warming", "ready", "down", "draining")


@dataclass
class EngineState:
    phase: Phase = "ready"
    eta_s: float | None = None  # seconds until ready, as estimated when set_warming was called
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _eta_set_at: float = field(default=0.0, repr=False)

    def set_ready(self) -> None:
        if self.phase != "draining":
            self.phase, self.eta_s = "ready", None

    def set_warming(self, eta_s: float | None = None) -> None:
        if self.phase != "draining":
            self.phase, self.eta_s, self._eta_set_at = "warming", eta_s, self.clock()

    def set_down(self) -> None:
        if self.phase != "draining":
            self.phase, self.eta_s = "down", None

    def set_draining(self) -> None:
        self.phase, self.eta_s = "draining", None

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    def eta_remaining_s(self) -> float | None:
        if self.phase != "warming" or self.eta_s is None:
            return None
        return max(self.eta_s - (self.clock() - self._eta_set_at), 0.0)

    def retry_after_s(self) -> int:
        """Seconds a client should wait before retrying (the Retry-After header)."""
        eta = self.eta_remaining_s()
        if eta is not None:
            return max(1, min(int(eta) + 1, 600))
        return 30 if self.phase == "down" else 5
