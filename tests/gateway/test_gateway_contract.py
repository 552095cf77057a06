"""Every route, status code and header of the HTTP contract (design.md section 2)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from r1nest.gateway.state import EngineState
from r1nest.ledger.memory import MemoryStore

from .conftest import ENGINE_KEY, MODEL, Harness


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_chat_completion_200_with_reasoning_content_and_credits_header(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=10_000)
    response = harness.chat(key)
    assert response.status_code == 200
    body = response.json()
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "think0 think1 think2 " and "reasoning" not in message
    assert message["content"] == "word0 word1 word2 word3 "
    # 1 credit per prompt token, 2 per completion token (conftest prices)
    usage = body["usage"]
    charged = usage["prompt_tokens"] + 2 * usage["completion_tokens"]
    assert int(response.headers["x-remaining-credits"]) == 10_000 - charged == harness.balance(key_id)


def test_x_api_key_header_works_like_bearer(harness: Harness) -> None:
    _, key = harness.new_key()
    response = harness.client.get("/v1/models", headers={"x-api-key": key})
    assert response.status_code == 200
    assert response.json()["data"][0]["id"] == MODEL
    assert "x-remaining-credits" in response.headers
    both = harness.client.get("/v1/models", headers={"x-api-key": key, **bearer(key)})
    assert both.status_code == 200


def test_two_different_keys_is_400(harness: Harness) -> None:
    _, key = harness.new_key()
    _, other = harness.new_key()
    response = harness.client.get("/v1/credits", headers={"x-api-key": key, **bearer(other)})
    assert response.status_code == 400
    assert key not in response.text and other not in response.text


@pytest.mark.parametrize("case", ["missing", "unknown", "malformed", "revoked", "expired", "basic"])
def test_bad_keys_are_401_invalid_api_key(harness: Harness, case: str) -> None:
    key_id, key = harness.new_key()
    headers: dict[str, str] = {}
    if case == "unknown":
        headers = bearer(key[:-4] + "AAAA")
    elif case == "malformed":
        headers = bearer("sk-not-our-format")
    elif case == "revoked":
        assert harness.client.post(f"/admin/keys/{key_id}/revoke", headers=harness.admin).json() == {"id": key_id, "revoked": True}
        headers = bearer(key)
    elif case == "expired":
        expires_at = time.time() + 1.0
        _, key = harness.new_key(expires_at=expires_at)
        time.sleep(max(0.0, expires_at - time.time()) + 0.05)
        headers = bearer(key)
    elif case == "basic":
        headers = {"Authorization": "Basic " + key}
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/credits")]:
        response = harness.client.request(method, path, headers=headers, json={"messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert "x-remaining-credits" not in response.headers
        assert key not in response.text
    assert not [r for r in harness.engine.requests if r.path.startswith("/v1/chat")]


def test_client_key_never_goes_upstream_engine_key_does(harness: Harness) -> None:
    _, key = harness.new_key()
    assert harness.chat(key).status_code == 200
    assert harness.chat(key, stream=True).status_code == 200
    forwarded = [r for r in harness.engine.requests if r.path == "/v1/chat/completions"]
    assert len(forwarded) == 2
    for request in forwarded:
        assert request.headers["Authorization"] == f"Bearer {ENGINE_KEY}"
        assert key not in json.dumps(request.headers) and key.encode() not in request.body
        assert "x-api-key" not in {name.lower() for name in request.headers}


def test_credits_endpoint_and_every_authenticated_answer_carries_the_header(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=5_000)
    credits = harness.client.get("/v1/credits", headers=bearer(key))
    assert credits.status_code == 200 and credits.json()["remaining_credits"] == 5_000
    answers = [
        harness.client.post("/v1/chat/completions", content=b"{not json", headers=bearer(key)),  # 400
        harness.chat(key, model="gpt-4o"),  # 404 model_not_found
        harness.chat(key, max_tokens=10**6),  # 400 over the cap
        harness.client.post("/v1/chat/completions", content=b"x" * 5_000_000, headers=bearer(key)),  # 413
        harness.chat(key),  # 200
        harness.chat(key, stream=True),  # 200 stream
        harness.client.get("/v1/models", headers=bearer(key)),
    ]
    statuses = [a.status_code for a in answers]
    assert statuses == [400, 404, 400, 413, 200, 200, 200]
    for answer in answers:
        assert int(answer.headers["x-remaining-credits"]) >= 0
    assert answers[1].json()["error"]["code"] == "model_not_found"
    assert int(answers[-1].headers["x-remaining-credits"]) == harness.balance(key_id)


def test_messages_cap_is_400(make_harness: Any) -> None:
    harness = make_harness(max_messages=2)
    _, key = harness.new_key()
    response = harness.chat(key, messages=[{"role": "user", "content": "x"}] * 3)
    assert response.status_code == 400 and "too many messages" in response.json()["error"]["message"]


def test_unaffordable_request_is_406_and_max_tokens_is_lowered_to_the_balance(harness: Harness) -> None:
    # the engine counts "hello there" as 4 prompt tokens: 4 credits + 2 for one token > 5
    key_id, key = harness.new_key(credits=5)
    response = harness.chat(key)
    assert response.status_code == 406
    assert response.json()["error"]["code"] == "insufficient_credits"
    assert response.headers["x-remaining-credits"] == "5"
    assert not [r for r in harness.engine.requests if r.path == "/v1/chat/completions"]

    key_id, key = harness.new_key(credits=200)
    harness.engine.configure(reasoning_tokens=100, content_tokens=100)
    response = harness.chat(key, max_tokens=1000)
    assert response.status_code == 200
    sent = harness.engine.requests[-1].json()
    # prompt bound + 2 credits per token must fit in 200 credits
    assert 1 <= sent["max_tokens"] < 100
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert harness.balance(key_id) >= 0


def test_absent_max_tokens_is_filled_and_capped(harness: Harness) -> None:
    _, key = harness.new_key(credits=10**9)
    assert harness.chat(key).status_code == 200
    assert harness.engine.requests[-1].json()["max_tokens"] == harness.settings.max_tokens_cap


def test_deepseek_conventions_reach_the_engine(harness: Harness) -> None:
    _, key = harness.new_key()
    harness.chat(key, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    sent = harness.engine.requests[-1].json()
    assert sent["messages"] == [{"role": "user", "content": "Be brief.\n\nHi"}]
    assert sent["temperature"] == 0.6 and sent["top_p"] == 0.95 and sent["model"] == MODEL


def test_unknown_path_404_and_wrong_method_405(harness: Harness) -> None:
    for path in ["/", "/v2/chat/completions", "/tokenize", "/docs"]:
        response = harness.client.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = harness.client.get("/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert harness.client.post("/v1/models").status_code == 405
    assert harness.client.delete("/admin/keys", headers=harness.admin).status_code == 405


def test_engine_failure_before_stream_is_502_and_costs_nothing(harness: Harness) -> None:
    key_id, key = harness.new_key(credits=10_000)
    harness.engine.configure(fail_before_stream=True)
    for stream in (False, True):
        response = harness.chat(key, stream=stream)
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "engine_error"
        assert response.headers["x-remaining-credits"] == "10000"
    assert harness.balance(key_id) == 10_000


def test_engine_unreachable_is_502(make_harness: Any, engine: Any) -> None:
    harness = make_harness()
    key_id, key = harness.new_key(credits=10_000)
    engine.stop()
    response = harness.chat(key)
    assert response.status_code == 502
    assert harness.balance(key_id) == 10_000


def test_warming_is_503_with_retry_after_and_health_says_so(make_harness: Any) -> None:
    state = EngineState()
    state.set_warming(eta_s=120)
    harness = make_harness(state=state)
    health = harness.client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "warming"
    assert 100 < health.json()["eta_s"] <= 120 and int(health.headers["retry-after"]) >= 100
    key_id, key = harness.new_key(credits=1000)
    response = harness.chat(key)
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert response.headers["x-remaining-credits"] == "1000"
    state.set_ready()
    assert harness.client.get("/health").json() == {"status": "ready"}
    assert harness.chat(key).status_code == 200


def test_internal_error_is_a_generic_500_without_trace(make_harness: Any) -> None:
    from r1nest.ledger.memory import MemoryStore

    class BrokenStore(MemoryStore):
        async def reserve(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret internal detail /srv/ledger")

    harness = make_harness(store=BrokenStore())
    _, key = harness.new_key()
    response = harness.chat(key)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "Traceback" not in response.text and "secret internal detail" not in response.text


def test_metrics_need_the_admin_key_and_count_requests(harness: Harness) -> None:
    _, key = harness.new_key()
    harness.chat(key)
    assert harness.client.get("/metrics").status_code == 401
    assert harness.client.get("/metrics", headers=bearer(key)).status_code == 401
    text = harness.client.get("/metrics", headers=harness.admin).text
    assert 'r1nest_requests_total{route="chat_completions",status="200"} 1' in text
    assert 'r1nest_engine_phase{phase="ready"} 1' in text
    assert "r1nest_credits_charged_total" in text and "r1nest_request_duration_seconds_bucket" in text
    assert 'r1nest_tokens_total{kind="completion"} 7' in text


def test_admin_api(harness: Harness) -> None:
    assert harness.client.get("/admin/keys").status_code == 401
    _, user_key = harness.new_key()
    assert harness.client.get("/admin/keys", headers=bearer(user_key)).status_code == 401
    created = harness.client.post("/admin/keys", json={"name": "alice", "credits": 100}, headers=harness.admin)
    assert created.status_code == 201
    body = created.json()
    assert set(body) == {"id", "key", "name", "remaining_credits", "max_concurrency", "rate_limit_rpm"}
    assert body["remaining_credits"] == 100 and body["max_concurrency"] is None
    listing = harness.client.get("/admin/keys", headers=harness.admin).json()["data"]
    row = next(r for r in listing if r["id"] == body["id"])
    assert set(row) == {"id", "name", "created_at", "expires_at", "revoked", "remaining_credits",
                        "max_concurrency", "rate_limit_rpm"}
    assert body["key"] not in json.dumps(listing)

    topup = f"/admin/keys/{body['id']}/topup"
    headers = {**harness.admin, "Idempotency-Key": "pay-1"}
    assert harness.client.post(topup, json={"credits": 50}, headers=headers).json() == {"id": body["id"], "remaining_credits": 150}
    assert harness.client.post(topup, json={"credits": 50}, headers=headers).json()["remaining_credits"] == 150
    assert harness.client.post(topup, json={"credits": 50}, headers=harness.admin).status_code == 400
    assert harness.client.post(topup, json={"credits": -5}, headers={**harness.admin, "Idempotency-Key": "x"}).status_code == 400
    usage = harness.client.get(f"/admin/keys/{body['id']}/usage", headers=harness.admin).json()
    assert usage["remaining_credits"] == 150 and [p["kind"] for p in usage["postings"]] == ["grant", "topup"]
    assert harness.client.post("/admin/keys/0123456789ab/revoke", headers=harness.admin).status_code == 404
    assert harness.client.post("/admin/keys", json={"credits": "lots"}, headers=harness.admin).status_code == 400


def test_overview_is_behind_login(harness: Harness) -> None:
    response = harness.client.get("/overview", follow_redirects=False)
    assert response.status_code in (303, 404)
    if response.status_code == 303:
        assert response.headers["location"].endswith("/overview/login")


def test_overview_page_after_admin_login(harness: Harness) -> None:
    pytest.importorskip("r1nest.overview.web")
    login = harness.client.post(
        "/overview/login", data={"admin_key": "wrong"}, headers={"Origin": harness.url}, follow_redirects=False
    )
    assert login.status_code in (401, 403, 200) and "set-cookie" not in login.headers
    from .conftest import ADMIN_KEY

    login = harness.client.post(
        "/overview/login", data={"admin_key": ADMIN_KEY}, headers={"Origin": harness.url}, follow_redirects=False
    )
    assert login.status_code == 303
    page = harness.client.get("/overview")
    assert page.status_code == 200 and MODEL in page.text and harness.url in page.text


def test_per_key_rate_limit_is_429_with_retry_after(make_harness: Any) -> None:
    harness = make_harness(rate_limit_rpm=2)  # the deployment's default: 2 per 60 s window
    key_id, key = harness.new_key(credits=10_000)
    _, other = harness.new_key(credits=10_000)
    assert [harness.chat(key).status_code for _ in range(2)] == [200, 200]
    limited = harness.chat(key)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert int(limited.headers["x-remaining-credits"]) == harness.balance(key_id)
    assert harness.chat(other).status_code == 200  # per key
    assert "r1nest_rate_limited_total 1" in harness.client.get("/metrics", headers=harness.admin).text


def test_a_keys_own_limits_override_the_default_and_can_change(make_harness: Any) -> None:
    harness = make_harness(rate_limit_rpm=1)
    key_id, key = harness.new_key(credits=10_000, rate_limit_rpm=3)
    assert [harness.chat(key).status_code for _ in range(4)] == [200, 200, 200, 429]
    changed = harness.client.post(f"/admin/keys/{key_id}/limits", json={"rate_limit_rpm": 1_000}, headers=harness.admin)
    assert changed.status_code == 200 and changed.json()["rate_limit_rpm"] == 1_000
    assert changed.json()["max_concurrency"] is None
    assert harness.chat(key).status_code == 200
    for bad in ({"rate_limit_rpm": 0}, {"rate_limit_rpm": 1.5}, {"max_concurrency": True}, {"max_concurrency": "2"}):
        refused = harness.client.post(f"/admin/keys/{key_id}/limits", json=bad, headers=harness.admin)
        assert refused.status_code == 400, bad
    unknown = harness.client.post("/admin/keys/0123456789ab/limits", json={}, headers=harness.admin)
    assert unknown.status_code == 404


def test_max_concurrency_refuses_a_second_stream_until_the_first_ends(make_harness: Any) -> None:
    harness = make_harness()
    key_id, key = harness.new_key(credits=100_000, max_concurrency=1)
    harness.engine.configure(hold_after_chunks=1, hold_s=30, reasoning_tokens=3)
    import socket as socket_module

    payload = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}).encode()
    sock = socket_module.create_connection(("127.0.0.1", harness.served.port), timeout=30)
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload)
    data = b""
    while b"reasoning_content" not in data:
        data += sock.recv(65536)
    second = harness.chat(key)
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert "in flight" in second.json()["error"]["message"]
    sock.close()  # the first ends (client gone): its reservation closes, the slot frees
    harness.engine.configure(hold_after_chunks=None)
    deadline = time.monotonic() + 30
    while harness.gateway.open_requests:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert harness.chat(key).status_code == 200


class _RevokedBeforeReserve(MemoryStore):
    """A key revoked by an admin between the request's authentication and its reservation."""

    async def reserve(self, key_id, credits, *, ttl_s, now, **limits):  # type: ignore[no-untyped-def]
        await self.revoke_key(key_id)
        return await super().reserve(key_id, credits, ttl_s=ttl_s, now=now, **limits)


def test_key_revoked_between_authentication_and_reservation_is_401(make_harness: Any) -> None:
    harness = make_harness(store=_RevokedBeforeReserve())
    key_id, key = harness.new_key(credits=10_000)
    response = harness.chat(key)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert not [r for r in harness.engine.requests if "completions" in r.path]
    assert harness.balance(key_id) == 10_000
