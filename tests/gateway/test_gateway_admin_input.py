"""The admin API's answers to input it must refuse and to a store that cannot answer.

- Numbers that are not finite (NaN, Infinity, -Infinity, 1e400) anywhere in an admin body: 400,
  nothing stored. NaN as `expires_at` used to create a key that never expires; Infinity one
  that made `GET /admin/keys` fail.
- Every admin answer is strict JSON (no NaN/Infinity tokens), even for a key a store took
  before expiries were checked.
- The store cannot answer (SQLite locked by another process past its busy timeout, DynamoDB's
  server killed): 503 with Retry-After and an OpenAI-style body; refused arguments: 400; a store
  bug: 500. Never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from r1nest.errors import StoreError, StoreUnavailable
from r1nest.ledger.base import KeyRecord
from r1nest.ledger.memory import MemoryStore
from r1nest.ledger.rules import MAX_CREDITS

KEY_ID = "0123456789ab"
T0 = 1_700_000_000.0


def strict_json(response: httpx.Response) -> Any:
    """The body as JSON that RFC 8259 allows: NaN, Infinity and -Infinity are not JSON."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"{response.request.method} {response.request.url.path} answered {token}")

    assert response.headers["content-type"] == "application/json", response.headers
    return json.loads(response.content, parse_constant=refuse)


def assert_error(response: httpx.Response, status: int, *, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = strict_json(response)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in response.text
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def post_raw(harness: Any, path: str, body: str, **headers: str) -> httpx.Response:
    return harness.client.post(
        path, content=body.encode(), headers={**harness.admin, "content-type": "application/json", **headers}
    )


# numbers that are not finite ----------------------------------------------------------------


NON_FINITE_CREATES = [
        '{"name": "n", "credits": 1, "expires_at": NaN}',
        '{"name": "n", "credits": 1, "expires_at": Infinity}',
        '{"name": "n", "credits": 1, "expires_at": -Infinity}',
        '{"name": "n", "credits": 1, "expires_at": 1e400}',
        '{"name": "n", "credits": 1, "expires_at": -1e400}',
        '{"name": "n", "credits": NaN}',
        '{"name": "n", "credits": Infinity}',
        '{"name": "n", "credits": 1, "note": [1, {"deep": NaN}]}',  # anywhere in the body
        '{"name": "n", "credits": 1, "note": 1e999}',
]
BAD_EXPIRIES = [
    "1" + "0" * 400,  # an integer beyond any double
    "10000000000000",  # past the year 9999: no date shows it
    "0",
    "-5",
    "true",
    '"2030-01-01"',
]


def test_create_refuses_numbers_that_are_not_finite(harness: Any) -> None:
    for body in NON_FINITE_CREATES:
        error = assert_error(post_raw(harness, "/admin/keys", body), 400)
        assert error["type"] == "invalid_request_error", body
        assert "finite" in error["message"], (body, error)
    assert strict_json(harness.client.get("/admin/keys", headers=harness.admin))["data"] == []


def test_create_refuses_an_expiry_that_is_not_future_unix_seconds(harness: Any) -> None:
    for expires_at in BAD_EXPIRIES:
        response = post_raw(harness, "/admin/keys", f'{{"name": "n", "credits": 1, "expires_at": {expires_at}}}')
        assert assert_error(response, 400)["param"] == "expires_at", expires_at
    past = harness.client.post("/admin/keys", json={"credits": 1, "expires_at": harness.gateway.clock() - 1}, headers=harness.admin)
    assert "future" in assert_error(past, 400)["message"]
    assert strict_json(harness.client.get("/admin/keys", headers=harness.admin))["data"] == []


def test_a_finite_expiry_still_works_and_lists_as_json(harness: Any) -> None:
    expires_at = harness.gateway.clock() + 3600
    response = harness.client.post("/admin/keys", json={"name": "n", "credits": 3, "expires_at": expires_at}, headers=harness.admin)
    assert response.status_code == 201, response.text
    listed = strict_json(harness.client.get("/admin/keys", headers=harness.admin))["data"]
    assert [row["expires_at"] for row in listed] == [pytest.approx(expires_at)]


def test_topup_refuses_numbers_that_are_not_finite(harness: Any) -> None:
    key_id, _ = harness.new_key(credits=10)
    for body in ['{"credits": NaN}', '{"credits": Infinity}', '{"credits": -Infinity}', '{"credits": 1e400}', '{"credits": 5, "x": NaN}']:
        error = assert_error(post_raw(harness, f"/admin/keys/{key_id}/topup", body, **{"Idempotency-Key": "pay-1"}), 400)
        assert "finite" in error["message"], (body, error)
    assert harness.balance(key_id) == 10
    # the refused top-up did not use up its idempotency key
    retried = harness.client.post(f"/admin/keys/{key_id}/topup", json={"credits": 5}, headers={**harness.admin, "Idempotency-Key": "pay-1"})
    assert strict_json(retried) == {"id": key_id, "remaining_credits": 15}


def test_every_admin_answer_is_strict_json(harness: Any) -> None:
    client, admin = harness.client, harness.admin
    created = client.post("/admin/keys", json={"name": "a", "credits": 5, "expires_at": harness.gateway.clock() + 60}, headers=admin)
    key_id = strict_json(created)["id"]
    answers = [
        created,
        client.get("/admin/keys", headers=admin),
        client.post(f"/admin/keys/{key_id}/topup", json={"credits": 1}, headers={**admin, "Idempotency-Key": "k"}),
        client.get(f"/admin/keys/{key_id}/usage", headers=admin),
        client.post(f"/admin/keys/{key_id}/revoke", headers=admin),
        client.post("/admin/keys", content=b"{not json", headers=admin),
        client.post("/admin/keys", content=b"[" * 10_000, headers=admin),  # nesting deeper than the parser goes
        client.post("/admin/keys/aaaaaaaaaaaa/revoke", headers=admin),
    ]
    assert [a.status_code for a in answers] == [201, 200, 200, 200, 200, 400, 400, 404]
    for answer in answers:
        strict_json(answer)


def test_a_key_stored_with_an_infinite_expiry_before_the_checks_still_lists(make_harness: Any) -> None:
    store = MemoryStore()
    harness = make_harness(store=store)
    store._keys[KEY_ID] = KeyRecord(KEY_ID, "old", "f" * 64, T0, float("inf"), False, 7)  # written by an old release
    response = harness.client.get("/admin/keys", headers=harness.admin)
    assert response.status_code == 200
    assert strict_json(response)["data"][0]["expires_at"] is None  # never expires, as null says


# refused arguments and store bugs -------------------------------------------------------------


def test_arguments_the_store_refuses_are_400(harness: Any) -> None:
    too_many = harness.client.post("/admin/keys", json={"credits": MAX_CREDITS + 1}, headers=harness.admin)
    assert "credits" in assert_error(too_many, 400)["message"]
    key_id, _ = harness.new_key(credits=MAX_CREDITS - 1)
    overflow = harness.client.post(f"/admin/keys/{key_id}/topup", json={"credits": 2}, headers={**harness.admin, "Idempotency-Key": "o"})
    assert "exceed" in assert_error(overflow, 400)["message"]


class FailingStore:
    """A memory store whose every call raises `error` once `failing` is set (startup's sweep
    goes through)."""

    def __init__(self, error: StoreError) -> None:
        self._store = MemoryStore()
        self.error = error
        self.failing = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.failing and name != "close":
                raise self.error
            return await method(*args, **kwargs)

        return call


ADMIN_CALLS = [
    ("GET", "/admin/keys", None),
    ("POST", "/admin/keys", {"name": "n", "credits": 1}),
    ("POST", f"/admin/keys/{KEY_ID}/revoke", None),
    ("POST", f"/admin/keys/{KEY_ID}/topup", {"credits": 1}),
    ("GET", f"/admin/keys/{KEY_ID}/usage", None),
]


def call_admin(harness: Any, method: str, path: str, body: Any) -> httpx.Response:
    return harness.client.request(method, path, json=body, headers={**harness.admin, "Idempotency-Key": "i"})


def test_an_unavailable_store_is_503_with_retry_after_on_every_admin_route(make_harness: Any) -> None:
    store = FailingStore(StoreUnavailable("DynamoDB ledger error: ThrottlingException: slow down"))
    harness = make_harness(store=store)
    store.failing = True
    for method, path, body in ADMIN_CALLS:
        response = call_admin(harness, method, path, body)
        error = assert_error(response, 503, code="ledger_unavailable")
        assert response.headers["retry-after"] == "5", (method, path)
        assert error["type"] == "server_error" and "ThrottlingException" in error["message"]


def test_a_store_bug_is_500_without_a_traceback(make_harness: Any, caplog: pytest.LogCaptureFixture) -> None:
    store = FailingStore(StoreError("ledger error: IntegrityError: NOT NULL constraint failed: keys.key_id"))
    harness = make_harness(store=store)
    store.failing = True
    for method, path, body in ADMIN_CALLS:
        error = assert_error(call_admin(harness, method, path, body), 500)
        assert "IntegrityError" not in error["message"]  # the log has it, the answer does not
    assert "IntegrityError" in caplog.text


# real outages ---------------------------------------------------------------------------------

from r1nest.testing.ledger_lock import locked_by_another_process  # noqa: E402


def test_a_sqlite_ledger_locked_by_another_process_is_503(
    make_harness: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from r1nest.ledger.sqlite import SqliteStore

    monkeypatch.setattr("r1nest.ledger.sqlite.BUSY_TIMEOUT_MS", 200)
    store = SqliteStore(tmp_path / "ledger.sqlite3")
    harness = make_harness(store=store)
    key_id, _ = harness.new_key(credits=10)
    try:
        with locked_by_another_process(store.path):
            for method, path, body in [
                ("POST", "/admin/keys", {"name": "n", "credits": 1}),
                ("POST", f"/admin/keys/{key_id}/topup", {"credits": 1}),
                ("POST", f"/admin/keys/{key_id}/revoke", None),
            ]:
                response = call_admin(harness, method, path, body)
                error = assert_error(response, 503, code="ledger_unavailable")
                assert response.headers["retry-after"] == "5"
                assert "database is locked" in error["message"]
            # WAL: reads go on while another process writes
            assert call_admin(harness, "GET", "/admin/keys", None).status_code == 200
            assert call_admin(harness, "GET", f"/admin/keys/{key_id}/usage", None).status_code == 200
        listed = strict_json(harness.client.get("/admin/keys", headers=harness.admin))["data"]
        assert [(row["id"], row["remaining_credits"], row["revoked"]) for row in listed] == [(key_id, 10, False)]
    finally:
        harness.served.call(store.close())


MOTO_SERVER_CHILD = textwrap.dedent(
    """
    import sys
    from r1nest.testing.dynamodb import moto_dynamodb_server

    with moto_dynamodb_server() as endpoint:
        print(endpoint, flush=True)
        sys.stdin.readline()
    """
)


def test_a_dynamodb_ledger_whose_server_died_is_503(make_harness: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("moto")
    from r1nest.ledger import dynamodb
    from r1nest.testing.dynamodb import FAKE_AWS_ENV, REGION

    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setattr(dynamodb, "MAX_ATTEMPTS", 1)  # no backoff: the point is the answer
    child = subprocess.Popen([sys.executable, "-c", MOTO_SERVER_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        endpoint = child.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:"), endpoint
        store = dynamodb.DynamoStore("admin-outage", REGION, endpoint_url=endpoint)
        store.create_table()
        harness = make_harness(store=store)
        key_id, _ = harness.new_key(credits=10)
    finally:
        child.kill()
        child.wait(30)
    for method, path, body in ADMIN_CALLS:
        response = call_admin(harness, method, path.replace(KEY_ID, key_id), body)
        assert_error(response, 503, code="ledger_unavailable")
        assert response.headers["retry-after"] == "5"
    harness.served.call(store.close())

