"""Where an OverviewContext comes from: a Pulumi stack, a Modal app, a local data dir, the gateway.

Each source turns what a deployment left behind into an OverviewContext:
- Pulumi: the stack outputs of infra/aws (`pulumi stack output --json --show-secrets`, or that
  JSON saved to a file): public_endpoint, internal_endpoint, api_key, model, model_repo, engine,
  instance_type, nodes, replicas, region, deployment;
- Modal: the web URL of the deployed function (modal's `Function.from_name(...).get_web_url()`)
  and the ApiKey from the local key file written when the Modal secret was created;
- local: `r1nest serve`'s settings and data dir (the deployment's ApiKey file, the ledger);
- the gateway itself: `gateway_context()` for its /overview page, with the key's balance and its
  usage (overview/usage_panel.py) read from the gateway's ledger.

Readiness and remaining credits are live values: `probe()` asks the deployment's /health and
/v1/credits (short timeouts, failures become "unknown" with a reason, never an exception).
The I/O (subprocess, HTTP, modal) sits behind small callables so tests pass fakes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from r1nest.errors import ConfigError
from r1nest.files import API_KEY_FILE, read_key_file, read_serve_state
from r1nest.overview.context import OverviewContext, Readiness, api_base_url
from r1nest.overview.usage_panel import UsagePanel, read_usage_panel

MAX_OUTPUTS_BYTES = 1024 * 1024
PULUMI_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 5.0

MODAL_INTERNAL_NOTE = (
    "Modal gives a deployment one public HTTPS URL and no private network address: code running "
    "on Modal calls the public endpoint too."
)
GATEWAY_NO_KEY_NOTE = (
    "This page's ApiKey is not a key of this gateway's ledger, so there is no usage to show here; "
    "`r1nest usage` shows every key's."
)
LOCAL_INTERNAL_NOTE = (
    "On one machine the gateway has no separate internal address; set R1NEST_INTERNAL_URL to show "
    "a private address (e.g. http://10.0.0.5:8000) here."
)


# -- live values ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Live:
    readiness: Readiness
    remaining_credits: int | None
    model: str | None = None  # what GET /v1/models says the deployment serves


HttpGet = Callable[[str, Mapping[str, str]], tuple[int, bytes]]  # url, headers -> status, body


def _httpx_get(url: str, headers: Mapping[str, str]) -> tuple[int, bytes]:
    import httpx

    response = httpx.get(url, headers=dict(headers), timeout=PROBE_TIMEOUT_S, follow_redirects=False)
    return response.status_code, response.content[:65536]


def probe(ctx: OverviewContext, *, http_get: HttpGet = _httpx_get) -> Live:
    """Readiness from GET <root>/health, credits from GET /v1/credits and the served model from
    GET /v1/models (both with the key, in a header); never raises."""
    root = ctx.public_endpoint.removesuffix("/v1")
    try:
        status, body = http_get(root + "/health", {})
    except Exception as exc:  # noqa: BLE001 - any transport failure means "unknown", said plainly
        readiness = Readiness("unknown", detail=f"Could not reach {root}/health ({type(exc).__name__}).")
    else:
        readiness = _readiness_from_health(status, body, root)
    credits = model = None
    if ctx.api_key is not None:
        headers = {"Authorization": f"Bearer {ctx.api_key}"}
        try:
            status, body = http_get(ctx.public_endpoint + "/credits", headers)
            if status == 200:
                value = json.loads(body).get("remaining_credits")
                credits = value if isinstance(value, int) and not isinstance(value, bool) else None
        except Exception:  # noqa: BLE001 - credits stay "unknown"
            credits = None
        try:
            status, body = http_get(ctx.public_endpoint + "/models", headers)
            if status == 200:
                data = json.loads(body).get("data")
                first = data[0].get("id") if isinstance(data, list) and data and isinstance(data[0], dict) else None
                model = first if isinstance(first, str) and first else None
        except Exception:  # noqa: BLE001 - the configured model name stays
            model = None
    return Live(readiness=readiness, remaining_credits=credits, model=model)


def _readiness_from_health(status: int, body: bytes, root: str) -> Readiness:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("status") in ("ready", "warming", "down", "draining"):
        eta = data.get("eta_s")
        eta_s = float(eta) if isinstance(eta, (int, float)) and not isinstance(eta, bool) and 0 <= eta < 10**7 else None
        return Readiness(data["status"], eta_s=eta_s if data["status"] == "warming" else None)
    return Readiness("unknown", detail=f"{root}/health answered {status} without a known status.")


def with_live(ctx: OverviewContext, live: Live) -> OverviewContext:
    """`ctx` with what the running deployment says (its answer wins over configuration)."""
    credits = live.remaining_credits if live.remaining_credits is not None else ctx.remaining_credits
    return replace(ctx, readiness=live.readiness, remaining_credits=credits, model=live.model or ctx.model)


# -- Pulumi -----------------------------------------------------------------------------------------

Runner = Callable[..., subprocess.CompletedProcess[bytes]]


def pulumi_stack_outputs(stack_dir: Path, *, stack: str | None = None, run: Runner = subprocess.run) -> dict[str, Any]:
    """`pulumi stack output --json --show-secrets` in `stack_dir` (argv, no shell, bounded)."""
    if run is subprocess.run and shutil.which("pulumi") is None:
        raise ConfigError("the pulumi CLI is not installed; or save the outputs with "
                          "`pulumi stack output --json --show-secrets > outputs.json` and pass --stack-json")
    argv = ["pulumi", "stack", "output", "--json", "--show-secrets", "--non-interactive"]
    if stack:
        argv += ["--stack", stack]
    try:
        done = run(argv, cwd=str(stack_dir), capture_output=True, timeout=PULUMI_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"pulumi stack output did not answer within {PULUMI_TIMEOUT_S:.0f} s") from None
    except FileNotFoundError:
        raise ConfigError(f"cannot run pulumi in {stack_dir}") from None
    if done.returncode != 0:
        err = (done.stderr or b"").decode("utf-8", "replace").strip().splitlines()
        raise ConfigError("pulumi stack output failed: " + (err[-1] if err else f"exit {done.returncode}"))
    return parse_outputs_json(done.stdout, what="pulumi stack output")


def load_outputs_file(path: Path) -> dict[str, Any]:
    path = path.expanduser()
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_OUTPUTS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_OUTPUTS_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_OUTPUTS_BYTES} bytes")
    return parse_outputs_json(raw, what=str(path))


def parse_outputs_json(raw: bytes | str, *, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{what}: not JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a JSON object of stack outputs")
    return data


def from_pulumi_outputs(outputs: Mapping[str, Any], *, source: str = "the Pulumi stack outputs") -> OverviewContext:
    """The context of an AWS deployment from infra/aws's stack outputs."""

    def need(name: str) -> Any:
        value = outputs.get(name)
        if value in (None, ""):
            raise ConfigError(f"the stack has no '{name}' output; is this an r1nest stack (infra/aws)?")
        return value

    def text(name: str) -> str:
        value = outputs.get(name)
        return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""

    api_key = outputs.get("api_key")
    if isinstance(api_key, str) and api_key.startswith("[secret]"):
        raise ConfigError("the api_key output is masked: run pulumi stack output with --show-secrets")
    details = []
    for label, name in (("instance type", "instance_type"), ("nodes", "nodes"), ("replicas", "replicas"),
                        ("region", "region")):
        if text(name):
            details.append((label, text(name)))
    return OverviewContext(
        model=str(need("model")),
        engine=str(need("engine")),
        public_endpoint=str(need("public_endpoint")),
        internal_endpoint=outputs.get("internal_endpoint") or None,
        internal_endpoint_note="" if outputs.get("internal_endpoint") else "The stack exports no internal endpoint.",
        api_key=api_key if isinstance(api_key, str) and api_key else None,
        deployment=f"AWS {text('deployment')}".strip(),
        source=source,
        model_repo=text("model_repo"),
        details=tuple(details),
        reachable_from=text("allowed_cidrs"),
    )


# -- Modal ------------------------------------------------------------------------------------------

WebUrlLookup = Callable[[str, str, str | None], str | None]  # app, function, environment -> URL


def _modal_web_url(app_name: str, function_name: str, environment: str | None) -> str | None:
    try:
        import modal
    except ImportError:
        raise ConfigError("the modal package is not installed (pip install 'r1nest[modal]')") from None
    try:
        function = modal.Function.from_name(app_name, function_name, environment_name=environment)
        return function.get_web_url()
    except modal.exception.NotFoundError:
        raise ConfigError(
            f"no deployed Modal function {function_name!r} in app {app_name!r}; deploy with "
            "`modal deploy infra/modal/app.py`"
        ) from None
    except modal.exception.AuthError:
        raise ConfigError("Modal refused the credentials; run `modal token new`") from None


def from_modal(
    *,
    app_name: str,
    function_name: str,
    model: str,
    engine: str,
    key_file: Path,
    environment: str | None = None,
    lookup: WebUrlLookup = _modal_web_url,
) -> OverviewContext:
    url = lookup(app_name, function_name, environment)
    if not url:
        raise ConfigError(f"Modal function {app_name}/{function_name} has no web URL (is it a web endpoint?)")
    return OverviewContext(
        model=model,
        engine=engine,
        public_endpoint=url,
        internal_endpoint=None,
        internal_endpoint_note=MODAL_INTERNAL_NOTE,
        api_key=read_key_file(key_file),
        deployment=f"Modal app {app_name}",
        source=f"the Modal app {app_name!r} and the key file {key_file}",
    )


# -- local `r1nest serve` and the gateway -----------------------------------------------------------


def local_endpoints(settings: Any) -> tuple[str, str | None, str]:
    public = settings.public_url or f"http://127.0.0.1:{settings.port}"
    internal = settings.internal_url
    return public, internal, "" if internal else LOCAL_INTERNAL_NOTE


def from_local(settings: Any) -> OverviewContext:
    """The context of `r1nest serve` on this machine, from its settings and data dir (serve.json
    for where it runs and what it serves, the ApiKey file)."""
    data_dir = Path(settings.data_dir).expanduser()
    state = read_serve_state(data_dir)

    def state_text(name: str) -> str | None:
        value = state.get(name)
        return value if isinstance(value, str) and value else None

    public, internal, note = local_endpoints(settings)
    if settings.public_url is None and state_text("gateway_url"):
        public = state_text("gateway_url")  # type: ignore[assignment]
    return OverviewContext(
        model=settings.served_model or state_text("served_model") or settings.model,
        engine=state_text("engine") or settings.engine,
        public_endpoint=public,
        internal_endpoint=internal,
        internal_endpoint_note=note,
        api_key=read_key_file(data_dir / API_KEY_FILE),
        deployment="local",
        source=f"r1nest serve's data dir {data_dir}",
        model_repo=(state_text("model") or "")[:200],
    )


async def gateway_context(
    *, settings: Any, store: Any, served_model: str, phase: str, eta_s: float | None, api_key: str | None = None,
    request_base_url: str | None = None, now: float | None = None,
) -> OverviewContext:
    """What the gateway's /overview shows: its settings, the deployment's ApiKey (given, or the
    data dir's key file), that key's balance and its usage of the last 24 hours and 30 days read
    from the store. Without a configured public URL, the public endpoint is the address the page
    was opened at (`request_base_url`)."""
    from r1nest.keys import parse_key_id

    if api_key is None:
        api_key = read_key_file(Path(settings.data_dir) / API_KEY_FILE)
    credits = None
    usage = UsagePanel(None, note=GATEWAY_NO_KEY_NOTE)
    key_id = parse_key_id(api_key) if api_key else None
    if key_id is not None:
        record = await store.get_key(key_id)
        credits = record.remaining_credits if record is not None else None
        if record is not None:
            usage = await read_usage_panel(store, key_id, now=now)
    public, internal, note = local_endpoints(settings)
    if settings.public_url is None and request_base_url:
        try:
            public = api_base_url(request_base_url, what="the page's address")
        except ConfigError:
            pass  # an odd Host header: keep the loopback address
    return OverviewContext(
        model=served_model,
        engine=settings.engine,
        public_endpoint=public,
        internal_endpoint=internal,
        internal_endpoint_note=note,
        api_key=api_key,
        remaining_credits=credits,
        readiness=Readiness(phase if phase in ("ready", "warming", "down", "draining") else "unknown", eta_s=eta_s),  # type: ignore[arg-type]
        deployment="gateway",
        source="the running gateway",
        usage=usage,
    )

