"""Multi-node and multi-replica variants: placement group, EFA, the engine's own multi-node launch,
load balancer with health checks, and the shared DynamoDB ledger."""

from __future__ import annotations

import json

import pulumi
import pytest
import yaml

from r1nest_aws import policies
from r1nest.ports import ENGINE_PORT, GATEWAY_PORT

INSTANCE = "aws:ec2/instance:Instance"
TWO_NODES = {"model": "deepseek-r1", "instanceType": "p5.48xlarge", "nodes": "2"}


def multi_node_problems(run) -> list[str]:
    """What a multi-node replica needs: one cluster placement group holding every node, EFA on
    every network card the type has, node-to-node traffic allowed only inside the group."""
    from r1nest.hardware import get_instance_type

    problems = []
    groups = run.of("aws:ec2/placementGroup:PlacementGroup")
    if len(groups) != 1 or groups[0].inputs.get("strategy") != "cluster":
        problems.append(f"expected one cluster placement group, found {[g.inputs.get('strategy') for g in groups]}")
    instances = run.of(INSTANCE)
    if any(not i.inputs.get("placementGroup") for i in instances):
        problems.append("an instance outside the placement group")
    efa_cards = get_instance_type(run.outputs["instance_type"]).efa_interfaces
    for template in run.of("aws:ec2/launchTemplate:LaunchTemplate"):
        interfaces = template.inputs.get("networkInterfaces") or []
        cards = sorted(int(i.get("networkCardIndex", 0)) for i in interfaces)
        if cards != list(range(efa_cards)):
            problems.append(f"{template.name}: network cards {cards}, expected 0..{efa_cards - 1}")
        if any(i.get("interfaceType") != "efa" for i in interfaces if "networkInterfaceId" not in i):
            problems.append(f"{template.name}: a non-EFA secondary interface")
    for eni in run.of("aws:ec2/networkInterface:NetworkInterface"):
        if eni.inputs.get("interfaceType") != "efa":
            problems.append(f"{eni.name}: primary interface is not EFA")
    rules = policies.ingress_rules(run.resources)
    if not any(r.self_only and r.protocol == "-1" for r in rules):
        problems.append("no all-traffic rule between the nodes of the group")
    for group in run.of("aws:ec2/securityGroup:SecurityGroup"):
        if group.name.endswith("-nodes") and not any(e.get("self") and e.get("protocol") == "-1"
                                                     for e in group.inputs.get("egress") or []):
            problems.append(f"{group.name}: EFA needs an all-traffic egress rule to the group itself")
    return problems


def test_two_p5_nodes_get_a_cluster_placement_group_and_32_efa_interfaces(run_stack):
    run = run_stack(**TWO_NODES)
    assert multi_node_problems(run) == []
    assert len(run.of(INSTANCE)) == 2
    (template, _) = run.of("aws:ec2/launchTemplate:LaunchTemplate")
    assert len(template.inputs["networkInterfaces"]) == 32
    # the self rule is the only way in besides the gateway port
    assert policies.engine_port_closed(run.resources, engine_port=ENGINE_PORT) == []
    assert policies.only_gateway_port_open(run.resources, allowed_cidrs=["203.0.113.0/24"], gateway_port=GATEWAY_PORT) == []


@pytest.mark.parametrize("planted", ["spread", "no-efa", "no-self-egress"])
def test_multi_node_check_reports_a_planted_violation(run_stack, planted):
    def transformation(args: pulumi.ResourceTransformationArgs):
        props = dict(args.props)
        if planted == "spread" and args.type_ == "aws:ec2/placementGroup:PlacementGroup":
            props["strategy"] = "spread"
        elif planted == "no-efa" and args.type_ == "aws:ec2/networkInterface:NetworkInterface":
            props["interface_type"] = None
        elif planted == "no-self-egress" and args.type_ == "aws:ec2/securityGroup:SecurityGroup":
            props["egress"] = [e for e in props["egress"] if not pulumi.get(e, "self")]
        else:
            return None
        return pulumi.ResourceTransformationResult(props, args.opts)

    run = run_stack(plant=transformation, **TWO_NODES)
    assert multi_node_problems(run)


def _units(user_data: str) -> dict[str, str]:
    document = yaml.safe_load(user_data)
    return {f["path"].rsplit("/", 1)[-1]: f["content"] for f in document["write_files"]}


def _exec_start(unit: str) -> str:
    return next(line for line in unit.splitlines() if line.startswith("ExecStart="))


def test_the_engine_command_on_each_node_is_engine_argv_with_rank_and_head_address(run_stack):
    from r1nest.engines.base import engine_argv
    from r1nest.planner import plan

    run = run_stack(**TWO_NODES)
    profile = plan("deepseek-r1", "aws", instance_type="p5.48xlarge", nodes=2).profile
    head_ip = run.outputs["internal_endpoint"].split("//")[1].split(":")[0]
    by_rank = {int(i.inputs["tags"]["r1nest:node-rank"]): i for i in run.of(INSTANCE)}
    for rank, instance in by_rank.items():
        files = _units(instance.inputs["userData"])
        expected = engine_argv(profile, host="127.0.0.1", port=ENGINE_PORT, node_rank=rank,
                               head_address=head_ip, python="python3")
        line = _exec_start(files["r1nest-engine.service"])
        argv = policies.exec_argv(line)
        at = argv.index("--entrypoint")
        assert argv[at + 1] == expected[0] and argv[at + 2] == run.outputs["image"]
        assert argv[at + 3:] == expected[1:]
        assert f"--node-rank {rank}" in line and f"--master-addr {head_ip}" in line
        assert ("r1nest-gateway.service" in files) == (rank == 0), "only the head runs the gateway"
        assert ("--headless" in line) == (rank > 0)


def test_replicas_get_a_load_balancer_with_health_checks_and_a_shared_dynamodb_ledger(run_stack):
    from r1nest.ledger.dynamodb import TTL_ATTRIBUTE, table_spec

    run = run_stack(replicas="2")
    alb = run.one("aws:lb/loadBalancer:LoadBalancer")
    assert alb.inputs["loadBalancerType"] == "application" and len(alb.inputs["subnets"]) == 2
    group = run.one("aws:lb/targetGroup:TargetGroup")
    assert group.inputs["healthCheck"]["path"] == "/health" and group.inputs["healthCheck"]["matcher"] == "200"
    assert int(group.inputs["port"]) == GATEWAY_PORT
    listener = run.one("aws:lb/listener:Listener")
    assert int(listener.inputs["port"]) == GATEWAY_PORT
    assert len(run.of("aws:lb/targetGroupAttachment:TargetGroupAttachment")) == 2
    assert run.outputs["public_endpoint"].startswith("http://r1nest-alb-")

    table = run.one("aws:dynamodb/table:Table")
    spec = table_spec()
    keys = {k["KeyType"]: k["AttributeName"] for k in spec["KeySchema"]}
    assert (table.inputs["hashKey"], table.inputs.get("rangeKey")) == (keys["HASH"], keys.get("RANGE"))
    assert sorted(a["name"] for a in table.inputs["attributes"]) == sorted(a["AttributeName"] for a in spec["AttributeDefinitions"])
    assert [g["name"] for g in table.inputs["globalSecondaryIndexes"]] == [g["IndexName"] for g in spec["GlobalSecondaryIndexes"]]
    assert table.inputs["ttl"] == {"attributeName": TTL_ATTRIBUTE, "enabled": True}

    for instance in run.of(INSTANCE):
        env = _units(instance.inputs["userData"])["gateway.env"]
        assert "R1NEST_STORE=dynamodb" in env and f"R1NEST_DYNAMODB_TABLE={run.outputs['ledger_table']}" in env
        # behind the ALB: its X-Forwarded-For is trusted (login limits see the real client), and the
        # header deadline outlasts the ALB's idle connections
        assert "R1NEST_TRUSTED_PROXIES=10.42.0.0/16" in env and "R1NEST_HEADER_TIMEOUT_S=4060" in env

    # the gateways take traffic only from the load balancer; the load balancer from the allowed CIDRs
    nodes_sg, = [g for g in run.of("aws:ec2/securityGroup:SecurityGroup") if g.name.endswith("-nodes")]
    assert all(not rule.get("cidrBlocks") for rule in nodes_sg.inputs["ingress"])
    assert policies.only_gateway_port_open(run.resources, allowed_cidrs=["203.0.113.0/24"], gateway_port=GATEWAY_PORT) == []
    table_arn = f"arn:aws:dynamodb:us-east-1:123456789012:table/{run.outputs['ledger_table']}"
    arns = [f"arn:aws:ssm:us-east-1:123456789012:parameter{run.outputs[n]}" for n in ("api_key_parameter", "admin_key_parameter")]
    assert policies.iam_least_privilege(run.resources, parameter_arns=arns, table_arn=table_arn) == []
    statements = json.loads(run.one("aws:iam/rolePolicy:RolePolicy").inputs["policy"])["Statement"]
    assert any(s["Sid"] == "SharedLedger" and s["Resource"] == [table_arn, f"{table_arn}/index/*"] for s in statements)


def test_one_replica_has_no_load_balancer_and_no_table(run_stack):
    run = run_stack()
    assert run.of("aws:lb/loadBalancer:LoadBalancer") == [] and run.of("aws:dynamodb/table:Table") == []
    assert "ledger_table" not in run.outputs
    env = _units(run.one(INSTANCE).inputs["userData"])["gateway.env"]
    assert "R1NEST_STORE=sqlite" in env
    assert "R1NEST_TRUSTED_PROXIES" not in env  # clients connect directly: trust no forwarded header


def test_iam_check_reports_table_access_beyond_the_ledger(run_stack):
    def widen(args: pulumi.ResourceTransformationArgs):
        if args.type_ != "aws:iam/rolePolicy:RolePolicy":
            return None
        props = dict(args.props)

        def change(text: str) -> str:
            document = json.loads(text)
            for statement in document["Statement"]:
                if statement.get("Sid") == "SharedLedger":
                    statement["Resource"] = ["arn:aws:dynamodb:us-east-1:123456789012:table/*"]
            return json.dumps(document)

        props["policy"] = pulumi.Output.from_input(props["policy"]).apply(change)
        return pulumi.ResourceTransformationResult(props, args.opts)

    run = run_stack(plant=widen, replicas="2")
    table_arn = f"arn:aws:dynamodb:us-east-1:123456789012:table/{run.outputs['ledger_table']}"
    arns = [f"arn:aws:ssm:us-east-1:123456789012:parameter{run.outputs[n]}" for n in ("api_key_parameter", "admin_key_parameter")]
    assert policies.iam_least_privilege(run.resources, parameter_arns=arns, table_arn=table_arn)


def test_two_nodes_times_two_replicas(run_stack):
    run = run_stack(replicas="2", **TWO_NODES)
    assert len(run.of(INSTANCE)) == 4
    assert len(run.of("aws:ec2/placementGroup:PlacementGroup")) == 2
    assert len(run.outputs["instance_ids"]) == 4
    heads = [i for i in run.of(INSTANCE) if i.inputs["tags"]["r1nest:role"] == "head"]
    assert len(heads) == 2 == len(run.of("aws:lb/targetGroupAttachment:TargetGroupAttachment"))


def test_spot_market_when_configured(run_stack):
    run = run_stack(spot="true")
    assert run.one(INSTANCE).inputs["instanceMarketOptions"]["marketType"] == "spot"
    assert "instanceMarketOptions" not in run_stack().one(INSTANCE).inputs


def test_existing_vpc_and_subnet_are_used_instead_of_a_new_vpc(run_stack):
    run = run_stack(vpcId="vpc-0123456789abcdef0", subnetId="subnet-0123456789abcdef0")
    assert run.of("aws:ec2/vpc:Vpc") == [] and run.of("aws:ec2/subnet:Subnet") == []
    assert run.one("aws:ec2/networkInterface:NetworkInterface").inputs["subnetId"] == "subnet-0123456789abcdef0"
    assert run.one("aws:ec2/securityGroup:SecurityGroup").inputs["vpcId"] == "vpc-0123456789abcdef0"
