"""One test per policy the AWS deployment must hold, in the style of pulumi/examples testing-unit-py.

Each policy test runs the real program under mocks twice: as configured (the check must report
nothing) and with one violation planted on the way to the engine by a stack transformation (the
check must report it). A check that cannot go red proves nothing.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pulumi
import pytest

from r1nest_aws import policies
from r1nest.ports import ENGINE_PORT, GATEWAY_PORT

INSTANCE = "aws:ec2/instance:Instance"
SG = "aws:ec2/securityGroup:SecurityGroup"

FAKE_ADMIN_KEY = "r1nadmin-0123456789ab-" + "Q" * 43


def plant(token: str, change: Callable[[dict], None]) -> Callable[[Any], Any]:
    """A stack transformation that applies `change` to the props of every `token` resource."""

    def transformation(args: pulumi.ResourceTransformationArgs) -> pulumi.ResourceTransformationResult | None:
        if args.type_ != token:
            return None
        props = dict(args.props)
        change(props)
        return pulumi.ResourceTransformationResult(props, args.opts)

    return transformation


def add_ingress(rule: dict) -> Callable[[Any], Any]:
    def change(props: dict) -> None:
        props["ingress"] = list(props.get("ingress") or []) + [rule]

    return plant(SG, change)


# -- IMDSv2 ---------------------------------------------------------------------------------------

def test_imdsv2_required_with_hop_limit_1(run_stack):
    run = run_stack()
    assert policies.imdsv2_required(run.resources) == []
    options = run.one(INSTANCE).inputs["metadataOptions"]
    assert options["httpTokens"] == "required" and options["httpPutResponseHopLimit"] == 1


@pytest.mark.parametrize("options", [
    {"http_endpoint": "enabled", "http_tokens": "optional", "http_put_response_hop_limit": 1},
    {"http_endpoint": "enabled", "http_tokens": "required", "http_put_response_hop_limit": 2},
    None,
], ids=["imdsv1-allowed", "hop-limit-2", "no-metadata-options"])
def test_imdsv2_check_reports_a_planted_violation(run_stack, options):
    def change(props: dict) -> None:
        props["metadata_options"] = options

    run = run_stack(plant=plant(INSTANCE, change))
    assert policies.imdsv2_required(run.resources)


# -- encryption -----------------------------------------------------------------------------------

def test_every_volume_is_encrypted(run_stack):
    run = run_stack()
    assert policies.volumes_encrypted(run.resources) == []
    root = run.one(INSTANCE).inputs["rootBlockDevice"]
    assert root["volumeType"] == "gp3" and root["encrypted"] is True


@pytest.mark.parametrize("where", ["root", "extra-volume"])
def test_encryption_check_reports_a_planted_violation(run_stack, where):
    def change(props: dict) -> None:
        if where == "root":
            props["root_block_device"] = {"volume_type": "gp3", "volume_size": 100, "encrypted": False}
        else:
            props["ebs_block_devices"] = [{"device_name": "/dev/sdf", "volume_size": 500, "volume_type": "gp3"}]

    run = run_stack(plant=plant(INSTANCE, change))
    assert policies.volumes_encrypted(run.resources)


# -- ingress --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cidrs", ["203.0.113.0/24", "203.0.113.7/32,198.51.100.0/24", "0.0.0.0/0"])
def test_only_the_gateway_port_is_open_and_only_to_the_allowed_cidrs(run_stack, cidrs):
    run = run_stack(allowedCidrs=cidrs)
    allowed = cidrs.split(",")
    assert policies.only_gateway_port_open(run.resources, allowed_cidrs=allowed, gateway_port=GATEWAY_PORT) == []
    (rule,) = run.one(SG).inputs["ingress"]
    assert (rule["fromPort"], rule["toPort"], rule["protocol"]) == (GATEWAY_PORT, GATEWAY_PORT, "tcp")
    assert sorted(rule["cidrBlocks"]) == sorted(allowed)


@pytest.mark.parametrize("rule", [
    {"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr_blocks": ["0.0.0.0/0"]},
    {"protocol": "tcp", "from_port": GATEWAY_PORT, "to_port": GATEWAY_PORT, "cidr_blocks": ["0.0.0.0/0"]},
    {"protocol": "-1", "from_port": 0, "to_port": 0, "cidr_blocks": ["203.0.113.0/24"]},
    {"protocol": "tcp", "from_port": 7999, "to_port": 8001, "cidr_blocks": ["203.0.113.0/24"]},
], ids=["ssh-to-world", "gateway-to-world-not-allowed", "all-traffic-from-allowed", "port-range"])
def test_ingress_check_reports_a_planted_violation(run_stack, rule):
    run = run_stack(plant=add_ingress(rule))  # allowedCidrs: 203.0.113.0/24
    assert policies.only_gateway_port_open(run.resources, allowed_cidrs=["203.0.113.0/24"], gateway_port=GATEWAY_PORT)


# -- engine port ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [{}, {"model": "deepseek-r1", "instanceType": "p5.48xlarge", "nodes": "2"}],
                         ids=["one-node", "two-nodes"])
def test_engine_port_is_never_open_and_the_engine_listens_on_loopback(run_stack, variant):
    run = run_stack(**variant)
    assert policies.engine_port_closed(run.resources, engine_port=ENGINE_PORT) == []
    hosts = [h for _, text in policies.user_data_texts(run.resources) for h in policies.engine_hosts(text)]
    assert hosts and set(hosts) == {"127.0.0.1"}


def _engine_on_all_addresses(props: dict) -> None:
    props["user_data"] = pulumi.Output.from_input(props["user_data"]).apply(
        lambda text: text.replace("--host 127.0.0.1", "--host 0.0.0.0"))


@pytest.mark.parametrize("planted", [
    add_ingress({"protocol": "tcp", "from_port": ENGINE_PORT, "to_port": ENGINE_PORT, "cidr_blocks": ["10.0.0.0/8"]}),
    add_ingress({"protocol": "tcp", "from_port": 8000, "to_port": 9000, "cidr_blocks": ["203.0.113.0/24"]}),
    plant(INSTANCE, _engine_on_all_addresses),
], ids=["engine-port-rule", "range-covering-engine-port", "engine-on-0.0.0.0"])
def test_engine_port_check_reports_a_planted_violation(run_stack, planted):
    run = run_stack(plant=planted)
    assert policies.engine_port_closed(run.resources, engine_port=ENGINE_PORT)


# -- key pair -------------------------------------------------------------------------------------

def test_no_key_pair(run_stack):
    run = run_stack()
    assert policies.no_key_pair(run.resources) == []


def test_key_pair_check_reports_a_planted_key(run_stack):
    run = run_stack(plant=plant(INSTANCE, lambda props: props.__setitem__("key_name", "laptop")))
    assert policies.no_key_pair(run.resources)


# -- user data ------------------------------------------------------------------------------------

def test_user_data_is_free_of_secrets(run_stack):
    run = run_stack()
    keys = [run.outputs["api_key"], run.outputs["admin_key"]]
    assert policies.user_data_free_of_secrets(run.resources, keys) == []
    (text,) = [t for _, t in policies.user_data_texts(run.resources)]
    # the parameter names are there, the values are read at boot through the role
    assert run.outputs["api_key_parameter"] in text and run.outputs["admin_key_parameter"] in text
    assert "aws ssm get-parameter" in text and "--with-decryption" in text


_captured: dict[str, Any] = {}


def _capture_key(args: pulumi.ResourceTransformationArgs) -> None:
    if args.type_ == "aws:ssm/parameter:Parameter" and args.name.endswith("api-key"):
        _captured["api_key"] = args.props["value"]
    return None


def _leak_captured_key(args: pulumi.ResourceTransformationArgs) -> pulumi.ResourceTransformationResult | None:
    _capture_key(args)
    if args.type_ != INSTANCE:
        return None
    props = dict(args.props)
    props["user_data"] = pulumi.Output.all(props["user_data"], pulumi.Output.unsecret(_captured["api_key"])).apply(
        lambda values: values[0] + f"# export KEY=\"{values[1]}\"\n")
    return pulumi.ResourceTransformationResult(props, args.opts)


def _append_token(props: dict) -> None:
    props["user_data"] = pulumi.Output.from_input(props["user_data"]).apply(
        lambda text: text + f"  - [sh, -c, 'echo R1NEST_ADMIN_KEY={FAKE_ADMIN_KEY} >> /etc/r1nest/gateway.env']\n")


@pytest.mark.parametrize("planted", [plant(INSTANCE, _append_token), _leak_captured_key],
                         ids=["fake-admin-token", "the-real-api-key"])
def test_user_data_check_reports_a_planted_secret(run_stack, planted):
    run = run_stack(plant=planted)
    keys = [run.outputs["api_key"], run.outputs["admin_key"]]
    assert policies.user_data_free_of_secrets(run.resources, keys)


# -- outputs --------------------------------------------------------------------------------------

REQUIRED_OUTPUTS = ("public_endpoint", "internal_endpoint", "api_key", "admin_key", "model", "engine",
                    "instance_type", "nodes", "overview_url", "credits", "region", "instance_ids", "deployment")


def check_outputs(outputs: dict, secret_outputs: set[str]) -> list[str]:
    from r1nest.keys import parse_key_id

    problems = [f"missing output {name}" for name in REQUIRED_OUTPUTS if name not in outputs]
    problems += [f"{name} is not a secret output" for name in ("api_key", "admin_key") if name not in secret_outputs]
    for name in ("api_key", "admin_key"):
        if name in outputs and parse_key_id(outputs[name]) is None:
            problems.append(f"{name} is not in r1nest's key format")
    for name in ("public_endpoint", "internal_endpoint"):
        if name in outputs and not (outputs[name].startswith("http") and outputs[name].endswith("/v1")):
            problems.append(f"{name} is not an API base URL: {outputs[name]}")
    return problems


def test_outputs_are_present_and_keys_are_secret(run_stack):
    run = run_stack()
    assert check_outputs(run.outputs, run.secret_outputs) == []
    assert run.outputs["api_key"].startswith("r1n-") and run.outputs["admin_key"].startswith("r1nadmin-")
    eip = run.one("aws:ec2/eip:Eip")
    assert eip.inputs["domain"] == "vpc"
    assert run.outputs["public_endpoint"].startswith("http://198.51.100.")  # the Elastic IP (mocked range)
    assert run.outputs["internal_endpoint"].startswith("http://10.42.")  # the private address
    assert run.outputs["overview_url"] == run.outputs["public_endpoint"][: -len("/v1")] + "/overview"
    assert run.outputs["credits"] == 1_000_000 and run.outputs["nodes"] == 1


def test_outputs_check_reports_a_key_that_is_not_secret(run_stack, monkeypatch):
    monkeypatch.setattr(pulumi.Output, "secret", staticmethod(lambda value: pulumi.Output.from_input(value)))
    run = run_stack()
    assert "api_key is not a secret output" in check_outputs(run.outputs, run.secret_outputs)


# -- IAM ------------------------------------------------------------------------------------------

def _parameter_arns(run) -> list[str]:
    return [f"arn:aws:ssm:us-east-1:123456789012:parameter{run.outputs[n]}" for n in ("api_key_parameter", "admin_key_parameter")]


def test_instance_role_reads_exactly_the_two_key_parameters(run_stack):
    run = run_stack()
    assert policies.iam_least_privilege(run.resources, parameter_arns=_parameter_arns(run)) == []
    attachments = run.of("aws:iam/rolePolicyAttachment:RolePolicyAttachment")
    assert [a.inputs["policyArn"] for a in attachments] == ["arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"]


def _widen(policy_text: str) -> str:
    import json

    document = json.loads(policy_text)
    document["Statement"][0]["Resource"] = ["arn:aws:ssm:us-east-1:123456789012:parameter/*"]
    return json.dumps(document)


@pytest.mark.parametrize("planted", [
    plant("aws:iam/rolePolicy:RolePolicy",
          lambda props: props.__setitem__("policy", pulumi.Output.from_input(props["policy"]).apply(_widen))),
    plant("aws:iam/rolePolicyAttachment:RolePolicyAttachment",
          lambda props: props.__setitem__("policy_arn", "arn:aws:iam::aws:policy/AdministratorAccess")),
], ids=["every-parameter", "admin-policy"])
def test_iam_check_reports_a_planted_widening(run_stack, planted):
    run = run_stack(plant=planted)
    assert policies.iam_least_privilege(run.resources, parameter_arns=_parameter_arns(run))


# -- sizing from the planner ----------------------------------------------------------------------

def _aws_models() -> list[str]:
    from r1nest.catalog import MODELS

    return list(MODELS)


@pytest.mark.parametrize("model", _aws_models())
def test_instance_type_and_root_volume_are_the_planners(run_stack, model):
    from r1nest.planner import plan

    expected = plan(model, "aws")
    run = run_stack(model=model)
    instances = run.of(INSTANCE)
    assert len(instances) == expected.nodes
    for instance in instances:
        assert instance.inputs["instanceType"] == expected.instance_type
        assert instance.inputs["rootBlockDevice"]["volumeSize"] == expected.root_volume_gib
    assert run.outputs["instance_type"] == expected.instance_type
    assert run.outputs["cost_microusd_per_hour"] == expected.cost_microusd_per_hour


def test_sizing_check_catches_a_planted_instance_type(run_stack):
    from r1nest.planner import plan

    run = run_stack(plant=plant(INSTANCE, lambda props: props.__setitem__("instance_type", "g5.xlarge")))
    assert run.one(INSTANCE).inputs["instanceType"] != plan(run.config["model"], "aws").instance_type


# -- HTTPS with a domain; a warning without one ---------------------------------------------------

DOMAIN = "api.example.com"
LISTENER = "aws:lb/listener:Listener"


def test_a_domain_gets_https_on_443_a_redirect_on_80_and_no_public_gateway_port(run_stack):
    run = run_stack(domain=DOMAIN)
    assert policies.https_only(run.resources, domain=DOMAIN, gateway_port=GATEWAY_PORT) == []
    assert policies.only_gateway_port_open(run.resources, allowed_cidrs=["203.0.113.0/24"], gateway_port=GATEWAY_PORT,
                                           https_ports=(443, 80)) == []
    # one node, still behind the load balancer that holds the certificate
    assert len(run.of(INSTANCE)) == 1 and run.one("aws:lb/loadBalancer:LoadBalancer")
    by_port = {int(listener.inputs["port"]): listener.inputs for listener in run.of(LISTENER)}
    assert sorted(by_port) == [80, 443]
    assert by_port[443]["sslPolicy"] == "ELBSecurityPolicy-TLS13-1-2-2021-06"
    redirect = by_port[80]["defaultActions"][0]["redirect"]
    assert redirect == {"protocol": "HTTPS", "port": "443", "statusCode": "HTTP_301"}
    certificate = run.one("aws:acm/certificate:Certificate").inputs
    assert (certificate["domainName"], certificate["validationMethod"]) == (DOMAIN, "DNS")
    validation = run.one("aws:acm/certificateValidation:CertificateValidation").inputs
    assert validation["validationRecordFqdns"] == [f"_0a1b2c.{DOMAIN}"]
    assert by_port[443]["certificateArn"] == validation["certificateArn"]
    records = {r.inputs["name"]: r.inputs for r in run.of("aws:route53/record:Record")}
    assert records[DOMAIN]["aliases"][0]["name"].startswith("r1nest-alb-") and records[DOMAIN]["type"] == "A"
    assert records[f"_0a1b2c.{DOMAIN}."]["records"] == ["_3d4e5f.acm-validations.aws."]
    # the endpoints are https, and the gateway knows its public address
    assert run.outputs["public_endpoint"] == f"https://{DOMAIN}/v1"
    assert run.outputs["overview_url"] == f"https://{DOMAIN}/overview" and run.outputs["tls"] == "https"
    (text,) = [t for _, t in policies.user_data_texts(run.resources)]
    assert f"R1NEST_PUBLIC_URL=https://{DOMAIN}/v1" in text


def _https_plant(kind: str) -> Callable[[Any], Any]:
    if kind == "old-tls-policy":
        return plant(LISTENER, lambda p: p.get("ssl_policy") and p.__setitem__("ssl_policy", "ELBSecurityPolicy-2016-08"))
    if kind == "http-serves-the-api":
        def forward(props: dict) -> None:
            if int(props["port"]) == 80:
                props["default_actions"] = [{"type": "forward", "target_group_arn": "arn:aws:tg"}]
        return plant(LISTENER, forward)
    if kind == "public-gateway-port":
        return add_ingress({"protocol": "tcp", "from_port": GATEWAY_PORT, "to_port": GATEWAY_PORT,
                            "cidr_blocks": ["203.0.113.0/24"]})
    if kind == "listener-on-8000":
        return plant(LISTENER, lambda p: p.__setitem__("port", GATEWAY_PORT) if int(p["port"]) == 80 else None)
    if kind == "email-validation":
        return plant("aws:acm/certificate:Certificate", lambda p: p.__setitem__("validation_method", "EMAIL"))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["old-tls-policy", "http-serves-the-api", "public-gateway-port", "listener-on-8000",
                                  "email-validation"])
def test_https_check_reports_a_planted_violation(run_stack, kind):
    run = run_stack(domain=DOMAIN, plant=_https_plant(kind))
    assert policies.https_only(run.resources, domain=DOMAIN, gateway_port=GATEWAY_PORT)


def test_the_https_check_fails_a_deployment_without_a_domain(run_stack):
    assert policies.https_only(run_stack().resources, domain=DOMAIN, gateway_port=GATEWAY_PORT)


@pytest.fixture
def warnings_logged(monkeypatch) -> list[str]:
    said: list[str] = []
    monkeypatch.setattr(pulumi.log, "warn", lambda message, *a, **kw: said.append(message))
    return said


def test_without_a_domain_pulumi_up_warns_that_the_api_is_plain_http(run_stack, warnings_logged):
    run = run_stack(allowedCidrs="203.0.113.7/32,198.51.100.0/24")
    assert policies.plain_http_announced(run.outputs, warnings_logged) == []
    (warning,) = [w for w in warnings_logged if "unencrypted" in w]
    assert "203.0.113.7/32, 198.51.100.0/24" in warning and "r1nest:domain" in warning
    assert run.outputs["tls"] == "none" and run.outputs["allowed_cidrs"] == "203.0.113.7/32, 198.51.100.0/24"
    assert run.of("aws:lb/loadBalancer:LoadBalancer") == [] and run.of("aws:acm/certificate:Certificate") == []


def test_with_a_domain_there_is_no_plain_http_warning(run_stack, warnings_logged):
    run = run_stack(domain=DOMAIN)
    assert policies.plain_http_announced(run.outputs, warnings_logged) == []
    assert not [w for w in warnings_logged if "unencrypted" in w]


def test_plain_http_check_reports_a_missing_warning(run_stack, warnings_logged, monkeypatch):
    from r1nest_aws.deployment import Deployment

    monkeypatch.setattr(Deployment, "warn_plain_http", lambda self: None)
    run = run_stack()
    assert policies.plain_http_announced(run.outputs, warnings_logged)


# -- the source bundle: a private S3 object only the instance role reads --------------------------

def _bundle_arns(run) -> list[str]:
    return ["arn:aws:s3:::" + run.outputs["source_bundle"].removeprefix("s3://")]


def test_the_source_bundle_is_private_and_only_the_instance_role_reads_it(run_stack):
    run = run_stack()
    arns = _bundle_arns(run)
    assert policies.source_bundle_private(run.resources, object_arns=arns) == []
    assert policies.iam_least_privilege(run.resources, parameter_arns=_parameter_arns(run)) == []
    statements = json.loads(run.one("aws:iam/rolePolicy:RolePolicy").inputs["policy"])["Statement"]
    (read,) = [s for s in statements if any(a.startswith("s3:") for a in s["Action"])]
    assert read["Action"] == ["s3:GetObject"] and read["Resource"] == arns
    (bucket_policy,) = run.of("aws:s3/bucketPolicy:BucketPolicy")
    assert [s["Effect"] for s in json.loads(bucket_policy.inputs["policy"])["Statement"]] == ["Deny"]  # TLS only
    # the object is content-addressed: its key is the bundle's hash
    assert run.outputs["source_bundle"].endswith(f"/r1nest-source/{run.outputs['source_sha256']}.tar.gz")


def _widen_bundle_read(props: dict) -> None:
    def change(text: str) -> str:
        document = json.loads(text)
        for statement in document["Statement"]:
            if statement.get("Sid") == "ReadSourceBundle":
                statement["Resource"] = [statement["Resource"][0].rsplit("/", 2)[0] + "/*"]
        return json.dumps(document)

    props["policy"] = pulumi.Output.from_input(props["policy"]).apply(change)


def _public_bucket_policy(props: dict) -> None:
    props["policy"] = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/*"}]})


@pytest.mark.parametrize("planted", [
    plant("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
          lambda p: p.__setitem__("block_public_policy", False)),
    plant("aws:s3/bucketObjectv2:BucketObjectv2", lambda p: p.__setitem__("acl", "public-read")),
    plant("aws:s3/bucketPolicy:BucketPolicy", _public_bucket_policy),
    plant("aws:iam/rolePolicy:RolePolicy", _widen_bundle_read),
    plant("aws:s3/bucketOwnershipControls:BucketOwnershipControls",
          lambda p: p.__setitem__("rule", {"object_ownership": "ObjectWriter"})),
], ids=["public-policy-allowed", "public-read-object", "bucket-policy-grants-everyone", "role-reads-every-object",
        "acls-enabled"])
def test_source_bundle_check_reports_a_planted_violation(run_stack, planted):
    run = run_stack(plant=planted)
    assert policies.source_bundle_private(run.resources, object_arns=_bundle_arns(run))
