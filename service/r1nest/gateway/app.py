"""The gateway as an ASGI application: routing, auth, credits and the proxy wired together.

    create_app(settings=..., store=..., upstream=UpstreamConfig(...)) -> ASGI app

A lean ASGI app rather than a framework router: the hot path (route, authenticate, reserve,
forward, settle) stays a few function calls deep. Handlers are thin; the rules live in
routing.py, auth.py, shaping.py, pricing.py, metering.py and proxy.py. The control plane (admin
API, /v1/credits, /v1/usage, /overview) is a FastAPI app of its own (r1nest/control/), to which
`_dispatch` hands the routes routing.py matches as control routes.
`app.state.gateway` is the `Gateway`, whose `drain(timeout_s)` stops it gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, MutableMapping

from r1nest.errors import (
    ApiError,
    BadRequest,
    InsufficientCredits,
    InternalError,
    KeyLimitReached,
    MethodNotAllowed,
    NotFound,
    StoreError,
    StoreUnavailable,
    Unauthorized,
    Unavailable,
    UnknownKey,
    store_unavailable,
)
from r1nest.gateway import anthropic, metering, proxy, routing
from r1nest.gateway.auth import INVALID_KEY_MESSAGE, AdminKey, authenticate
from r1nest.gateway.exchange import ClientGone, Exchange, Receive, Scope, Send
from r1nest.gateway.interrupts import Interruptible
from r1nest.gateway.metrics import Metrics
from r1nest.gateway.pricing import Price
from r1nest.gateway.ratelimit import rate_limited
from r1nest.gateway.settlements import JOURNAL_FILE, Settlements
from r1nest.gateway.routing import Kind, Match, NoMatch
from r1nest.gateway.shaping import Policy, Shaped, fit_context, parse_body, shape, upstream_body
from r1nest.gateway.state import EngineState
from r1nest.gateway.upstream import Upstream, UpstreamConfig, watch_health
from r1nest.ledger.base import KeyRecord, Store
from r1nest.settings import Settings

if TYPE_CHECKING:
    from r1nest.overview.context import OverviewContext

log = logging.getLogger("r1nest.gateway")
access_log = logging.getLogger("r1nest.gateway.access")

ENGINE_PATHS = {
    Kind.CHAT: "/v1/chat/completions", Kind.COMPLETIONS: "/v1/completions", Kind.MESSAGES: "/v1/chat/completions",
}
SWEEP_INTERVAL_S = 300.0
DRAIN_SETTLE_GRACE_S = 10.0


class Gateway:
    """The gateway's run-time state: one per app (no module globals)."""

    def __init__(
        self, *, settings: Settings, store: Store, upstream: UpstreamConfig, state: EngineState,
        clock: Callable[[], float], admin_key: str, probe_upstream: bool,
    ) -> None:
        self.settings = settings
        self.store = store
        self.upstream_config = upstream
        self.upstream = Upstream(upstream, read_timeout_s=settings.stream_timeout_s,
                                 idle_timeout_s=settings.stream_idle_timeout_s)
        self.state = state
        self.clock = clock
        self.admin = AdminKey(admin_key)
        self.price = Price.from_settings(settings)
        self.policy = Policy(
            served_model=upstream.served_model,
            max_messages=settings.max_messages,
            max_tokens_cap=settings.max_tokens_cap,
            deepseek_defaults=settings.deepseek_defaults,
            fold_system_prompt=settings.fold_system_prompt,
            default_temperature=settings.default_temperature,
            default_top_p=settings.default_top_p,
        )
        self.metrics = Metrics()
        # vLLM takes `thinking_token_budget` (with --reasoning-config, which r1nest's profiles set);
        # SGLang has no such field and would ignore it silently: refused there
        self.thinking_budget = settings.engine == "vllm"
        self.settlements = Settlements(store, Path(settings.data_dir).expanduser() / JOURNAL_FILE, clock=clock)
        self.interruptibles: set[Interruptible] = set()
        self.open_requests = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._probe_upstream = probe_upstream
        self._background: list[asyncio.Task[None]] = []
        self.control: Any = None  # the control plane's ASGI app (control/app.py), set by create_app
        self.swept_at_startup: int | None = None

    # lifecycle ------------------------------------------------------------------------------

    async def startup(self) -> None:
        await self.upstream.start()
        # journaled settles first: the sweep must never void a reservation whose answer went out
        if await self.settlements.retry_pending():
            log.warning("settlements journaled by an earlier run are still pending: the sweep waits for them")
        else:
            try:
                self.swept_at_startup = await self.store.sweep_expired(now=self.clock())
            except StoreUnavailable as exc:  # the periodic sweep tries again; requests get 503 meanwhile
                log.warning("startup sweep skipped, the ledger is unavailable: %s", exc)
        if self.swept_at_startup:
            log.warning("voided %d expired reservation(s) left by an earlier run", self.swept_at_startup)
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._sweep_forever()))
        self._background.append(loop.create_task(self.settlements.retry_forever()))
        if self._probe_upstream:
            self._background.append(loop.create_task(watch_health(self.upstream, self.state)))

    async def shutdown(self) -> None:
        if self.open_requests:
            await self.drain(self.settings.drain_timeout_s)
        for task in self._background:
            task.cancel()
        await self.upstream.close()

    async def _sweep_forever(self) -> None:
        interval_s = min(SWEEP_INTERVAL_S, self.settings.reservation_ttl_s / 4)
        while True:
            await asyncio.sleep(interval_s)
            try:
                if await self.settlements.retry_pending():
                    continue  # the ledger still refuses them: sweep next time, after they commit
                swept = await self.store.sweep_expired(now=self.clock())
            except StoreError as exc:
                log.error("sweep of expired reservations failed: %s", exc)
                continue
            if swept:
                log.warning("voided %d expired reservation(s)", swept)

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests (503), wait up to `timeout_s` for open ones, then abort the rest
        (they settle what was produced) and wait for their settlement."""
        self.state.set_draining()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        if self.open_requests:
            log.warning("drain deadline: aborting %d open request(s)", self.open_requests)
            for interruptible in list(self.interruptibles):
                interruptible.interrupt("drain")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_SETTLE_GRACE_S):
                    await self._idle.wait()

    # requests -------------------------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started_s = time.perf_counter()
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
        raw_path = raw_path.split(b"?", 1)[0]
        route = routing.match(scope["method"], raw_path)
        route_name = route.kind.value if isinstance(route, Match) else "unmatched"
        exchange = Exchange(scope, receive, send, route_name)
        self.open_requests += 1
        self.metrics.open_requests = self.open_requests
        self._idle.clear()
        try:
            await self._dispatch(exchange, route)
        except ApiError as exc:
            await self._answer_error(exchange, exc)
        except StoreUnavailable as exc:  # any path that reached the ledger during an outage
            log.warning("the ledger is unavailable route=%s key_id=%s: %s", route_name, exchange.key_id or "-", exc)
            await self._answer_error(exchange, store_unavailable())
        except ClientGone:
            exchange.status = 499
        except Exception:  # noqa: BLE001 - the one place that turns a bug into a generic 500
            log.exception("internal error route=%s key_id=%s", route_name, exchange.key_id or "-")
            await self._answer_error(exchange, InternalError("Internal error."))
        finally:
            self.open_requests -= 1
            self.metrics.open_requests = self.open_requests
            if not self.open_requests:
                self._idle.set()
            duration_s = time.perf_counter() - started_s
            self.metrics.observe_request(route_name, exchange.status, duration_s)
            access_log.info(
                "%s %s %d %.1fms key_id=%s %s", scope["method"], route_name, exchange.status,
                duration_s * 1000, exchange.key_id or "-", exchange.note,
            )

    async def _answer_error(self, exchange: Exchange, exc: ApiError) -> None:
        if not exchange.started:
            await exchange.error(exc)
        elif not exchange.finished:  # a stream cut by a fault: end it the way streams end
            await exchange.body(anthropic.error_tail(exc) if exchange.anthropic else proxy.error_tail(exc))

    async def _dispatch(self, exchange: Exchange, route: Match | NoMatch) -> None:
        if isinstance(route, NoMatch):
            if route.status == 405:
                raise MethodNotAllowed(
                    f"Method {exchange.scope['method']} is not allowed here.",
                    headers={"Allow": ", ".join(sorted(route.allow))},
                )
            raise NotFound(
                "Unknown URL. See /v1/models, /v1/chat/completions, /v1/completions, /v1/messages, /v1/credits, /v1/usage."
            )
        kind = route.kind
        if kind is Kind.CHAT or kind is Kind.COMPLETIONS or kind is Kind.MESSAGES:
            exchange.anthropic = kind is Kind.MESSAGES
            await self._completion(exchange, kind)
        elif kind is Kind.COUNT_TOKENS:
            exchange.anthropic = True
            await self._count_tokens(exchange)
        elif kind is Kind.HEALTH:
            await self._health(exchange)
        elif kind is Kind.MODELS:
            await self._authenticated(exchange)
            await exchange.json(200, self._models())
        elif kind is Kind.METRICS:
            self.admin.require(exchange.headers)
            await exchange.respond(
                200, self.metrics.render(self.state).encode(), content_type=b"text/plain; version=0.0.4; charset=utf-8"
            )
        else:  # routing.CONTROL: the admin API, /v1/credits, /v1/usage, /overview
            await self._control(exchange)

    async def _authenticated(self, exchange: Exchange) -> KeyRecord:
        try:
            record = await authenticate(self.store, exchange.headers, now=self.clock())
        except StoreUnavailable:
            raise store_unavailable() from None
        exchange.key_id = record.key_id
        exchange.remaining_credits = record.remaining_credits
        return record

    def _models(self) -> dict[str, Any]:
        model = self.upstream_config.served_model
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "r1nest"}]}

    def _unavailable(self) -> Unavailable:
        phase = self.state.phase
        retry = str(self.state.retry_after_s())
        messages = {
            "warming": "The engine is warming up; retry shortly.",
            "down": "The engine is down; retry later.",
            "draining": "The server is shutting down; retry on another replica or shortly.",
        }
        return Unavailable(messages.get(phase, "The engine is not ready."), headers={"Retry-After": retry})

    async def _health(self, exchange: Exchange) -> None:
        state = self.state
        body: dict[str, Any] = {"status": state.phase}
        eta = state.eta_remaining_s()
        if eta is not None:
            body["eta_s"] = round(eta, 1)
        if state.ready:
            await exchange.json(200, body)
        else:
            await exchange.json(503, body, extra={"Retry-After": str(state.retry_after_s())})

    async def _completion(self, exchange: Exchange, kind: Kind) -> None:
        record = await self._authenticated(exchange)
        if not self.state.ready:
            raise self._unavailable()
        raw = await exchange.read_body(self.settings.max_body_bytes)
        body = parse_body(raw)
        stop_sequences: list[str] = []
        if kind is Kind.MESSAGES:
            body = anthropic.to_chat(body, thinking_budget=self.thinking_budget)
            stop_sequences = body.get("stop") or []
        elif isinstance(body, dict) and body.get("thinking_token_budget") is not None and not self.thinking_budget:
            raise BadRequest("`thinking_token_budget`: this deployment's engine has no thinking budget",
                             param="thinking_token_budget")
        shaped = shape(body, chat=kind is not Kind.COMPLETIONS, policy=self.policy,
                       max_tokens_is_ceiling=kind is Kind.MESSAGES)
        await self._fit_context(shaped)
        grant = await self._reserve(exchange, record, shaped)
        exchange.remaining_credits = grant.remaining_credits  # until the settlement says more
        upstream = upstream_body(shaped, grant.max_tokens)
        path, timeout_s = ENGINE_PATHS[kind], self.settings.stream_timeout_s
        model = self.upstream_config.served_model
        try:
            if shaped.stream:
                interruptible = Interruptible(exchange.receive, self.interruptibles)
                tracker = (anthropic.MessageStream(model=model, stop_sequences=stop_sequences)
                           if exchange.anthropic else None)
                end = await proxy.relay_stream(
                    exchange, self.upstream, path, upstream, keep_usage=shaped.client_continuous_usage,
                    interruptible=interruptible, timeout_s=timeout_s, keepalive_s=self.settings.keepalive_s,
                    tracker=tracker,
                )
                self.metrics.keepalives += end.tracker.keepalives
                if end.ending in ("client", "drain"):
                    self.metrics.aborted_streams += 1
                await self._settle(exchange, grant, end.outcome)
                if end.ending == "client":
                    return  # nobody is listening
                if not end.started:  # drained before the engine answered
                    raise Unavailable("The server is shutting down.", headers={"Retry-After": "5"})
                if exchange.anthropic:
                    await anthropic.finish_stream(exchange, end, balance=exchange.remaining_credits)
                else:
                    await proxy.finish_stream(exchange, end, balance=exchange.remaining_credits,
                                              client_usage=shaped.client_usage)
            else:
                interruptible = Interruptible(None, self.interruptibles)
                async with interruptible:
                    answer = await proxy.relay_whole(self.upstream, path, upstream, timeout_s=timeout_s)
                if interruptible.reason == "drain":  # nothing is known of the work done
                    raise Unavailable("The server is shutting down.", headers={"Retry-After": "5"})
                await self._settle(exchange, grant, answer.outcome)
                out = (anthropic.message(answer.body, stop_sequences=stop_sequences, model=model)
                       if exchange.anthropic else answer.body)
                await exchange.respond(200, out)  # only once the settle is in the ledger
        finally:
            if not grant.closed:  # the relay failed, or a path forgot: never leave a reservation open
                exchange.remaining_credits = await grant.close(metering.NOTHING)

    async def _reserve(self, exchange: Exchange, record: KeyRecord, shaped: Shaped) -> metering.Grant:
        limits = metering.KeyLimits.resolve(
            record, default_concurrency=self.settings.max_concurrent_per_key, default_rpm=self.settings.rate_limit_rpm
        )
        try:
            return await metering.reserve(
                self.store, record.key_id, record.remaining_credits, shaped, price=self.price,
                cap=self.policy.max_tokens_cap, ttl_s=self.settings.reservation_ttl_s,
                clock=self.clock, metrics=self.metrics, settlements=self.settlements, limits=limits,
            )
        except InsufficientCredits as exc:
            exchange.remaining_credits = exc.remaining_credits
            raise metering.payment_required(exc) from None
        except KeyLimitReached as exc:
            self.metrics.rate_limited += 1
            raise rate_limited(exc) from None
        except UnknownKey:  # revoked or expired since it was authenticated: the same 401
            raise Unauthorized(INVALID_KEY_MESSAGE) from None
        except StoreUnavailable:
            raise store_unavailable() from None

    @staticmethod
    async def _settle(exchange: Exchange, grant: metering.Grant, outcome: metering.Outcome) -> None:
        exchange.remaining_credits = await grant.close(outcome)
        charge = grant.charge
        exchange.note = (f"tokens={charge.prompt_tokens}+{charge.completion_tokens} credits={charge.credits} "
                         f"cached={charge.cached_tokens}" if charge else "")

    async def _count_tokens(self, exchange: Exchange) -> None:
        """Anthropic's count_tokens: the engine's own count of the rendered prompt (free)."""
        await self._authenticated(exchange)
        if not self.state.ready:
            raise self._unavailable()
        raw = await exchange.read_body(self.settings.max_body_bytes)
        body = parse_body(raw)
        if isinstance(body, dict):
            body = {**body, "max_tokens": 1}  # count_tokens takes no max_tokens
        shaped = shape(anthropic.to_chat(body, thinking_budget=True), chat=True, policy=self.policy)
        count = await self.upstream.count_prompt_tokens(shaped.body, chat=True)
        if count is None and not self.upstream.can_tokenize:
            raise NotFound("This deployment's engine cannot count tokens (it has no /tokenize).")
        if count is None:
            raise Unavailable("The engine did not count the tokens; retry shortly.", headers={"Retry-After": "1"})
        await exchange.json(200, {"input_tokens": count})

    async def _fit_context(self, shaped: Shaped) -> None:
        """Hold the request to the engine's context (shaping.fit_context), asking the engine for
        the exact prompt length when the byte bound cannot decide. An engine whose context is
        not known yet (still unreachable) is left to judge the request itself."""
        context_tokens = await self.upstream.context_tokens()
        if context_tokens is None:
            return
        exact = None
        if shaped.needs_exact_prompt(context_tokens):
            exact = await self.upstream.count_prompt_tokens(shaped.body, chat=shaped.chat)
        fit_context(shaped, context_tokens, exact)

    async def _control(self, exchange: Exchange) -> None:
        """The control app answers (control/app.py). Its own refusals are JSON already; the
        overview's pages are HTML; a refusal in plain text (the overview's 403 for a cross-origin
        form or a wrong CSRF token, 404 for a static file that does not exist) becomes the
        gateway's JSON error. The key id of an API-key caller goes to the access log."""
        replaced = False

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start":
                status = message["status"]
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                if status >= 400 and not content_type.startswith((b"text/html", b"application/json")):
                    replaced = True
                    error = NotFound("Not found.") if status == 404 else ApiError("The overview refused the request.")
                    error.status_code = status
                    await exchange.error(error)
                    return
                exchange.status, exchange.started = status, True
            if not replaced:
                exchange.finished = message["type"] == "http.response.body" and not message.get("more_body", False)
                await exchange.send(message)

        try:
            await self.control(exchange.scope, exchange.receive, send)
        finally:
            state = exchange.scope.get("state")
            if isinstance(state, dict):
                exchange.key_id = state.get("key_id")

    async def page_context(self, request_base_url: str | None = None) -> OverviewContext:
        from r1nest.overview.sources import gateway_context

        return await gateway_context(
            settings=self.settings, store=self.store, served_model=self.upstream_config.served_model,
            phase=self.state.phase, eta_s=self.state.eta_remaining_s(), request_base_url=request_base_url,
            now=self.clock(),
        )


class GatewayApp:
    """The ASGI callable. `app.state.gateway` is the Gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.state = SimpleNamespace(gateway=gateway)
        self._gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._gateway.handle(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._gateway.startup()
                except Exception as exc:  # noqa: BLE001 - reported to the server, which stops
                    log.error("gateway startup failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._gateway.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(
    *, settings: Settings, store: Store, upstream: UpstreamConfig, state: EngineState | None = None,
    clock: Callable[[], float] = time.time, admin_key: str | None = None, probe_upstream: bool = False,
) -> GatewayApp:
    """The gateway app. The admin key comes from settings (or the data dir) unless given."""
    if admin_key is None:
        from r1nest.accounts import ensure_admin_key

        admin_key = ensure_admin_key(settings)
    gateway = Gateway(
        settings=settings, store=store, upstream=upstream, state=state or EngineState(), clock=clock,
        admin_key=admin_key, probe_upstream=probe_upstream,
    )
    from r1nest.control.app import create_control_app

    gateway.control = create_control_app(
        store=store, clock=clock, admin=gateway.admin, page_context=gateway.page_context,
    )
    return GatewayApp(gateway)
