"""The ports r1nest listens on, one definition each.

The settings' defaults, the planner's printed engine command, the AWS stack and the Modal app
all read them from here. Plain Python: the Modal app and the Pulumi program import it too.
"""

from __future__ import annotations

GATEWAY_PORT = 8000  # the gateway: the one port clients reach
ENGINE_PORT = 8100  # the engine's own listener: loopback only (or the nodes' own network), never public
