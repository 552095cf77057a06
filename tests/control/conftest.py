"""The control plane under test: the whole gateway served by uvicorn on loopback, as deployed
(the control routes reach the control app through the gateway's allowlist), with a fake engine
behind it and an in-memory ledger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import httpx
import pytest

from r1nest.gateway.app import create_app
from r1nest.gateway.upstream import UpstreamConfig
from r1nest.ledger.memory import MemoryStore
from r1nest.settings import Settings
from r1nest.testing.asgi_server import ServedApp
from r1nest.testing.fake_engine import FakeEngine

ENGINE_KEY = "engine-secret-0123456789abcdef"
MODEL = "deepseek-r1"
ADMIN_KEY = "r1nadmin-0b0b0b0b0b0b-" + "B" * 43
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class Control:
    url: str
    served: ServedApp
    store: MemoryStore
    client: httpx.Client

    def new_key(self, credits: int = 1_000_000) -> tuple[str, str]:
        """(id, plaintext) of a fresh key, made through the admin API."""
        response = self.client.post("/admin/keys", json={"name": "control", "credits": credits}, headers=ADMIN)
        assert response.status_code == 201, response.text
        return response.json()["id"], response.json()["key"]


def serve(tmp_path: Any) -> Iterator[Control]:
    with FakeEngine(api_key=ENGINE_KEY, served_model=MODEL) as engine:
        store = MemoryStore()
        settings = Settings(data_dir=tmp_path, admin_key=ADMIN_KEY, served_model=MODEL)
        app = create_app(settings=settings, store=store, upstream=UpstreamConfig(engine.url, ENGINE_KEY, MODEL))
        with ServedApp(app) as served, httpx.Client(base_url=served.url, timeout=30) as client:
            yield Control(served.url, served, store, client)


@pytest.fixture
def control(tmp_path: Any) -> Iterator[Control]:
    yield from serve(tmp_path)


@pytest.fixture(scope="module")
def module_control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    yield from serve(tmp_path_factory.mktemp("control"))
