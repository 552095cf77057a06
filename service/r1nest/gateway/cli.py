"""`r1nest gateway`: the gateway alone, in front of a running OpenAI-compatible engine.

Served with uvicorn (uvloop + httptools), one worker, through http_protocol.GatewayHttpProtocol
(method names in any case, JSON bodies for what uvicorn itself refuses). SIGTERM/SIGINT drain
first: new requests get 503, open ones get `drain_timeout_s` to finish, then are cut and settled;
a second signal exits at once. Uvicorn's own access log is off: it would print raw URLs; the
gateway's access log prints route names and key ids only.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import click

from r1nest.gateway.state import EngineState
from r1nest.gateway.upstream import UpstreamConfig
from r1nest.ports import ENGINE_PORT, GATEWAY_PORT
from r1nest.settings import Settings, load_settings


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("r1nest")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def trusted_proxy_networks(value: str) -> list[str]:
    """`R1NEST_TRUSTED_PROXIES` (comma-separated IP addresses and CIDR networks) as uvicorn's
    `forwarded_allow_ips`; ConfigError for anything else (uvicorn would take a typo, or `*`, as a
    literal or as "trust everyone" without a word)."""
    import ipaddress

    from r1nest.errors import ConfigError

    networks = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            network = ipaddress.ip_network(item, strict=False) if "/" in item else ipaddress.ip_address(item)
        except ValueError:
            raise ConfigError(
                f"R1NEST_TRUSTED_PROXIES: {item!r} is not an IP address or a CIDR network (e.g. 10.42.0.0/20)"
            ) from None
        networks.append(str(network))
    return networks


def uvicorn_server(app: Any, settings: Settings, **config: Any) -> Any:
    """A uvicorn Server for `app` whose exit signals drain the gateway first.

    Served through http_protocol.GatewayHttpProtocol with the settings' limits: request heads over
    `max_header_bytes` get 431, a connection that has not sent a whole request head within
    `header_timeout_s` of opening (or of its previous response) is closed (408 when part of a
    head came). `X-Forwarded-For` / `X-Forwarded-Proto` are believed only from the peers in
    `trusted_proxies` (uvicorn's default, loopback, would let any local client pick its address
    and scheme); empty: from no one, the client is the TCP peer. `config` overrides any option.
    """
    import uvicorn

    from r1nest.gateway.http_protocol import GatewayHttpProtocol

    gateway = app.state.gateway

    class DrainingServer(uvicorn.Server):
        draining = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.draining:  # second signal: stop now
                return super().handle_exit(sig, frame)
            self.draining = True
            loop = asyncio.get_event_loop()

            async def drain_then_exit() -> None:
                await gateway.drain(settings.drain_timeout_s)
                super(DrainingServer, self).handle_exit(sig, frame)

            loop.call_soon_threadsafe(lambda: loop.create_task(drain_then_exit()))

    protocol = GatewayHttpProtocol.configured(
        max_header_bytes=settings.max_header_bytes, header_timeout_s=settings.header_timeout_s
    )
    proxies = trusted_proxy_networks(settings.trusted_proxies)
    options: dict[str, Any] = dict(
        host=settings.host, port=settings.port, loop="uvloop", http=protocol, lifespan="on",
        access_log=False, log_config=None, log_level=settings.log_level, server_header=False,
        backlog=2048, timeout_keep_alive=30, limit_concurrency=None,
        proxy_headers=bool(proxies), forwarded_allow_ips=proxies,
    )
    options.update(config)
    return DrainingServer(uvicorn.Config(app, **options))


def engine_model(upstream_url: str, api_key: str | None, *, timeout_s: float = 5.0) -> str | None:
    """The model a running engine serves (its /v1/models), or None when it does not answer."""
    import json
    import urllib.request

    request = urllib.request.Request(upstream_url.rstrip("/") + "/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            models = json.loads(response.read(1024 * 1024))["data"]
        model = models[0]["id"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return model if isinstance(model, str) and model else None


def run_gateway(settings: Settings, *, state: EngineState | None = None, probe_upstream: bool = True) -> None:
    """Open the store, build the app and serve it until a signal."""
    from r1nest.errors import ConfigError
    from r1nest.gateway.app import create_app
    from r1nest.ledger import open_store

    if not settings.upstream_url:
        raise ConfigError("the gateway needs an upstream engine URL (--upstream or R1NEST_UPSTREAM_URL)")
    if not settings.upstream_url.startswith("http://"):
        raise ConfigError(
            f"the upstream must be a plain http:// URL on loopback or a private network, got {settings.upstream_url!r}"
        )
    configure_logging(settings.log_level)
    api_key = settings.upstream_key.get_secret_value() if settings.upstream_key else None
    served_model = settings.served_model or engine_model(settings.upstream_url, api_key) or settings.model
    upstream = UpstreamConfig(url=settings.upstream_url, api_key=api_key, served_model=served_model)
    store = open_store(settings)
    if state is None:
        state = EngineState()
        state.set_warming(None)  # until the engine's /health answers
    app = create_app(settings=settings, store=store, upstream=upstream, state=state, probe_upstream=probe_upstream)
    server = uvicorn_server(app, settings)
    try:
        server.run()
    finally:
        asyncio.run(store.close())
    if not server.started:
        raise ConfigError(f"the gateway could not start on {settings.host}:{settings.port}")


@click.command()
@click.option("--upstream", "upstream_url", help=f"Base URL of the engine, e.g. http://127.0.0.1:{ENGINE_PORT}.")
@click.option("--upstream-key", help="The engine's API key (prefer R1NEST_UPSTREAM_KEY: flags show in ps).")
@click.option("--served-model", help="The model name clients use (default: what the engine's /v1/models lists).")
@click.option("--host", help="Listen address (default 0.0.0.0).")
@click.option("--port", type=int, help=f"Listen port (default {GATEWAY_PORT}).")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where the SQLite ledger and admin key live.")
def gateway(
    upstream_url: str | None, upstream_key: str | None, served_model: str | None, host: str | None,
    port: int | None, data_dir: Path | None,
) -> None:
    """Run the gateway (API keys, credits, OpenAI-compatible proxy) in front of an engine.

    Other settings come from R1NEST_* variables or the TOML file named by R1NEST_CONFIG.
    """
    settings = load_settings(
        upstream_url=upstream_url, upstream_key=upstream_key, served_model=served_model,
        host=host, port=port, data_dir=data_dir,
    )
    run_gateway(settings)
