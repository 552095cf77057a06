"""What the overview page shows, as one validated value.

Every source (the gateway at run time, a Pulumi stack, a Modal app, a local data dir) builds an
`OverviewContext`; the renderer and the examples read nothing else. Values end up inside shell,
Python and JavaScript source on the page, so they are checked here, once: endpoints are plain
http(s) URLs, the model name and the key use a small alphabet. A value that fails is a
ConfigError with a message, never a page with a broken (or injectable) example.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from r1nest.errors import ConfigError
from r1nest.keys import parse_key_id
from r1nest.overview.usage_panel import UsagePanel

Phase = Literal["ready", "warming", "down", "draining", "unknown"]
PHASES: tuple[str, ...] = ("ready", "warming", "down", "draining", "unknown")

MAX_URL_CHARS = 2048
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$")
# Our keys are r1n-<id>-<secret>; any OpenAI-style token (letters, digits, - _ .) is accepted.
_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{8,256}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+$")
_TEXT_LIMIT = 500

# The environment variable the examples read when the page does not know the key. It is the
# OpenAI SDKs' own variable, so the examples stay valid as written.
KEY_ENV_VAR = "OPENAI_API_KEY"


def api_base_url(url: str, *, what: str = "endpoint") -> str:
    """`url` as an OpenAI API base URL: http(s), no credentials/query/fragment, ending in /v1."""
    url = url.strip()
    if not url or len(url) > MAX_URL_CHARS:
        raise ConfigError(f"{what}: expected an http(s) URL, got {len(url)} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what}: expected an http(s) URL such as https://host:8000/v1, got {url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(f"{what}: the URL must not carry credentials, a query or a fragment")
    if not _HOST_RE.match(parts.netloc) or re.search(r"[^A-Za-z0-9._~/%-]", parts.path):
        raise ConfigError(f"{what}: unexpected characters in {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


@dataclass(frozen=True, slots=True)
class Readiness:
    phase: Phase = "unknown"
    eta_s: float | None = None  # seconds until ready, when warming and known
    detail: str = ""  # e.g. "could not reach https://..." when the phase is unknown

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ConfigError(f"readiness: unknown phase {self.phase!r}")
        if self.eta_s is not None and not (0 <= self.eta_s < 10**7):
            raise ConfigError(f"readiness: ETA out of range: {self.eta_s!r}")

    @property
    def label(self) -> str:
        if self.phase == "warming":
            return "warming up" + (f", ready in about {format_duration(self.eta_s)}" if self.eta_s is not None else "")
        return {"ready": "ready", "down": "down", "draining": "draining (shutting down)", "unknown": "unknown"}[
            self.phase
        ]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    minutes = int(round(seconds / 60))
    if minutes < 90:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


@dataclass(frozen=True, slots=True)
class OverviewContext:
    """Everything the page shows. Endpoints are normalised to API base URLs ending in /v1."""

    model: str  # the served model name, what requests put in "model"
    engine: str  # "vllm", "sglang", ...
    public_endpoint: str
    internal_endpoint: str | None = None
    internal_endpoint_note: str = ""  # why there is none, or what the internal address is for
    api_key: str | None = None  # None: the examples read $OPENAI_API_KEY
    remaining_credits: int | None = None
    readiness: Readiness = field(default_factory=Readiness)
    deployment: str = ""  # a short name: "local", "pulumi stack dev", "modal app r1nest"
    source: str = ""  # where the values came from, shown in the footer
    model_repo: str = ""  # e.g. deepseek-ai/DeepSeek-R1, when known
    model_revision: str = ""  # the weights commit, when a source knows it; else the catalog's pin
    details: tuple[tuple[str, str], ...] = ()  # extra rows: ("instance type", "p5en.48xlarge")
    reachable_from: str = ""  # who may reach the public endpoint, e.g. the allowed CIDRs, when known
    usage: UsagePanel | None = None  # the key's recent usage; None: this source has no ledger (not the gateway)

    def __post_init__(self) -> None:
        if not _MODEL_RE.match(self.model):
            raise ConfigError(f"model name {self.model!r} is not a plain model id")
        if not re.match(r"^[a-z0-9_-]{1,32}$", self.engine):
            raise ConfigError(f"engine {self.engine!r} is not a plain engine name")
        object.__setattr__(self, "public_endpoint", api_base_url(self.public_endpoint, what="public endpoint"))
        if self.internal_endpoint is not None:
            object.__setattr__(
                self, "internal_endpoint", api_base_url(self.internal_endpoint, what="internal endpoint")
            )
        elif not self.internal_endpoint_note:
            raise ConfigError("internal endpoint: give one, or a note that says why there is none")
        if self.api_key is not None and not _KEY_RE.match(self.api_key):
            raise ConfigError("the API key has unexpected characters (expected r1n-<id>-<secret>)")
        if self.remaining_credits is not None and (
            not isinstance(self.remaining_credits, int) or isinstance(self.remaining_credits, bool)
        ):
            raise ConfigError("remaining credits must be an integer")
        if self.model_revision and not re.match(r"^[0-9a-f]{40}$", self.model_revision):
            raise ConfigError(f"model revision {self.model_revision!r} is not a 40-hex commit")
        for name in ("internal_endpoint_note", "deployment", "source", "model_repo", "reachable_from"):
            if len(getattr(self, name)) > _TEXT_LIMIT:
                raise ConfigError(f"{name} is longer than {_TEXT_LIMIT} characters")
        if len(self.details) > 32:
            raise ConfigError("at most 32 detail rows")
        if self.usage is not None and not isinstance(self.usage, UsagePanel):
            raise ConfigError("usage must be a UsagePanel")

    @property
    def weights_revision(self) -> str:
        """The weights commit to show: the source's, else the catalog's pin for this model,
        "unpinned" for a catalog entry without one, "" when unknown."""
        if self.model_revision:
            return self.model_revision
        from r1nest.catalog import MODELS

        spec = MODELS.get(self.model) or next((m for m in MODELS.values() if m.hf_repo == self.model_repo), None)
        return spec.revision if spec is not None else ""

    @property
    def unencrypted(self) -> bool:
        """The public endpoint is plain HTTP to another machine: keys and prompts cross the
        network in clear text (loopback is not a network)."""
        host = urlsplit(self.public_endpoint).hostname or ""
        return self.public_endpoint.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1")

    @property
    def masked_key(self) -> str:
        return mask_key(self.api_key) if self.api_key is not None else ""


def mask_key(key: str) -> str:
    """The key with its secret hidden. An r1nest key keeps its public part (`r1n-<id>-`) so keys
    can be told apart; any other key shows nothing of itself (its secret may contain dashes)."""
    key_id = parse_key_id(key)
    if key_id is not None:
        return key[: key.index(key_id) + len(key_id) + 1] + "•" * 12
    return "•" * 16
