"""Settings: flat fields (one R1NEST_* variable, one TOML key, one keyword each) read through
grouped, read-only views."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydantic import SecretStr

from r1nest.errors import ConfigError
from r1nest.gateway.pricing import Price
from r1nest.settings import GROUPS, Settings, load_settings, setting_name, unknown_env_vars


def test_every_setting_belongs_to_exactly_one_group() -> None:
    names = [setting_name(f) for group in GROUPS.values() for f in dataclasses.fields(group)]
    assert sorted(names) == sorted(Settings.model_fields)
    assert len(names) == len(set(names))


def test_each_group_reads_the_flat_fields(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, port=9001, price_prompt_per_mtok=7, price_cached_prompt_per_mtok=3, demo_credits=5,
        default_top_p=0.5, max_messages=9, store="postgres", database_url=SecretStr("postgresql://u:p@h/d"),
        upstream_url="http://127.0.0.1:9100", engine_port=9100,
    )
    for name, group in GROUPS.items():
        view = getattr(settings, name)
        assert isinstance(view, group)
        for f in dataclasses.fields(group):
            assert getattr(view, f.name) == getattr(settings, setting_name(f)), (name, f.name)
    assert settings.pricing.prompt_per_mtok == 7 and settings.pricing.cached_prompt_per_mtok == 3
    assert settings.server.port == 9001 and settings.upstream.port == 9100
    assert settings.upstream.url == "http://127.0.0.1:9100" and settings.deepseek.top_p == 0.5
    assert settings.limits.max_messages == 9 and settings.ledger.kind == "postgres"
    assert settings.ledger.sqlite_path == settings.ledger_path == tmp_path / "ledger.sqlite3"
    assert "postgresql" not in repr(settings.ledger)  # secrets stay out of a view's repr
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.pricing.prompt_per_mtok = 0  # type: ignore[misc]


def test_environment_names_and_toml_keys_stay_flat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "r1nest.toml"
    config.write_text("price_completion_per_mtok = 11\nmax_tokens_cap = 77\n")
    monkeypatch.setenv("R1NEST_CONFIG", str(config))
    monkeypatch.setenv("R1NEST_PRICE_PROMPT_PER_MTOK", "3")
    settings = load_settings(port=8123)
    assert (settings.pricing.prompt_per_mtok, settings.pricing.completion_per_mtok) == (3, 11)
    assert settings.limits.max_tokens_cap == 77 and settings.server.port == 8123
    assert Price.from_settings(settings) == Price(prompt_per_mtok=3, completion_per_mtok=11, min_per_request=0)
    assert unknown_env_vars({"R1NEST_PRICING": "1", "R1NEST_PORT": "1"}) == ["R1NEST_PRICING"]  # no group names
    monkeypatch.setenv("R1NEST_LIMITS", "1")
    with pytest.raises(ConfigError, match="R1NEST_LIMITS"):
        load_settings()
