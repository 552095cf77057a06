"""`r1nest:aws:Deployment`: DeepSeek-R1 (or a distill) on EC2 GPU instances behind the r1nest gateway.

What one deployment is made of (every resource is a child of the component and carries the tag
`r1nest:deployment`, which `r1nest status` looks instances up by):

    network      a new VPC + public subnet(s), or the VPC/subnet given in the configuration;
                 one security group: the gateway port (8000) from the allowed CIDRs (or from the
                 load balancer), all traffic between the nodes of the group, nothing else in
    keys         ApiKey and admin key drawn by pulumi_random in r1nest's key format, exported as
                 secret outputs and kept as SSM SecureString parameters
    source       without `r1nest:image`: this checkout's source bundle (r1nest.cloud.bundle) as
                 a private S3 object (public access blocked, ACLs off, SSE, TLS only); the node
                 builds the service image from it at first boot. Its key is the bundle's SHA-256,
                 so a changed checkout changes the user data and replaces the instances
    role         SSM Session Manager (no SSH key pair) + ssm:GetParameter on exactly the two key
                 parameters (+ s3:GetObject on exactly the source bundle, + the ledger table,
                 + pulling the image from ECR when it lives there)
    nodes        per replica: `plan.nodes` instances of `plan.instance_type` (Deep Learning Base
                 GPU AMI, IMDSv2 only, hop limit 1, encrypted gp3 root volume sized by the plan);
                 a primary network interface created first so the private address is known before
                 boot (the engine's head address, the internal endpoint); an Elastic IP each
    multi-node   a cluster placement group and EFA interfaces where the type has them
    replicas>1   an Application Load Balancer (health check on /health) and a DynamoDB table
                 (the ledger's own table_spec) shared by the gateways
    domain       HTTPS: an ACM certificate validated through Route 53, the load balancer (also
                 for one replica) with a TLS 1.3/1.2 listener on 443 and a redirect on 80, an
                 alias record; the gateway port is then reachable from the load balancer only.
                 Without a domain `pulumi up` warns that the API is plain HTTP

The instance type, node count, root volume and the engine command all come from the planner.
"""

from __future__ import annotations

import functools
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_random as random

from r1nest.ports import ENGINE_PORT, GATEWAY_PORT  # the gateway's: the only port ever opened
from r1nest_aws.config import HTTP_PORT, HTTPS_PORT, DeploymentArgs

COMPONENT_TYPE = "r1nest:aws:Deployment"
DEPLOYMENT_TAG = "r1nest:deployment"

# Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04): NVIDIA driver, Docker, the NVIDIA
# container toolkit, the EFA installer and the AWS CLI, published by Amazon.
AMI_NAME_FILTER = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
AMI_OWNER = "amazon"
SSM_CORE_POLICY_ARN = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"

VPC_CIDR = "10.42.0.0/16"
SUBNET_CIDRS = ("10.42.0.0/20", "10.42.16.0/20")
ENGINE_HOST = "127.0.0.1"  # the engine listens on loopback only; the gateway is its one client
CONTAINER_PYTHON = "python3"
# r1nest's files inside the service image (images/: the repository is installed at /opt/r1nest)
CONTAINER_REPO_ROOT = "/opt/r1nest"

ALB_IDLE_TIMEOUT_S = 4000  # the ALB maximum: reasoning streams are long
HEALTH_PATH = "/health"
# TLS 1.3 and 1.2 with forward-secret AEAD ciphers only: ELB's recommended policy.
TLS_POLICY = "ELBSecurityPolicy-TLS13-1-2-2021-06"

# The checkout the stack packs when it builds the image on the instance (infra/aws/r1nest_aws/..)
CHECKOUT_ROOT = Path(__file__).resolve().parents[3]
BUNDLE_DIR = Path(tempfile.gettempdir()) / "r1nest-pulumi"

_ECR_RE = re.compile(r"^(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com/([^:@]+)")


@dataclass(frozen=True)
class PlannedDeployment:
    """The planner's answer, reduced to what the infrastructure needs."""

    plan: object  # r1nest.planner.Plan
    instance_type: str
    nodes: int
    root_volume_gib: int
    efa_interfaces: int  # per node; 0 when the plan is single-node or the type has none
    vcpus_per_node: int


def plan_deployment(args: DeploymentArgs) -> PlannedDeployment:
    """Pure: the planner's plan for this configuration (PlanError when it cannot fit)."""
    from r1nest.hardware import get_instance_type
    from r1nest.planner import plan

    chosen = plan(
        args.model, "aws", context=args.context, engine=args.engine,
        instance_type=args.instance_type, nodes=args.nodes,
    )
    assert chosen.instance_type is not None, "an AWS plan names its instance type"
    spec = get_instance_type(chosen.instance_type)
    return PlannedDeployment(
        plan=chosen,
        instance_type=chosen.instance_type,
        nodes=chosen.nodes,
        root_volume_gib=chosen.root_volume_gib,
        efa_interfaces=spec.efa_interfaces if chosen.nodes > 1 else 0,
        vcpus_per_node=spec.vcpus,
    )


def ecr_repository(image: str) -> tuple[str, str, str] | None:
    """(account, region, repository) when the image lives in ECR, else None."""
    match = _ECR_RE.match(image)
    return (match.group(1), match.group(2), match.group(3)) if match else None


def ledger_table_args(spec: dict[str, Any]) -> dict[str, Any]:
    """The ledger's boto3 `create_table` spec as aws.dynamodb.Table arguments (same table)."""
    from r1nest.ledger.dynamodb import TTL_ATTRIBUTE

    def keys(schema: list[dict[str, str]]) -> tuple[str, str | None]:
        hash_key = next(k["AttributeName"] for k in schema if k["KeyType"] == "HASH")
        range_key = next((k["AttributeName"] for k in schema if k["KeyType"] == "RANGE"), None)
        return hash_key, range_key

    hash_key, range_key = keys(spec["KeySchema"])
    indexes = []
    for index in spec.get("GlobalSecondaryIndexes", []):
        index_hash, index_range = keys(index["KeySchema"])
        indexes.append(aws.dynamodb.TableGlobalSecondaryIndexArgs(
            name=index["IndexName"], hash_key=index_hash, range_key=index_range,
            projection_type=index["Projection"]["ProjectionType"],
            non_key_attributes=index["Projection"].get("NonKeyAttributes"),
        ))
    return dict(
        billing_mode=spec.get("BillingMode", "PAY_PER_REQUEST"),
        hash_key=hash_key,
        range_key=range_key,
        attributes=[
            aws.dynamodb.TableAttributeArgs(name=a["AttributeName"], type=a["AttributeType"])
            for a in spec["AttributeDefinitions"]
        ],
        global_secondary_indexes=indexes or None,
        ttl=aws.dynamodb.TableTtlArgs(attribute_name=TTL_ATTRIBUTE, enabled=True),
        point_in_time_recovery=aws.dynamodb.TablePointInTimeRecoveryArgs(enabled=True),
        server_side_encryption=aws.dynamodb.TableServerSideEncryptionArgs(enabled=True),
    )


def _container_path(arg: str) -> str:
    """engine_argv names files shipped with r1nest by their path on this machine; on the box they
    sit under the image's copy of the repository."""
    from r1nest.paths import REPO_ROOT

    local_root = str(REPO_ROOT)
    if arg.startswith(local_root + "/"):
        return CONTAINER_REPO_ROOT + arg[len(local_root):]
    return arg


class Deployment(pulumi.ComponentResource):
    """One r1nest deployment on AWS. Attributes are the outputs `__main__.py` exports."""

    def __init__(self, name: str, args: DeploymentArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(COMPONENT_TYPE, name, None, opts)
        self.args = args
        self.planned = plan_deployment(args)
        self.deployment_name = f"r1nest-{pulumi.get_stack()}"[:48]
        self._tags = {DEPLOYMENT_TAG: self.deployment_name, "r1nest:model": args.model}
        child = pulumi.ResourceOptions(parent=self)

        self._network(name, child)
        self._keys(name, child)
        self._source(name, child)
        self.ledger_table = self._ledger(name, child) if args.replicas > 1 else None
        self._role(name, child)
        self.certificate_arn = self._certificate(name, child) if args.domain else None
        self.load_balancer = self._load_balancer(name, child) if args.load_balanced else None
        self._nodes(name, child)
        self._outputs()
        if not args.domain:
            self.warn_plain_http()

    # -- network -----------------------------------------------------------------------------
    def _network(self, name: str, child: pulumi.ResourceOptions) -> None:
        """The VPC and subnets (new, or the configured ones) and the security groups."""
        args = self.args
        vpc_id: pulumi.Input[str]
        subnet_id: pulumi.Input[str]
        alb_subnet_ids: list[pulumi.Input[str]]
        if args.new_vpc:
            vpc_id, alb_subnet_ids = self._new_vpc(name, child)
            subnet_id = alb_subnet_ids[0]
        else:
            assert args.vpc_id is not None and args.subnet_id is not None  # parse_config: both or neither
            vpc_id, subnet_id, alb_subnet_ids = args.vpc_id, args.subnet_id, list(args.alb_subnet_ids)
        self.vpc_id, self.subnet_id, self.alb_subnet_ids = vpc_id, subnet_id, alb_subnet_ids
        self.alb_security_group = self._alb_security_group(name, child) if args.load_balanced else None
        self.security_group = self._nodes_security_group(name, child)

    def _new_vpc(self, name: str, child: pulumi.ResourceOptions) -> tuple[pulumi.Input[str], list[pulumi.Input[str]]]:
        """(vpc id, subnet ids) of a new VPC with public subnets: one in the configured zone, a
        second in another zone for a load balancer."""
        args = self.args
        vpc = aws.ec2.Vpc(f"{name}-vpc", cidr_block=VPC_CIDR, enable_dns_hostnames=True,
                          enable_dns_support=True, tags={**self._tags, "Name": self.deployment_name}, opts=child)
        gateway = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags=self._tags, opts=child)
        routes = aws.ec2.RouteTable(
            f"{name}-public", vpc_id=vpc.id,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=gateway.id)],
            tags=self._tags, opts=child,
        )
        zones: list[pulumi.Input[str]] = [args.availability_zone]
        if args.load_balanced:  # an ALB needs subnets in two zones
            other = aws.get_availability_zones_output(state="available", opts=pulumi.InvokeOptions(parent=self))
            zones.append(other.names.apply(lambda names: next(z for z in names if z != args.availability_zone)))
        subnets: list[pulumi.Input[str]] = []
        for index, zone in enumerate(zones):
            subnet = aws.ec2.Subnet(
                f"{name}-public-{index}", vpc_id=vpc.id, cidr_block=SUBNET_CIDRS[index],
                availability_zone=zone, map_public_ip_on_launch=False, tags=self._tags, opts=child,
            )
            aws.ec2.RouteTableAssociation(f"{name}-public-{index}", subnet_id=subnet.id,
                                          route_table_id=routes.id, opts=child)
            subnets.append(subnet.id)
        return vpc.id, subnets

    def _alb_security_group(self, name: str, child: pulumi.ResourceOptions) -> aws.ec2.SecurityGroup:
        """The load balancer's: HTTPS and the redirecting HTTP with a domain, else the gateway
        port, from the allowed CIDRs; out only to the gateways."""
        args = self.args
        public_ports = (HTTPS_PORT, HTTP_PORT) if args.domain else (GATEWAY_PORT,)
        return aws.ec2.SecurityGroup(
            f"{name}-alb", vpc_id=self.vpc_id,
            description="r1nest load balancer: "
                        + ("HTTPS (and HTTP, redirected)" if args.domain else "the gateway port")
                        + " from the allowed CIDRs",
            ingress=[aws.ec2.SecurityGroupIngressArgs(
                protocol="tcp", from_port=port, to_port=port,
                cidr_blocks=list(args.allowed_cidrs), description=f"r1nest API ({port})",
            ) for port in public_ports],
            egress=[aws.ec2.SecurityGroupEgressArgs(
                protocol="tcp", from_port=GATEWAY_PORT, to_port=GATEWAY_PORT,
                cidr_blocks=["0.0.0.0/0"], description="to the gateways",
            )],
            tags=self._tags, opts=child,
        )

    def _nodes_security_group(self, name: str, child: pulumi.ResourceOptions) -> aws.ec2.SecurityGroup:
        """The nodes': the gateway port only (from the load balancer when there is one, else from
        the allowed CIDRs), everything between the nodes of a multi-node replica, never the engine port."""
        if self.alb_security_group is not None:
            gateway_rule = aws.ec2.SecurityGroupIngressArgs(
                protocol="tcp", from_port=GATEWAY_PORT, to_port=GATEWAY_PORT,
                security_groups=[self.alb_security_group.id], description="r1nest gateway, from the load balancer",
            )
        else:
            gateway_rule = aws.ec2.SecurityGroupIngressArgs(
                protocol="tcp", from_port=GATEWAY_PORT, to_port=GATEWAY_PORT,
                cidr_blocks=list(self.args.allowed_cidrs), description="r1nest gateway",
            )
        ingress = [gateway_rule]
        egress = [aws.ec2.SecurityGroupEgressArgs(
            protocol="-1", from_port=0, to_port=0, cidr_blocks=["0.0.0.0/0"],
            description="image, weights, SSM",
        )]
        if self.planned.nodes > 1:
            # NCCL/EFA and the engine's own rendezvous: every port, but only between members of
            # this group (EFA requires an all-traffic self-referencing rule in and out).
            ingress.append(aws.ec2.SecurityGroupIngressArgs(
                protocol="-1", from_port=0, to_port=0, self=True, description="between the nodes of this deployment",
            ))
            egress.append(aws.ec2.SecurityGroupEgressArgs(
                protocol="-1", from_port=0, to_port=0, self=True, description="EFA: to the nodes of this deployment",
            ))
        return aws.ec2.SecurityGroup(
            f"{name}-nodes", vpc_id=self.vpc_id,
            description=f"r1nest nodes: port {GATEWAY_PORT} only; the engine port {ENGINE_PORT} is never open",
            ingress=ingress, egress=egress, tags=self._tags, opts=child,
        )

    # -- keys --------------------------------------------------------------------------------
    def _key(self, name: str, prefix: str, child: pulumi.ResourceOptions) -> pulumi.Output[str]:
        # r1nest's key format: `<prefix>-<12 hex>-<43 chars>`; [A-Za-z0-9]^43 is 256 bits.
        key_id = random.RandomId(f"{name}-id", byte_length=6, opts=child)
        secret = random.RandomPassword(f"{name}-secret", length=43, special=False, opts=child)
        return pulumi.Output.secret(pulumi.Output.format("{0}-{1}-{2}", prefix, key_id.hex, secret.result))

    def _keys(self, name: str, child: pulumi.ResourceOptions) -> None:
        from r1nest.keys import ADMIN_PREFIX, KEY_PREFIX

        self.api_key = self._key(f"{name}-api-key", KEY_PREFIX, child)
        self.admin_key = self._key(f"{name}-admin-key", ADMIN_PREFIX, child)
        self.api_key_parameter = aws.ssm.Parameter(
            f"{name}-api-key", name=f"/r1nest/{pulumi.get_stack()}/api-key", type="SecureString",
            value=self.api_key, description="r1nest ApiKey (read by the instances at boot)",
            tags=self._tags, opts=child,
        )
        self.admin_key_parameter = aws.ssm.Parameter(
            f"{name}-admin-key", name=f"/r1nest/{pulumi.get_stack()}/admin-key", type="SecureString",
            value=self.admin_key, description="r1nest admin key (read by the instances at boot)",
            tags=self._tags, opts=child,
        )

    # -- source bundle -----------------------------------------------------------------------
    def _source(self, name: str, child: pulumi.ResourceOptions) -> None:
        """Without `r1nest:image`: this checkout's source bundle as a private S3 object, and the
        image the node builds from it. With it: nothing (the node pulls that image)."""
        self.bundle = None
        self.source_object: aws.s3.BucketObjectv2 | None = None
        if self.args.image is not None:
            self.image = self.args.image
            return
        from r1nest.cloud.bundle import build_bundle

        bundle = self.bundle = build_bundle(CHECKOUT_ROOT)
        self.image = f"r1nest:{self.args.engine}-{bundle.short_hash}"  # a local tag, built at boot
        bucket = self.source_bucket = aws.s3.Bucket(f"{name}-source", force_destroy=True, tags=self._tags, opts=child)
        aws.s3.BucketOwnershipControls(  # ACLs off: only policies grant access
            f"{name}-source", bucket=bucket.id,
            rule=aws.s3.BucketOwnershipControlsRuleArgs(object_ownership="BucketOwnerEnforced"), opts=child,
        )
        block = aws.s3.BucketPublicAccessBlock(
            f"{name}-source", bucket=bucket.id, block_public_acls=True, block_public_policy=True,
            ignore_public_acls=True, restrict_public_buckets=True, opts=child,
        )
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-source", bucket=bucket.id,
            rules=[aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                apply_server_side_encryption_by_default=(
                    aws.s3.BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                        sse_algorithm="AES256")),
            )],
            opts=child,
        )
        aws.s3.BucketPolicy(
            f"{name}-source", bucket=bucket.id,
            policy=bucket.arn.apply(lambda arn: json.dumps({
                "Version": "2012-10-17",
                "Statement": [{  # grants nothing; the instance role's own policy grants the one read
                    "Sid": "TlsOnly", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
                    "Resource": [arn, f"{arn}/*"], "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                }],
            })),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[block]),
        )
        self.source_object = aws.s3.BucketObjectv2(
            f"{name}-source", bucket=bucket.id, key=bundle.object_key,
            source=pulumi.FileAsset(str(bundle.write(BUNDLE_DIR))), content_type="application/gzip",
            server_side_encryption="AES256", tags=self._tags, opts=child,
        )
        self.source_object_arn = pulumi.Output.concat(bucket.arn, "/", self.source_object.key)

    # -- ledger ------------------------------------------------------------------------------
    def _ledger(self, name: str, child: pulumi.ResourceOptions) -> aws.dynamodb.Table:
        from r1nest.ledger.dynamodb import table_spec

        return aws.dynamodb.Table(f"{name}-ledger", **ledger_table_args(table_spec()), tags=self._tags, opts=child)

    # -- role --------------------------------------------------------------------------------
    def _role(self, name: str, child: pulumi.ResourceOptions) -> None:
        role = aws.iam.Role(
            f"{name}-node", description="r1nest node: SSM Session Manager and the deployment's keys",
            assume_role_policy=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                               "Principal": {"Service": "ec2.amazonaws.com"}}],
            }),
            tags=self._tags, opts=child,
        )
        aws.iam.RolePolicyAttachment(f"{name}-ssm-core", role=role.name, policy_arn=SSM_CORE_POLICY_ARN, opts=child)
        table_arn = self.ledger_table.arn if self.ledger_table is not None else None
        source_arn = self.source_object_arn if self.source_object is not None else None
        ecr = ecr_repository(self.image)

        def policy(arns: list[str | None]) -> str:
            api_arn, admin_arn, ledger_arn, bundle_arn = arns
            statements: list[dict[str, Any]] = [{
                "Sid": "ReadDeploymentKeys", "Effect": "Allow", "Action": ["ssm:GetParameter"],
                # SecureStrings under the AWS-managed key aws/ssm: SSM decrypts on the role's
                # behalf, so no kms:Decrypt statement is needed.
                "Resource": [api_arn, admin_arn],
            }]
            if bundle_arn:
                statements.append({
                    "Sid": "ReadSourceBundle", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [bundle_arn],
                })
            if ledger_arn:
                statements.append({
                    "Sid": "SharedLedger", "Effect": "Allow",
                    "Action": ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem",
                               "dynamodb:DeleteItem", "dynamodb:Query", "dynamodb:BatchGetItem",
                               "dynamodb:TransactWriteItems", "dynamodb:TransactGetItems",
                               "dynamodb:ConditionCheckItem", "dynamodb:DescribeTable"],
                    "Resource": [ledger_arn, f"{ledger_arn}/index/*"],
                })
            if ecr:
                account, region, repository = ecr
                statements += [
                    # GetAuthorizationToken cannot be scoped to a resource (ECR's IAM reference)
                    {"Sid": "EcrLogin", "Effect": "Allow", "Action": ["ecr:GetAuthorizationToken"], "Resource": "*"},
                    {"Sid": "PullServiceImage", "Effect": "Allow",
                     "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
                     "Resource": f"arn:aws:ecr:{region}:{account}:repository/{repository}"},
                ]
            return json.dumps({"Version": "2012-10-17", "Statement": statements})

        self.role_policy = aws.iam.RolePolicy(
            f"{name}-node", role=role.id,
            policy=pulumi.Output.all(self.api_key_parameter.arn, self.admin_key_parameter.arn, table_arn,
                                     source_arn).apply(policy),
            opts=child,
        )
        self.instance_profile = aws.iam.InstanceProfile(f"{name}-node", role=role.name, tags=self._tags, opts=child)

    # -- HTTPS -------------------------------------------------------------------------------
    def _certificate(self, name: str, child: pulumi.ResourceOptions) -> pulumi.Output[str]:
        """An ACM certificate for the domain, validated by a DNS record in the hosted zone; the
        ARN resolves once ACM has issued it."""
        args = self.args
        self.zone_id = aws.route53.get_zone_output(
            name=args.hosted_zone, private_zone=False, opts=pulumi.InvokeOptions(parent=self)).zone_id
        certificate = aws.acm.Certificate(
            f"{name}-tls", domain_name=args.domain, validation_method="DNS", tags=self._tags, opts=child,
        )
        option = certificate.domain_validation_options[0]
        record = aws.route53.Record(
            f"{name}-tls-validation", zone_id=self.zone_id, name=option.resource_record_name,
            type=option.resource_record_type, records=[option.resource_record_value], ttl=300,
            allow_overwrite=True, opts=child,
        )
        validation = aws.acm.CertificateValidation(
            f"{name}-tls", certificate_arn=certificate.arn, validation_record_fqdns=[record.fqdn], opts=child,
        )
        return validation.certificate_arn

    # -- load balancer -----------------------------------------------------------------------
    def _load_balancer(self, name: str, child: pulumi.ResourceOptions) -> aws.lb.LoadBalancer:
        assert self.alb_security_group is not None
        alb = aws.lb.LoadBalancer(
            f"{name}-alb", internal=False, load_balancer_type="application",
            security_groups=[self.alb_security_group.id], subnets=self.alb_subnet_ids,
            idle_timeout=ALB_IDLE_TIMEOUT_S, drop_invalid_header_fields=True, tags=self._tags, opts=child,
        )
        self.target_group = aws.lb.TargetGroup(
            f"{name}-gateways", port=GATEWAY_PORT, protocol="HTTP", target_type="instance", vpc_id=self.vpc_id,
            deregistration_delay=45,  # the gateway's drain time
            health_check=aws.lb.TargetGroupHealthCheckArgs(
                enabled=True, path=HEALTH_PATH, port=str(GATEWAY_PORT), protocol="HTTP", matcher="200",
                interval=15, timeout=5, healthy_threshold=2, unhealthy_threshold=3,
            ),
            tags=self._tags, opts=child,
        )
        forward = aws.lb.ListenerDefaultActionArgs(type="forward", target_group_arn=self.target_group.arn)
        if self.certificate_arn is None:
            aws.lb.Listener(f"{name}-gateway", load_balancer_arn=alb.arn, port=GATEWAY_PORT, protocol="HTTP",
                            default_actions=[forward], tags=self._tags, opts=child)
            return alb
        aws.lb.Listener(
            f"{name}-https", load_balancer_arn=alb.arn, port=HTTPS_PORT, protocol="HTTPS", ssl_policy=TLS_POLICY,
            certificate_arn=self.certificate_arn, default_actions=[forward], tags=self._tags, opts=child,
        )
        aws.lb.Listener(
            f"{name}-http", load_balancer_arn=alb.arn, port=HTTP_PORT, protocol="HTTP",
            default_actions=[aws.lb.ListenerDefaultActionArgs(
                type="redirect",
                redirect=aws.lb.ListenerDefaultActionRedirectArgs(protocol="HTTPS", port=str(HTTPS_PORT),
                                                                  status_code="HTTP_301"),
            )],
            tags=self._tags, opts=child,
        )
        aws.route53.Record(
            f"{name}-endpoint", zone_id=self.zone_id, name=self.args.domain, type="A",
            aliases=[aws.route53.RecordAliasArgs(name=alb.dns_name, zone_id=alb.zone_id, evaluate_target_health=True)],
            allow_overwrite=False, opts=child,
        )
        return alb

    # -- nodes -------------------------------------------------------------------------------
    def _nodes(self, name: str, child: pulumi.ResourceOptions) -> None:
        args, planned = self.args, self.planned
        ami = aws.ec2.get_ami_output(
            most_recent=True, owners=[AMI_OWNER],
            filters=[
                aws.ec2.GetAmiFilterArgs(name="name", values=[AMI_NAME_FILTER]),
                aws.ec2.GetAmiFilterArgs(name="architecture", values=["x86_64"]),
                aws.ec2.GetAmiFilterArgs(name="state", values=["available"]),
            ],
            opts=pulumi.InvokeOptions(parent=self),
        )
        self.instances: list[aws.ec2.Instance] = []
        self.heads: list[aws.ec2.Instance] = []
        self.head_public_ips: list[pulumi.Output[str]] = []
        self.head_private_ips: list[pulumi.Output[str]] = []
        for replica in range(args.replicas):
            placement = None
            if planned.nodes > 1:
                placement = aws.ec2.PlacementGroup(f"{name}-r{replica}", strategy="cluster",
                                                   tags=self._tags, opts=child)
            head_ip: pulumi.Output[str] | None = None
            for rank in range(planned.nodes):
                node = f"{name}-r{replica}-n{rank}"
                eni = aws.ec2.NetworkInterface(
                    node, subnet_id=self.subnet_id, security_groups=[self.security_group.id],
                    interface_type="efa" if planned.efa_interfaces else None,
                    description=f"r1nest replica {replica} node {rank}", tags=self._tags, opts=child,
                )
                eip = aws.ec2.Eip(node, domain="vpc", tags={**self._tags, "Name": node}, opts=child)
                if rank == 0:
                    head_ip = eni.private_ip
                assert head_ip is not None
                public_url = self._public_url(eip.public_ip, "/v1")
                user_data = pulumi.Output.all(
                    public_url, eni.private_ip, head_ip, self.api_key_parameter.name,
                    self.admin_key_parameter.name,
                    self.ledger_table.name if self.ledger_table is not None else None,
                    self._trusted_proxies(),
                    self.source_bucket.bucket if self.source_object is not None else None,
                ).apply(functools.partial(self._user_data_of, rank))
                # the node reads its keys and the source bundle at boot: both readable before it starts
                ready = [self.role_policy] + ([self.source_object] if self.source_object is not None else [])
                instance = aws.ec2.Instance(node, opts=pulumi.ResourceOptions(parent=self, depends_on=ready),
                                            **self._instance_args(node, ami.id, eni, placement, user_data, replica, rank))
                aws.ec2.EipAssociation(node, allocation_id=eip.allocation_id, network_interface_id=eni.id,
                                       opts=pulumi.ResourceOptions(parent=self, depends_on=[instance]))
                self.instances.append(instance)
                if rank == 0:
                    self.heads.append(instance)
                    self.head_public_ips.append(eip.public_ip)
                    self.head_private_ips.append(eni.private_ip)
                    if self.load_balancer is not None:
                        aws.lb.TargetGroupAttachment(node, target_group_arn=self.target_group.arn,
                                                     target_id=instance.id, port=GATEWAY_PORT, opts=child)

    def _instance_args(self, node: str, ami_id: pulumi.Input[str], eni: aws.ec2.NetworkInterface,
                       placement: aws.ec2.PlacementGroup | None, user_data: pulumi.Input[str],
                       replica: int, rank: int) -> dict[str, Any]:
        planned = self.planned
        instance_args: dict[str, Any] = dict(
            ami=ami_id,
            instance_type=planned.instance_type,
            iam_instance_profile=self.instance_profile.name,
            # IMDSv2 only, one hop: the containers share the host's network namespace, so the
            # gateway's boto3 (DynamoDB ledger) still reaches the role's credentials, and nothing
            # behind a bridge or a proxy on the box can.
            metadata_options=aws.ec2.InstanceMetadataOptionsArgs(
                http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=1,
                instance_metadata_tags="disabled",
            ),
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                volume_type="gp3", volume_size=planned.root_volume_gib, encrypted=True,
                delete_on_termination=True, tags=self._tags,
            ),
            ebs_optimized=True,
            user_data=user_data,
            user_data_replace_on_change=True,
            placement_group=placement.id if placement is not None else None,
            tags={**self._tags, "Name": node, "r1nest:replica": str(replica), "r1nest:node-rank": str(rank),
                  "r1nest:role": "head" if rank == 0 else "worker"},
        )
        if self.args.spot:
            instance_args["instance_market_options"] = aws.ec2.InstanceInstanceMarketOptionsArgs(
                market_type="spot",
                spot_options=aws.ec2.InstanceInstanceMarketOptionsSpotOptionsArgs(
                    spot_instance_type="one-time", instance_interruption_behavior="terminate",
                ),
            )
        if planned.efa_interfaces:
            # The first card carries the pre-created primary interface (EFA with ENA); every other
            # network card gets an EFA interface of its own (p5: 32 cards).
            interfaces = [aws.ec2.LaunchTemplateNetworkInterfaceArgs(
                network_interface_id=eni.id, device_index=0, network_card_index=0,
            )] + [
                aws.ec2.LaunchTemplateNetworkInterfaceArgs(
                    device_index=1, network_card_index=card, interface_type="efa",
                    subnet_id=self.subnet_id, security_groups=[self.security_group.id],
                    delete_on_termination="true",
                )
                for card in range(1, planned.efa_interfaces)
            ]
            template = aws.ec2.LaunchTemplate(node, network_interfaces=interfaces, tags=self._tags,
                                              opts=pulumi.ResourceOptions(parent=self))
            instance_args["launch_template"] = aws.ec2.InstanceLaunchTemplateArgs(id=template.id, version="$Latest")
        else:
            instance_args["primary_network_interface"] = aws.ec2.InstancePrimaryNetworkInterfaceArgs(
                network_interface_id=eni.id,
            )
        return instance_args

    def _trusted_proxies(self) -> pulumi.Input[str] | None:
        """Behind the ALB the gateway sees the ALB's addresses: it trusts X-Forwarded-For from the
        VPC (the security group lets only the ALB and the deployment's nodes reach the gateway)."""
        if self.load_balancer is None:
            return None
        if self.args.vpc_id is None:
            return VPC_CIDR
        return aws.ec2.get_vpc_output(id=self.args.vpc_id, opts=pulumi.InvokeOptions(parent=self)).cidr_block

    def _public_url(self, public_ip: pulumi.Input[str], path: str) -> pulumi.Output[str]:
        """The API as clients reach it: https://<domain>, else the load balancer or the Elastic IP
        on the gateway port."""
        if self.args.domain:
            return pulumi.Output.from_input(f"https://{self.args.domain}{path}")
        host = self.load_balancer.dns_name if self.load_balancer is not None else public_ip
        return pulumi.Output.format("http://{0}:{1}{2}", host, GATEWAY_PORT, path)

    def warn_plain_http(self) -> None:
        """`pulumi up` says so when the API is unencrypted, and who can reach it."""
        pulumi.log.warn(
            f"r1nest: no r1nest:domain is set, so the API is served over unencrypted HTTP on port {GATEWAY_PORT}: "
            f"API keys, prompts and answers cross the network in clear text. It is reachable from "
            f"{', '.join(self.args.allowed_cidrs)} (r1nest:allowedCidrs). For HTTPS, set r1nest:domain to a "
            "name in a Route 53 hosted zone of this account.",
            resource=self,
        )

    def _user_data_of(self, rank: int, values: list[Any]) -> str:
        """`_user_data` for one node from the resolved Output.all values."""
        return self._user_data(rank, *values)

    def _user_data(self, rank: int, public_url: str, private_ip: str, head_ip: str,
                   api_parameter: str, admin_parameter: str, table: str | None,
                   trusted_proxies: str | None = None, source_bucket: str | None = None) -> str:
        from r1nest.cloud.userdata import (
            CONTAINER_SECRETS_DIR,
            ENGINE_KEY_SENTINEL,
            ImageBuild,
            NodeBoot,
            render_user_data,
        )
        from r1nest.engines.base import engine_argv, engine_env, engine_secret_files

        args, planned = self.args, self.planned
        profile = planned.plan.profile  # type: ignore[attr-defined]
        argv = engine_argv(
            profile, host=ENGINE_HOST, port=ENGINE_PORT, node_rank=rank,
            head_address=head_ip if planned.nodes > 1 else None, python=CONTAINER_PYTHON,
            secrets_dir=CONTAINER_SECRETS_DIR if profile.engine == "sglang" else None,
        )
        env = engine_env(profile, api_key=ENGINE_KEY_SENTINEL)
        files = engine_secret_files(profile, api_key=ENGINE_KEY_SENTINEL)
        boot = NodeBoot(
            deployment=self.deployment_name,
            region=args.region,
            image=self.image,
            image_build=ImageBuild(
                bucket=source_bucket, key=self.bundle.object_key, sha256=self.bundle.sha256,
                dockerfile=f"images/{args.engine}.Dockerfile", with_efa=planned.efa_interfaces > 0,
            ) if self.bundle is not None and source_bucket else None,
            node_rank=rank,
            nodes=planned.nodes,
            served_model=profile.served_model_name,
            engine_argv=tuple(_container_path(a) for a in argv),
            engine_env=tuple(sorted(env.items())),
            doctor_argv=("r1nest", "doctor", "--model", args.model, "--engine", args.engine,
                         "--nodes", str(planned.nodes)),
            api_key_parameter=api_parameter,
            admin_key_parameter=admin_parameter,
            gateway_port=GATEWAY_PORT,
            engine_port=ENGINE_PORT,
            efa=planned.efa_interfaces > 0,
            public_url=public_url,
            internal_url=f"http://{private_ip}:{GATEWAY_PORT}/v1",
            price_prompt_per_mtok=args.price_prompt_per_mtok,
            price_completion_per_mtok=args.price_completion_per_mtok,
            initial_credits=args.initial_credits,
            store="dynamodb" if table else "sqlite",
            dynamodb_table=table,
            ecr_registry=_ecr_registry(self.image),
            engine_secret_files=tuple(sorted(files.items())),
            # behind the ALB: its addresses are trusted proxies, and the ALB (not the internet)
            # holds connections open up to its idle timeout, so the gateway's header deadline
            # must not close them first
            extra_gateway_env=(
                (("R1NEST_TRUSTED_PROXIES", trusted_proxies), ("R1NEST_HEADER_TIMEOUT_S", str(ALB_IDLE_TIMEOUT_S + 60)))
                if trusted_proxies else ()
            ),
        )
        return render_user_data(boot)

    # -- outputs -----------------------------------------------------------------------------
    def _outputs(self) -> None:
        args, planned = self.args, self.planned
        self.public_endpoint = self._public_url(self.head_public_ips[0], "/v1")
        self.internal_endpoint = pulumi.Output.format("http://{0}:{1}/v1", self.head_private_ips[0], GATEWAY_PORT)
        self.overview_url = self._public_url(self.head_public_ips[0], "/overview")
        self.instance_ids = pulumi.Output.all(*[i.id for i in self.instances])
        profile = planned.plan.profile  # type: ignore[attr-defined]
        self.outputs: dict[str, object] = {
            "public_endpoint": self.public_endpoint,
            "internal_endpoint": self.internal_endpoint,
            "overview_url": self.overview_url,
            "api_key": self.api_key,
            "admin_key": self.admin_key,
            "model": profile.served_model_name,
            "model_repo": profile.model,
            "engine": args.engine,
            "instance_type": planned.instance_type,
            "nodes": planned.nodes,
            "replicas": args.replicas,
            "credits": args.initial_credits,
            "region": args.region,
            "deployment": self.deployment_name,
            "instance_ids": self.instance_ids,
            "vcpus_per_node": planned.vcpus_per_node,
            "spot": args.spot,
            # integers for money: micro-dollars per hour for all instances (on-demand list price)
            "cost_microusd_per_hour": planned.plan.cost_microusd_per_hour * args.replicas,  # type: ignore[attr-defined]
            "api_key_parameter": self.api_key_parameter.name,
            "admin_key_parameter": self.admin_key_parameter.name,
            # who can reach the public endpoint, and whether it is encrypted (the overview page says so)
            "allowed_cidrs": ", ".join(args.allowed_cidrs),
            "tls": "https" if args.domain else "none",
            "image": self.image,
        }
        if args.domain:
            self.outputs["domain"] = args.domain
        if self.bundle is not None:
            self.outputs["source_bundle"] = pulumi.Output.format("s3://{0}/{1}", self.source_bucket.bucket,
                                                                 self.bundle.object_key)
            self.outputs["source_sha256"] = self.bundle.sha256
        if self.ledger_table is not None:
            self.outputs["ledger_table"] = self.ledger_table.name
        self.register_outputs(self.outputs)


def _ecr_registry(image: str) -> str | None:
    repo = ecr_repository(image)
    return f"{repo[0]}.dkr.ecr.{repo[1]}.amazonaws.com" if repo else None
