"""The deployment overview page: endpoints, ApiKey, credits, readiness and working examples.

    context.py   OverviewContext: what the page shows, validated
    examples.py  the curl / Python / JavaScript examples (the one place their text is written)
    render.py    HTML for the gateway (assets as files, strict CSP) or a standalone file (inlined)
    web.py       the login's sessions and limiter (its routes: r1nest.control.overview)
    sources.py   contexts from a local data dir, a Pulumi stack or a Modal app
    cli.py       `r1nest overview`
"""

from typing import Any

from r1nest.overview.context import OverviewContext, Readiness
from r1nest.overview.render import render_overview

__all__ = ["OverviewContext", "Readiness", "render_overview", "overview_routes"]


def __getattr__(name: str) -> Any:  # the routes pull in Starlette only when they are wanted
    if name == "overview_routes":
        from r1nest.control.overview import overview_routes

        return overview_routes
    raise AttributeError(name)
