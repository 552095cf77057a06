"""End-to-end: `r1nest serve` as a user runs it, on the real vLLM CPU build and the tiny models.

One server per model for the whole session (vLLM needs a minute or more to start on CPU): each
starts as a subprocess on a free port with its own data dir and is shared by the tests
(r1nest.testing.serve_process); the servers the session needs start side by side. Skipped only
when vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from r1nest.gateway.pricing import Price
from r1nest.testing.serve_process import Served, launch_serve, wait_ready

# Prices with a remainder, so that rounding mistakes show up in the credit checks.
PRICE_PROMPT_PER_MTOK = 1_500_000
PRICE_COMPLETION_PER_MTOK = 3_333_333
DRAIN_TIMEOUT_S = 60.0
SETTINGS_ENV = {
    "R1NEST_PRICE_PROMPT_PER_MTOK": str(PRICE_PROMPT_PER_MTOK),
    "R1NEST_PRICE_COMPLETION_PER_MTOK": str(PRICE_COMPLETION_PER_MTOK),
    "R1NEST_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
}


@pytest.fixture(scope="session")
def price() -> Price:
    """The price the servers charge (the gateway's own integer pricing applies it)."""
    return Price(prompt_per_mtok=PRICE_PROMPT_PER_MTOK, completion_per_mtok=PRICE_COMPLETION_PER_MTOK)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if importlib.util.find_spec("vllm") is None:
        skip = pytest.mark.skip(reason="vLLM is not installed (scripts/setup-env installs its CPU build)")
        for item in items:
            if "engine" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from r1nest.tinymodel import write_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: write_tiny_model(root / f"tiny-{arch.replace('_', '-')}", arch=arch)  # type: ignore[arg-type]
            for arch in ("deepseek_v3", "qwen2")}


class Servers:
    """Servers launched on demand. The first fixture that needs one also launches the other
    models' servers that this session's tests will use, so their startups overlap."""

    def __init__(self, models: dict[str, Path], root: Path, items: list[pytest.Item]) -> None:
        self.models, self.root = models, root
        self.wanted = [arch for arch, fixture in FIXTURES.items()
                       if any(fixture in getattr(item, "fixturenames", ()) for item in items)]
        self.launched: dict[str, Served] = {}

    def _launch(self, arch: str) -> None:
        if arch not in self.launched:
            directory = self.root / arch
            directory.mkdir()
            self.launched[arch] = launch_serve(self.models[arch], directory / "data", directory / "serve.log",
                                               settings_env=SETTINGS_ENV)

    def get(self, arch: str) -> Served:
        self._launch(arch)
        for other in self.wanted:
            self._launch(other)
        return wait_ready(self.launched[arch])

    def stop_all(self) -> None:
        for served in self.launched.values():
            served.stop()


FIXTURES = {"deepseek_v3": "serve_v3", "qwen2": "serve_qwen2"}


@pytest.fixture(scope="session")
def servers(request: pytest.FixtureRequest, tiny_models: dict[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    group = Servers(tiny_models, tmp_path_factory.mktemp("serve"), request.session.items)
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture(scope="session")
def serve_v3(servers: Servers) -> Served:
    return servers.get("deepseek_v3")


@pytest.fixture(scope="session")
def serve_qwen2(servers: Servers) -> Served:
    return servers.get("qwen2")
