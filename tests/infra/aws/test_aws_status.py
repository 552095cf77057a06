"""`r1nest status` against moto (EC2, Service Quotas) and a real HTTP server on loopback.

moto's Service Quotas backend knows only the VPC quotas: for the EC2 GPU codes it answers
NoSuchResourceException (as AWS does for a quota without an applied value), and it has no API to
set a value. So the quota checks run twice: against moto for the "no value" path, and against
`FakeQuotas`, which implements the same two calls with AWS's response and error shapes, for the
"too low" / "enough" paths.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

boto3 = pytest.importorskip("boto3")
moto = pytest.importorskip("moto")
from botocore.exceptions import ClientError  # noqa: E402

from r1nest.cloud import status as status_mod  # noqa: E402
from r1nest.cloud.status import StackFacts, assess_quota, collect, read_quota  # noqa: E402
from r1nest.errors import ConfigError  # noqa: E402

REGION = "us-east-1"


class FakeQuotas:
    """Service Quotas' two calls: applied values, else AWS defaults, else NoSuchResourceException."""

    def __init__(self, applied: dict[str, float] | None = None, defaults: dict[str, float] | None = None) -> None:
        self.applied, self.defaults = dict(applied or {}), dict(defaults or {})
        self.calls: list[tuple[str, str]] = []

    def _answer(self, table: dict[str, float], operation: str, code: str) -> dict[str, Any]:
        self.calls.append((operation, code))
        if code not in table:
            raise ClientError({"Error": {"Code": "NoSuchResourceException", "Message": "The request failed because "
                                         "the specified service quota does not exist."}}, operation)
        return {"Quota": {"ServiceCode": "ec2", "QuotaCode": code, "Value": table[code], "Unit": "None"}}

    def get_service_quota(self, *, ServiceCode: str, QuotaCode: str) -> dict[str, Any]:
        assert ServiceCode == "ec2"
        return self._answer(self.applied, "GetServiceQuota", QuotaCode)

    def get_aws_default_service_quota(self, *, ServiceCode: str, QuotaCode: str) -> dict[str, Any]:
        assert ServiceCode == "ec2"
        return self._answer(self.defaults, "GetAWSDefaultServiceQuota", QuotaCode)


class _Health(BaseHTTPRequestHandler):
    answer: tuple[int, dict] = (200, {"status": "ready"})

    def do_GET(self) -> None:  # noqa: N802
        code, body = self.server.answer if self.path == "/health" else (404, {"error": "not found"})  # type: ignore[attr-defined]
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    server.answer = (200, {"status": "ready"})  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def aws(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION,
                        "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}.items():  # loading moto's AMI list is slow
        monkeypatch.setenv(name, value)
    with moto.mock_aws():
        yield boto3.session.Session(region_name=REGION)


def launch(session, deployment: str, instance_type: str, roles: list[str]) -> list[str]:
    ec2 = session.client("ec2")
    image = "ami-0123456789abcdef0"  # moto does not check it against an AMI list
    ids = []
    for role in roles:
        answer = ec2.run_instances(
            ImageId=image, InstanceType=instance_type, MinCount=1, MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [
                {"Key": "r1nest:deployment", "Value": deployment}, {"Key": "r1nest:role", "Value": role}]}],
        )
        ids.append(answer["Instances"][0]["InstanceId"])
    return ids


def facts(url: str, **changes: Any) -> StackFacts:
    outputs = {"deployment": "r1nest-dev", "region": REGION, "instance_type": "g6.xlarge", "nodes": 1,
               "replicas": 1, "spot": False, "public_endpoint": url + "/v1"}
    outputs.update(changes)
    return StackFacts.from_outputs(outputs)


def url_of(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_running_and_healthy_with_enough_quota(aws, gateway):
    ids = launch(aws, "r1nest-dev", "g6.xlarge", ["head"])
    launch(aws, "someone-else", "g6.xlarge", ["head"])  # not ours: must not be counted
    report = collect(facts(url_of(gateway), instance_ids=ids), ec2=aws.client("ec2"),
                     quotas=FakeQuotas(applied={"L-DB2E81BA": 64.0}))
    assert report.ok, report.problems
    assert [i.instance_id for i in report.instances] == ids and report.instances[0].role == "head"
    assert report.health.phase == "ready" and report.quota.value_vcpus == 64 and report.quota.needed_vcpus == 4


def test_quota_too_low_for_two_p5_nodes_says_what_to_ask_for(aws, gateway):
    launch(aws, "r1nest-dev", "p5.48xlarge", ["head", "worker"])
    quotas = FakeQuotas(defaults={"L-417A185B": 0.0})
    report = collect(facts(url_of(gateway), instance_type="p5.48xlarge", nodes=2), ec2=aws.client("ec2"), quotas=quotas)
    assert not report.ok
    message = report.quota.message
    assert "GPU quota too low" in message and "Running On-Demand P instances" in message
    assert "is 0 vCPUs" in message and "needs 384" in message
    assert "--quota-code L-417A185B --desired-value 384" in message
    # the applied value is asked first, AWS's default when the account has none
    assert quotas.calls == [("GetServiceQuota", "L-417A185B"), ("GetAWSDefaultServiceQuota", "L-417A185B")]


@pytest.mark.parametrize("family_type, spot, code", [
    ("g6e.xlarge", False, "L-DB2E81BA"), ("p5e.48xlarge", False, "L-417A185B"),
    ("g6.xlarge", True, "L-3819A6DF"), ("p5.48xlarge", True, "L-7212CCBC"),
])
def test_the_quota_code_follows_the_family_and_the_market(family_type, spot, code):
    check = assess_quota(facts("http://x", instance_type=family_type, spot=spot), 0)
    assert check.code == code and not check.ok


def test_quota_enough_exactly_at_the_need():
    assert assess_quota(facts("http://x", instance_type="g6.12xlarge", replicas=2), 96).ok
    assert not assess_quota(facts("http://x", instance_type="g6.12xlarge", replicas=2), 95).ok


def test_moto_answers_gpu_quota_codes_as_aws_does_without_an_applied_value(aws):
    # the error read_quota falls back on; moto implements no GetAWSDefaultServiceQuota
    for code in ("L-DB2E81BA", "L-417A185B"):
        with pytest.raises(ClientError) as caught:
            aws.client("service-quotas").get_service_quota(ServiceCode="ec2", QuotaCode=code)
        assert caught.value.response["Error"]["Code"] == "NoSuchResourceException"


def test_no_value_anywhere_is_reported_without_failing(aws, gateway):
    launch(aws, "r1nest-dev", "g6.xlarge", ["head"])
    assert read_quota(FakeQuotas(), "L-DB2E81BA") is None
    report = collect(facts(url_of(gateway)), ec2=aws.client("ec2"), quotas=FakeQuotas())
    assert report.ok and report.quota.value_vcpus is None and "has no value" in report.quota.message


def test_quota_errors_other_than_no_such_resource_are_not_swallowed():
    class Denied(FakeQuotas):
        def get_service_quota(self, *, ServiceCode: str, QuotaCode: str) -> dict[str, Any]:
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "GetServiceQuota")

    with pytest.raises(ClientError):
        read_quota(Denied(), "L-DB2E81BA")


def test_warming_gateway_and_stopped_instance_are_reported(aws, gateway):
    (instance_id,) = launch(aws, "r1nest-dev", "g6.xlarge", ["head"])
    aws.client("ec2").stop_instances(InstanceIds=[instance_id])
    gateway.answer = (503, {"status": "warming", "eta_s": 120.0})  # type: ignore[attr-defined]
    report = collect(facts(url_of(gateway)), ec2=aws.client("ec2"), quotas=FakeQuotas(applied={"L-DB2E81BA": 8}))
    assert not report.ok
    assert report.health.phase == "warming" and report.health.status == 503
    assert any("0 of 1 instances running" in p for p in report.problems)


def test_unreachable_gateway_and_missing_instance(aws):
    report = collect(facts("http://127.0.0.1:9", instance_ids=["i-0123456789abcdef0"]), ec2=aws.client("ec2"),
                     quotas=FakeQuotas(applied={"L-DB2E81BA": 8}))
    assert report.health.phase == "unreachable"
    assert any("i-0123456789abcdef0" in p for p in report.problems)
    assert any("none found" in p for p in report.problems)


@pytest.fixture
def quotas_for_cli(monkeypatch) -> FakeQuotas:
    """The CLI builds its clients with `aws_clients(region)`; EC2 stays moto's, quotas the fake's."""
    quotas = FakeQuotas(applied={"L-DB2E81BA": 8})
    monkeypatch.setattr(status_mod, "aws_clients", lambda region: (boto3.client("ec2", region_name=region), quotas))
    return quotas


def test_cli_reads_the_stack_json_and_prints_json(aws, gateway, tmp_path, quotas_for_cli):
    launch(aws, "r1nest-dev", "g6.xlarge", ["head"])
    stack = tmp_path / "stack.json"
    stack.write_text(json.dumps({"deployment": "r1nest-dev", "region": REGION, "instance_type": "g6.xlarge",
                                 "nodes": 1, "replicas": 1, "public_endpoint": url_of(gateway) + "/v1",
                                 "api_key": "[secret]"}))
    result = CliRunner().invoke(status_mod.status, ["--stack-json", str(stack), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["health"]["phase"] == "ready" and len(report["instances"]) == 1
    assert report["quota"]["code"] == "L-DB2E81BA"

    human = CliRunner().invoke(status_mod.status, ["--stack-json", str(stack)])
    assert human.exit_code == 0 and "deployment r1nest-dev in us-east-1" in human.output


def test_cli_exit_status_is_1_when_a_check_fails(aws, tmp_path, quotas_for_cli):
    stack = tmp_path / "stack.json"
    stack.write_text(json.dumps({"deployment": "r1nest-dev", "region": REGION, "instance_type": "g6.xlarge",
                                 "public_endpoint": "http://127.0.0.1:9/v1"}))
    result = CliRunner().invoke(status_mod.status, ["--stack-json", str(stack)])
    assert result.exit_code == 1 and "problems:" in result.output


@pytest.mark.parametrize("content, says", [
    ("not json", "not JSON"), ("[]", "not a JSON object"), ("{}", "lack deployment"),
])
def test_bad_stack_outputs_are_clear_errors(tmp_path, content, says):
    stack = tmp_path / "stack.json"
    stack.write_text(content)
    with pytest.raises(ConfigError, match=says):
        StackFacts.from_outputs(status_mod.load_outputs(stack_json=stack, stack_dir=None))


def test_without_the_pulumi_cli_the_error_says_to_use_stack_json(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `pulumi` on it
    with pytest.raises(ConfigError, match="--stack-json"):
        status_mod.load_outputs(stack_json=None, stack_dir=tmp_path)
