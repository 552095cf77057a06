"""The control plane's own rules, through the gateway on loopback: its OpenAPI document only for
the admin, bodies closed and strict (400 naming the field, never FastAPI's 422), the admin key
checked before a body is read, and every failure an OpenAI-style JSON error without a traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest

from .conftest import ADMIN, Control


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in response.text
    return body["error"]


def test_the_openapi_document_is_for_the_admin_only(control: Control) -> None:
    _, user_key = control.new_key()
    assert error_of(control.client.get("/admin/openapi.json"), 401)["code"] == "invalid_api_key"
    error_of(control.client.get("/admin/openapi.json", headers={"Authorization": f"Bearer {user_key}"}), 401)
    document = control.client.get("/admin/openapi.json", headers=ADMIN)
    assert document.status_code == 200
    paths = document.json()["paths"]
    assert "/admin/keys" in paths and "/v1/credits" in paths and "/overview" not in paths
    assert "422" not in json.dumps(document.json()["paths"])  # refusals are 400s, documented as such
    assert paths["/admin/keys"]["post"]["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    for public in ("/docs", "/redoc", "/openapi.json", "/admin/docs"):
        error_of(control.client.get(public, headers=ADMIN), 404)
    error_of(control.client.post("/admin/openapi.json", headers=ADMIN), 405)


def test_unknown_fields_and_loose_types_are_400_naming_the_field(control: Control) -> None:
    key_id, _ = control.new_key(credits=10)
    refused = [
        ("/admin/keys", {"credits": 1, "nmae": "typo"}, "nmae"),
        ("/admin/keys", {"credits": "5"}, "credits"),
        ("/admin/keys", {"credits": 5.0}, "credits"),
        ("/admin/keys", {"credits": 1, "name": 7}, "name"),
        ("/admin/keys", {"credits": 1, "max_concurrency": 100_001}, "max_concurrency"),
        ("/admin/keys", {"name": "no credits"}, "credits"),
        (f"/admin/keys/{key_id}/limits", {"rate_limit_rpm": 5, "burst": 2}, "burst"),
        (f"/admin/keys/{key_id}/limits", {"rate_limit_rpm": 1_000_001}, "rate_limit_rpm"),
        (f"/admin/keys/{key_id}/topup", {"credits": 0}, "credits"),
    ]
    for path, body, param in refused:
        response = control.client.post(path, json=body, headers={**ADMIN, "Idempotency-Key": "t"})
        error = error_of(response, 400)
        assert (error["param"], error["type"], error["code"]) == (param, "invalid_request_error", "invalid_request"), (
            path, body, error)
    listed = control.client.get("/admin/keys", headers=ADMIN).json()["data"]
    assert [(row["id"], row["remaining_credits"], row["rate_limit_rpm"]) for row in listed] == [(key_id, 10, None)]


def test_a_topup_without_an_idempotency_key_is_400_naming_the_header(control: Control) -> None:
    key_id, _ = control.new_key(credits=10)
    for headers in (ADMIN, {**ADMIN, "Idempotency-Key": ""}):
        error = error_of(control.client.post(f"/admin/keys/{key_id}/topup", json={"credits": 5}, headers=headers), 400)
        assert error["param"] == "Idempotency-Key", error
    assert control.client.get(f"/admin/keys/{key_id}/usage", headers=ADMIN).json()["remaining_credits"] == 10


def test_a_body_is_json_whatever_its_content_type_and_bounded(control: Control) -> None:
    created = control.client.post("/admin/keys", content=b'{"credits": 3}', headers={**ADMIN, "content-type": "text/plain"})
    assert created.status_code == 201 and created.json()["remaining_credits"] == 3
    big = json.dumps({"credits": 1, "name": "x" * 20_000}).encode()
    assert error_of(control.client.post("/admin/keys", content=big, headers=ADMIN), 413)["code"] == "request_too_large"


def test_the_admin_key_is_checked_before_the_body_is_read(control: Control) -> None:
    for body in (b'{"credits": NaN}', b"[" * 10_000, b"x" * 40_000):
        error = error_of(control.client.post("/admin/keys", content=body), 401)
        assert error["code"] == "invalid_api_key"
    assert control.client.get("/admin/keys", headers=ADMIN).json()["data"] == []


def test_an_api_key_callers_refusals_carry_its_balance_and_the_log_its_id(
    control: Control, caplog: pytest.LogCaptureFixture
) -> None:
    key_id, key = control.new_key(credits=4_321)
    user = {"Authorization": f"Bearer {key}"}
    with caplog.at_level(logging.INFO, logger="r1nest.gateway.access"):
        refused = control.client.get("/v1/usage", params={"bucket": "week"}, headers=user)
        credits = control.client.get("/v1/credits", headers=user)
    assert error_of(refused, 400)["param"] == "bucket"
    assert refused.headers["x-remaining-credits"] == "4321" == credits.headers["x-remaining-credits"]
    assert credits.json() == {"object": "credits", "id": key_id, "remaining_credits": 4321}
    lines = [r.getMessage() for r in caplog.records if r.name == "r1nest.gateway.access"]
    assert any(line.startswith("GET credits 200") and f"key_id={key_id}" in line for line in lines), lines
    assert any(line.startswith("GET usage 400") and f"key_id={key_id}" in line for line in lines), lines


class Broken(Exception):
    pass


def test_a_bug_in_a_handler_is_a_generic_500_logged_with_its_traceback(
    control: Control, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id, key = control.new_key()

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise Broken("secret detail of a bug")

    monkeypatch.setattr(control.store, "list_keys", broken)
    monkeypatch.setattr(control.store, "usage", broken)
    with caplog.at_level(logging.ERROR):
        answers = [control.client.get("/admin/keys", headers=ADMIN),
                   control.client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"})]
    for response in answers:
        error = error_of(response, 500)
        assert error["message"] == "Internal error." and "secret detail" not in response.text
    assert caplog.text.count("secret detail of a bug") >= 2 and "Traceback" in caplog.text
    assert control.client.get(f"/admin/keys/{key_id}/usage", headers=ADMIN).status_code == 200  # still serving


def test_the_overviews_plain_refusals_are_json_errors_from_the_gateway(control: Control) -> None:
    error_of(control.client.get("/overview/static/missing.css"), 404)
    error_of(control.client.get("/overview/static/a/b"), 404)
    refused = control.client.post("/overview/login", data={"admin_key": "x"}, headers={"Origin": "http://evil.test"})
    assert error_of(refused, 403)["message"] == "The overview refused the request."
    assert control.client.get("/overview/login").headers["content-type"].startswith("text/html")
