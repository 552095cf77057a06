"""Engine-only routes are unreachable through the gateway, whatever the spelling: all 404."""

from __future__ import annotations

import pytest

from .conftest import Harness, raw_request

TRICKS = [
    "/invocations",
    "//invocations",
    "///invocations",
    "/INVOCATIONS",
    "/pause",
    "/v1/../pause",
    "/v1/../../pause",
    "/v1/chat/completions/../../pause",
    "/v1/chat/../../invocations",
    "/health/../invocations",
    "/admin/../pause",
    "/overview/../pause",
    "/overview/static/../../pause",
    "/v1/%2e%2e/pause",
    "/%2e%2e/pause",
    "/v1/%2E%2E/pause",
    "/v1%2f..%2fpause",
    "/v1%2F..%2Fpause",
    "/v1/chat%2fcompletions",
    "/v1/models%2f..%2f..%2ftokenize",
    "/v1\\..\\pause",
    "/v1\\chat\\completions",
    "/v1/models/",
    "/v1/chat/completions/",
    "/v1//chat/completions",
    "//v1/chat/completions",
    "/./v1/models",
    "/v1/./models",
    "/V1/CHAT/COMPLETIONS",
    "/V1/models",
    "/v1/Models",
    "/v1/chat/completions;jsessionid=1",
    "/v1/chat/completions%00",
    "/v1/chat/completions%20",
    "/tokenize",
    "/detokenize",
    "/server_info",
    "/update_weights",
    "/v1/load_lora_adapter",
    "/metrics/../invocations",
    "/admin/keys/..%2f..%2fpause",
    "http://127.0.0.1/invocations",
    "http://127.0.0.1//pause",
]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_path_tricks_are_404_and_never_reach_the_engine(harness: Harness, method: str) -> None:
    _, key = harness.new_key()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = b'{"messages":[{"role":"user","content":"x"}]}'
    answers = {path: raw_request(harness.served.port, f"{method} {path} HTTP/1.1", headers, body)[0] for path in TRICKS}
    assert {path: status for path, status in answers.items() if status != 404} == {}
    assert [r.path for r in harness.engine.requests] == []
