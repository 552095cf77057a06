"""End-to-end: `r1nest serve` as a user runs it, on the real vLLM CPU build and the tiny models.

One server per model for the whole session (vLLM needs a minute or more to start on CPU): each
starts as a subprocess on a free port with its own data dir and is shared by the tests
(r1nest.testing.serve_process); the servers the session needs start side by side. Skipped only
when vLLM is not installed.

A third server, `serve_examples`, runs the same tiny DeepSeek-V3 model with a small max_tokens cap
(R1NEST_MAX_TOKENS_CAP, an operator setting): the published client examples that leave
max_tokens out run on it as printed. The tiny model never emits EOS, so on a server with the
default cap such a request generates until the context is full (16k tokens, minutes on CPU).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


# The qwen2 server prices prompt-cache hits apart (vLLM's CPU build caches prefixes for it, not
# for the MLA model), one credit per token below a miss, and sends keep-alive comments after a
# short quiet time (a long prompt's prefill is one).
PRICE_CACHED_PROMPT_PER_MTOK = 500_000
QWEN2_SETTINGS_ENV = {
    **SETTINGS_ENV,
    "R1NEST_PRICE_CACHED_PROMPT_PER_MTOK": str(PRICE_CACHED_PROMPT_PER_MTOK),
    "R1NEST_KEEPALIVE_S": "0.05",
}


@pytest.fixture(scope="session")
def price() -> Price:
    """The price the servers charge (the gateway's own integer pricing applies it)."""
    return Price(prompt_per_mtok=PRICE_PROMPT_PER_MTOK, completion_per_mtok=PRICE_COMPLETION_PER_MTOK)


@pytest.fixture(scope="session")
def cached_price() -> Price:
    """The qwen2 server's price: cache hits at PRICE_CACHED_PROMPT_PER_MTOK."""
    return Price(prompt_per_mtok=PRICE_PROMPT_PER_MTOK, completion_per_mtok=PRICE_COMPLETION_PER_MTOK,
                 cached_prompt_per_mtok=PRICE_CACHED_PROMPT_PER_MTOK)


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


# The max_tokens cap of the examples server: requests without max_tokens get at most this many.
EXAMPLES_MAX_TOKENS_CAP = 48


@dataclass(frozen=True)
class Kind:
    fixture: str
    arch: str
    settings_env: dict[str, str]


# The servers a session can use, by kind: the fixture that gives it, its model, its settings.
KINDS = {
    "deepseek_v3": Kind("serve_v3", "deepseek_v3", SETTINGS_ENV),
    "qwen2": Kind("serve_qwen2", "qwen2", QWEN2_SETTINGS_ENV),
    "examples": Kind("serve_examples", "deepseek_v3",
                     {**SETTINGS_ENV, "R1NEST_MAX_TOKENS_CAP": str(EXAMPLES_MAX_TOKENS_CAP)}),
}
FIXTURES = {name: kind.fixture for name, kind in KINDS.items()}


class Servers:
    """Servers launched on demand. The first fixture that needs one also launches the other
    servers that this session's tests will use, so their startups overlap, and waits for them
    all."""

    def __init__(self, models: dict[str, Path], root: Path, items: list[pytest.Item]) -> None:
        self.models, self.root = models, root
        self.wanted = [name for name, fixture in FIXTURES.items()
                       if any(fixture in getattr(item, "fixturenames", ()) for item in items)]
        self.launched: dict[str, Served] = {}
        self.waited = False

    def _launch(self, name: str) -> None:
        if name not in self.launched:
            kind = KINDS[name]
            directory = self.root / name
            directory.mkdir()
            self.launched[name] = launch_serve(self.models[kind.arch], directory / "data", directory / "serve.log",
                                               settings_env=kind.settings_env)

    def get(self, name: str) -> Served:
        self._launch(name)
        for other in self.wanted:
            self._launch(other)
        self._wait_all()
        return wait_ready(self.launched[name])  # at once when ready; raises for a server that failed

    def _wait_all(self) -> None:
        """Wait for every launched server at once, each watched while it warms (wait_ready records
        its 503 answers, whichever fixture asks first). A failure is raised by get() to the
        fixture of that server only."""
        if self.waited:
            return
        self.waited = True

        def wait(served: Served) -> None:
            try:
                wait_ready(served)
            except Exception:  # noqa: BLE001 - get() raises it again for this server's fixture
                pass

        with ThreadPoolExecutor(max_workers=len(self.launched)) as pool:
            list(pool.map(wait, self.launched.values()))

    def stop_all(self) -> None:
        for served in self.launched.values():
            served.stop()


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


@pytest.fixture(scope="session")
def serve_examples(servers: Servers) -> Served:
    """The tiny DeepSeek-V3 model with max_tokens capped at EXAMPLES_MAX_TOKENS_CAP: for the
    examples that leave max_tokens out (the gateway fills in at most the cap)."""
    return servers.get("examples")
