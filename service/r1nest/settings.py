"""Typed, closed configuration: the only module that reads `R1NEST_*` environment variables.

Precedence (highest first): command-line flags (passed as keyword arguments), `R1NEST_*`
environment variables, the TOML file named by `R1NEST_CONFIG` (or `--config`), defaults.
An `R1NEST_*` variable that names no setting is an error at startup, not a silent typo.

The fields are flat: each is one `R1NEST_<NAME>` variable, one TOML key and one keyword
(`Settings(price_prompt_per_mtok=...)`, `load_settings(port=...)`). Code that needs a whole
concern reads it through a grouped, read-only view built from them:

    settings.server     host, port, public_url, internal_url, trusted_proxies, admin_key, log_level
    settings.upstream   model, engine, served_model, url, key, port (the engine's)
    settings.pricing    prompt_per_mtok, completion_per_mtok, min_per_request, cached_prompt_per_mtok,
                        demo_credits
    settings.deepseek   defaults, fold_system_prompt, temperature, top_p
    settings.limits     body, messages, tokens, stream and drain times, per-key limits, request heads
    settings.ledger     kind (the store), data_dir, sqlite_path, the DynamoDB table, the PostgreSQL URL

Every field belongs to exactly one group (GROUPS; a test holds it).
"""

from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from r1nest.errors import ConfigError
from r1nest.files import LEDGER_FILE
from r1nest.ports import ENGINE_PORT, GATEWAY_PORT

ENV_PREFIX = "R1NEST_"
# Variables with the prefix that are not settings but are read by name elsewhere.
_NON_SETTING_VARS = {"R1NEST_CONFIG"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False, validate_default=True
    )

    # where state lives
    data_dir: Path = Field(default=Path.home() / ".r1nest", description="SQLite ledger and local state")
    admin_key: SecretStr | None = Field(default=None, description="admin key; generated into data_dir when unset")

    # listener
    host: str = "0.0.0.0"
    port: int = Field(default=GATEWAY_PORT, ge=1, le=65535)
    public_url: str | None = Field(default=None, description="public base URL shown on the overview page")
    internal_url: str | None = Field(default=None, description="internal base URL shown on the overview page")
    trusted_proxies: str = Field(default="", description="IPs/CIDRs whose X-Forwarded-For/-Proto are believed")

    # upstream engine
    upstream_url: str | None = None
    upstream_key: SecretStr | None = None
    served_model: str | None = None
    model: str = "deepseek-r1-distill-qwen-1.5b"
    engine: Literal["vllm", "sglang"] = "vllm"
    engine_port: int = Field(default=ENGINE_PORT, ge=1, le=65535)

    # prices, in integer credits
    price_prompt_per_mtok: int = Field(default=1_000_000, ge=0)
    price_completion_per_mtok: int = Field(default=4_000_000, ge=0)
    price_min_per_request: int = Field(default=0, ge=0)
    price_cached_prompt_per_mtok: int | None = Field(
        default=None, ge=0, description="prompt tokens served from the engine's prefix cache; unset: the prompt price"
    )
    demo_credits: int = Field(default=1_000_000, ge=0)

    # DeepSeek-R1 conventions
    deepseek_defaults: bool = True
    fold_system_prompt: bool = True
    default_temperature: float = 0.6
    default_top_p: float = 0.95

    # limits
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_messages: int = Field(default=512, ge=1)
    max_tokens_cap: int = Field(default=32_768, ge=1)
    stream_timeout_s: float = Field(default=1800.0, gt=0)
    stream_idle_timeout_s: float = Field(
        default=300.0, gt=0, description="no byte from the engine for this long ends a request as an engine failure"
    )
    reservation_ttl_s: float = Field(default=3600.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    rate_limit_rpm: int = Field(
        default=0, ge=0, description="default per-key completion requests per 60 s window; 0: no limit"
    )
    max_concurrent_per_key: int = Field(
        default=0, ge=0, description="default per-key completion requests in flight; 0: no limit"
    )
    keepalive_s: float = Field(
        default=15.0, ge=0, description="an SSE comment after this long without an event on a stream; 0: never"
    )
    max_header_bytes: int = Field(default=64 * 1024, ge=4096, description="request line + headers; over it: 431")
    header_timeout_s: float = Field(default=10.0, gt=0, description="to send a whole request head; else closed")

    # stores
    store: Literal["sqlite", "dynamodb", "postgres"] = "sqlite"
    dynamodb_table: str | None = None
    aws_region: str | None = None
    dynamodb_endpoint_url: str | None = None
    database_url: SecretStr | None = Field(
        default=None, description="PostgreSQL ledger (store = postgres): postgresql://user:password@host:port/db"
    )
    database_pool_size: int = Field(default=10, ge=1, le=1000, description="PostgreSQL connections per process")

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _ttl_outlives_streams(self) -> "Settings":
        if self.reservation_ttl_s <= self.stream_timeout_s:
            raise ValueError(
                "reservation_ttl_s must be longer than stream_timeout_s, or a live stream's "
                "reservation could be voided by the sweeper"
            )
        return self

    @model_validator(mode="after")
    def _cached_price_is_a_discount(self) -> "Settings":
        cached = self.price_cached_prompt_per_mtok
        if cached is not None and cached > self.price_prompt_per_mtok:
            raise ValueError(
                "price_cached_prompt_per_mtok must not exceed price_prompt_per_mtok: reservations "
                "price every prompt token as a cache miss"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_path = os.environ.get("R1NEST_CONFIG")
        if config_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_path))
        return tuple(sources)

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / LEDGER_FILE

    # -- grouped views (read-only; the flat fields above stay the source of truth) --------------

    @property
    def server(self) -> ServerSettings:
        return _view(ServerSettings, self)

    @property
    def upstream(self) -> UpstreamSettings:
        return _view(UpstreamSettings, self)

    @property
    def pricing(self) -> PricingSettings:
        return _view(PricingSettings, self)

    @property
    def deepseek(self) -> DeepSeekSettings:
        return _view(DeepSeekSettings, self)

    @property
    def limits(self) -> LimitsSettings:
        return _view(LimitsSettings, self)

    @property
    def ledger(self) -> LedgerSettings:
        return _view(LedgerSettings, self)


def _reads(name: str) -> dict[str, str]:
    """A view field's metadata: it reads the flat setting `name` (when the names differ)."""
    return {"setting": name}


def setting_name(view_field: dataclasses.Field[Any]) -> str:
    """The flat setting a view's field is read from."""
    return str(view_field.metadata.get("setting", view_field.name))


_View = TypeVar("_View")


def _view(cls: type[_View], settings: Settings) -> _View:
    return cls(**{f.name: getattr(settings, setting_name(f)) for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class ServerSettings:
    """Where the gateway listens, how clients reach it, who administers it."""

    host: str
    port: int
    public_url: str | None
    internal_url: str | None
    trusted_proxies: str
    admin_key: SecretStr | None = field(repr=False)
    log_level: str


@dataclass(frozen=True)
class UpstreamSettings:
    """The engine behind the gateway and the model it serves."""

    model: str
    engine: Literal["vllm", "sglang"]
    served_model: str | None
    url: str | None = field(metadata=_reads("upstream_url"))
    key: SecretStr | None = field(repr=False, metadata=_reads("upstream_key"))
    port: int = field(metadata=_reads("engine_port"))


@dataclass(frozen=True)
class PricingSettings:
    """Prices in integer credits per million tokens, and the demo key's credits."""

    prompt_per_mtok: int = field(metadata=_reads("price_prompt_per_mtok"))
    completion_per_mtok: int = field(metadata=_reads("price_completion_per_mtok"))
    min_per_request: int = field(metadata=_reads("price_min_per_request"))
    cached_prompt_per_mtok: int | None = field(metadata=_reads("price_cached_prompt_per_mtok"))
    demo_credits: int


@dataclass(frozen=True)
class DeepSeekSettings:
    """DeepSeek-R1's conventions the gateway applies to requests."""

    defaults: bool = field(metadata=_reads("deepseek_defaults"))
    fold_system_prompt: bool
    temperature: float = field(metadata=_reads("default_temperature"))
    top_p: float = field(metadata=_reads("default_top_p"))


@dataclass(frozen=True)
class LimitsSettings:
    """Bounds on requests, streams, reservations and keys."""

    max_body_bytes: int
    max_messages: int
    max_tokens_cap: int
    stream_timeout_s: float
    stream_idle_timeout_s: float
    reservation_ttl_s: float
    drain_timeout_s: float
    rate_limit_rpm: int
    max_concurrent_per_key: int
    keepalive_s: float
    max_header_bytes: int
    header_timeout_s: float


@dataclass(frozen=True)
class LedgerSettings:
    """Which store keeps the keys and credits, and where."""

    kind: Literal["sqlite", "dynamodb", "postgres"] = field(metadata=_reads("store"))
    data_dir: Path
    dynamodb_table: str | None
    aws_region: str | None
    dynamodb_endpoint_url: str | None
    database_url: SecretStr | None = field(repr=False)
    database_pool_size: int

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / LEDGER_FILE


GROUPS: dict[str, type] = {
    "server": ServerSettings, "upstream": UpstreamSettings, "pricing": PricingSettings,
    "deepseek": DeepSeekSettings, "limits": LimitsSettings, "ledger": LedgerSettings,
}


def unknown_env_vars(environ: dict[str, str] | None = None) -> list[str]:
    environ = dict(os.environ if environ is None else environ)
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | _NON_SETTING_VARS
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def load_settings(**overrides: Any) -> Settings:
    """Settings from flags (non-None overrides), environment and config file; ConfigError if bad."""
    unknown = unknown_env_vars()
    if unknown:
        raise ConfigError(f"unknown setting(s) in the environment: {', '.join(unknown)}")
    flags = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**flags)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None


def environ_with_prefixes(*prefixes: str) -> dict[str, str]:
    """Process environment variables whose names start with one of `prefixes` (e.g. NCCL_, FI_).

    For diagnostics (`r1nest doctor` reports the NCCL / libfabric tuning the engine will inherit);
    settings themselves come from `Settings`.
    """
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(prefixes)}
