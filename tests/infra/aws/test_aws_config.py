"""The stack configuration: typed values, and errors that say what to set."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "infra" / "aws"))

from r1nest.errors import ConfigError  # noqa: E402
from r1nest_aws.config import DeploymentArgs, parse_config  # noqa: E402

BASE = {"model": "deepseek-r1-distill-qwen-7b", "allowedCidrs": "203.0.113.7/32"}


def parse(region: str | None = "us-east-1", **values: str) -> DeploymentArgs:
    return parse_config({**BASE, **values}, region=region)


def test_defaults_and_types():
    args = parse()
    assert args == DeploymentArgs(
        model="deepseek-r1-distill-qwen-7b", allowed_cidrs=("203.0.113.7/32",),
        region="us-east-1", availability_zone="us-east-1a",
    )
    assert args.new_vpc and args.replicas == 1 and args.spot is False and args.nodes is None
    # nothing to build: no image means the node builds it from this checkout; no domain means HTTP
    assert args.image is None and args.domain is None and not args.load_balanced


def test_image_is_an_override():
    assert parse(image="ghcr.io/example/r1nest:vllm").image == "ghcr.io/example/r1nest:vllm"


@pytest.mark.parametrize("domain, zone, expected", [
    ("api.example.com", None, ("api.example.com", "example.com")),
    ("Example.com.", None, ("example.com", "example.com")),
    ("r1.team.example.com", "example.com", ("r1.team.example.com", "example.com")),
    ("example.co.uk", "example.co.uk", ("example.co.uk", "example.co.uk")),
])
def test_domain_and_its_hosted_zone(domain, zone, expected):
    args = parse(domain=domain, **({"hostedZone": zone} if zone else {}))
    assert (args.domain, args.hosted_zone) == expected and args.load_balanced


def test_every_key_is_parsed_into_its_type():
    args = parse(
        engine="sglang", instanceType="P5.48xlarge", nodes="2", replicas="3", context="65536",
        availabilityZone="us-east-1c", vpcId="vpc-0123456789abcdef0", subnetId="subnet-0123456789abcdef0",
        albSubnetIds='["subnet-0123456789abcdef1", "subnet-0123456789abcdef2"]', spot="true",
        pricePromptPerMtok="2_000_000", priceCompletionPerMtok="8000000", initialCredits="5",
        allowedCidrs='["203.0.113.7/32", "198.51.100.0/24"]',
    )
    assert (args.engine, args.instance_type, args.nodes, args.replicas, args.context) == ("sglang", "p5.48xlarge", 2, 3, 65536)
    assert args.availability_zone == "us-east-1c" and args.spot is True
    assert args.alb_subnet_ids == ("subnet-0123456789abcdef1", "subnet-0123456789abcdef2")
    assert (args.price_prompt_per_mtok, args.price_completion_per_mtok, args.initial_credits) == (2_000_000, 8_000_000, 5)
    assert args.allowed_cidrs == ("203.0.113.7/32", "198.51.100.0/24")
    assert isinstance(args.initial_credits, int)


@pytest.mark.parametrize("values, region, says", [
    ({"model": ""}, "us-east-1", "pulumi config set r1nest:model"),
    ({"domain": "not a name"}, "us-east-1", "is not a DNS name"),
    ({"domain": "api.example.com", "hostedZone": "example.org"}, "us-east-1", "does not hold"),
    ({"hostedZone": "example.com"}, "us-east-1", "only applies with r1nest:domain"),
    ({"vpcId": "vpc-0123456789abcdef0", "subnetId": "subnet-0123456789abcdef0", "domain": "api.example.com"},
     "us-east-1", "r1nest:albSubnetIds"),
    ({"allowedCidrs": ""}, "us-east-1", "pulumi config set r1nest:allowedCidrs"),
    ({}, None, "pulumi config set aws:region"),
    ({"allowedCidrs": "203.0.113.7"}, "us-east-1", "203.0.113.7/32"),  # ip_network accepts a host; normalised
    ({"allowedCidrs": "203.0.113.7/24"}, "us-east-1", "not a CIDR block"),
    ({"allowedCidrs": "2001:db8::/32"}, "us-east-1", "only IPv4"),
    ({"nodes": "two"}, "us-east-1", "r1nest:nodes must be a whole number"),
    ({"nodes": "9"}, "us-east-1", "between 1 and 2"),  # planner.MAX_NODES
    ({"replicas": "0"}, "us-east-1", "between 1 and 16"),
    ({"spot": "maybe"}, "us-east-1", "true or false"),
    ({"engine": "tgi"}, "us-east-1", "vllm or sglang"),
    ({"initialCredits": "-1"}, "us-east-1", "between 0 and"),
    ({"pricePromptPerMtok": "1.5"}, "us-east-1", "whole number"),
    ({"vpcId": "vpc-0123456789abcdef0"}, "us-east-1", "set both r1nest:vpcId and r1nest:subnetId"),
    ({"vpcId": "vpc-0123456789abcdef0", "subnetId": "subnet-0123456789abcdef0", "replicas": "2"}, "us-east-1",
     "r1nest:albSubnetIds"),
    ({"availabilityZone": "eu-west-1a"}, "us-east-1", "not a zone of us-east-1"),
    ({"instancetype": "g6.xlarge"}, "us-east-1", "did you mean instanceType?"),
    ({"image": "not an image!"}, "us-east-1", "not an image reference"),
])
def test_bad_configuration_says_what_to_set(values, region, says):
    if says == "203.0.113.7/32":  # a bare address is a /32: accepted
        assert parse(region=region, **values).allowed_cidrs == ("203.0.113.7/32",)
        return
    with pytest.raises(ConfigError) as caught:
        parse(region=region, **values)
    assert says in str(caught.value)


def test_nodes_are_bounded_by_the_planners_max_nodes():
    from r1nest import planner
    from r1nest_aws import config

    assert config.MAX_NODES is planner.MAX_NODES
    assert parse(nodes=str(planner.MAX_NODES)).nodes == planner.MAX_NODES
    with pytest.raises(ConfigError, match=f"r1nest:nodes must be between 1 and {planner.MAX_NODES}"):
        parse(nodes=str(planner.MAX_NODES + 1))


def test_a_bad_configuration_stops_the_program_with_one_line_not_a_traceback(run_stack):
    import pulumi

    with pytest.raises(pulumi.RunError) as caught:
        run_stack(allowedCidrs="")
    assert str(caught.value).startswith("r1nest:allowedCidrs is not set")


def test_a_plan_that_cannot_fit_stops_the_program_with_the_planners_reason(run_stack):
    import pulumi

    with pytest.raises(pulumi.RunError) as caught:
        run_stack(model="deepseek-r1", instanceType="p5.48xlarge", nodes="1")
    assert "does not fit" in str(caught.value) and "2 x p5.48xlarge" in str(caught.value)


def test_the_entry_point_pulumi_runs_exports_the_outputs(run_stack):
    run = run_stack(via_main=True)
    assert run.outputs["model"] == "deepseek-r1-distill-qwen-7b" and {"api_key", "admin_key"} <= run.secret_outputs
