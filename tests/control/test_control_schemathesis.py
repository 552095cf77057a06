"""Schemathesis against the control plane's own OpenAPI document, over every operation.

The document is fetched the way an operator would (GET /admin/openapi.json with the admin key,
from the gateway served on loopback); each operation then gets generated requests, valid ones
and invalid ones, sent through the gateway. Every answer must be no 5xx, a status the document
lists, JSON where it says JSON, and a body that matches the documented schema (errors included:
OpenAI's error shape). Admin operations carry the admin key; /v1/credits and /v1/usage a live
API key (in both headers the document names, so a generated one never differs). Operations on a key id are sent every other time with the id of a real key, so the
answers that succeed are checked too, not only 404s.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import ADMIN, ADMIN_KEY, Control

EXAMPLES_PER_OPERATION = 100  # ~15 s for all operations on 2 cores
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def keys(module_control: Control) -> dict[str, str]:
    """A key for the /v1 operations, another for admin operations on a real id."""
    _, user_key = module_control.new_key()
    target_id, _ = module_control.new_key()
    return {"user": user_key, "target_id": target_id}


@pytest.fixture(scope="module")
def control_schema(module_control: Control) -> Any:
    return schemathesis.openapi.from_url(module_control.url + "/admin/openapi.json", headers=ADMIN)


OPERATIONS = [
    "GET /admin/keys", "POST /admin/keys", "POST /admin/keys/{key_id}/revoke", "POST /admin/keys/{key_id}/topup",
    "POST /admin/keys/{key_id}/limits", "GET /admin/keys/{key_id}/usage", "GET /admin/usage",
    "GET /v1/credits", "GET /v1/usage",
]


@pytest.mark.parametrize("label", OPERATIONS)
def test_every_operation_answers_within_its_schema_and_never_5xx(
    label: str, control_schema: Any, keys: dict[str, str]
) -> None:
    operation = control_schema.find_operation_by_label(label)
    assert operation is not None, label
    turns = itertools.count()
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def check(case: Any) -> None:
        key = keys["user"] if label.startswith("GET /v1/") else ADMIN_KEY
        headers = {"Authorization": f"Bearer {key}", "x-api-key": key}  # both documented ways, one key
        if "{key_id}" in label and next(turns) % 2:
            case.path_parameters = {**(case.path_parameters or {}), "key_id": keys["target_id"]}
        response = case.call(headers=headers)
        case.validate_response(response, checks=CHECKS, headers=headers)

    check()


def test_the_document_covers_every_control_operation(control_schema: Any) -> None:
    """The parametrized test above runs every operation the document lists."""
    operations = {f"{op.method.upper()} {op.path}" for op in (r.ok() for r in control_schema.get_all_operations())}
    assert operations == set(OPERATIONS)
