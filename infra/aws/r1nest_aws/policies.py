"""The properties every r1nest deployment on AWS must hold, as pure checks.

Each check takes the resources a run of the program registered (type token, name, inputs as the
engine receives them: camelCase property names) and returns a list of violations, empty when the
deployment complies. The unit tests run the program under `pulumi.runtime.Mocks`, record what it
registers, and assert every list is empty; each test also plants one violation and asserts that
its check reports it, so no check can pass by accident.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from r1nest_aws.config import HTTPS_PORT

INSTANCE = "aws:ec2/instance:Instance"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
VOLUME = "aws:ebs/volume:Volume"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
SG_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
SG_INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
KEY_PAIR = "aws:ec2/keyPair:KeyPair"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
POLICY = "aws:iam/policy:Policy"
ROLE_POLICY_ATTACHMENT = "aws:iam/rolePolicyAttachment:RolePolicyAttachment"

WORLD = ("0.0.0.0/0", "::/0")


@dataclass(frozen=True)
class Registered:
    type: str
    name: str
    inputs: Mapping[str, Any]
    id: str | None = None  # what the provider answered (tests: the mocks), to follow references


def _of(resources: Iterable[Registered], *types: str) -> list[Registered]:
    return [r for r in resources if r.type in types]


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


# -- instances ----------------------------------------------------------------------------------

def imdsv2_required(resources: Sequence[Registered]) -> list[str]:
    """Every instance (and launch template that sets metadata options) requires IMDSv2 tokens
    with a hop limit of 1, so a container on the box cannot reach the role's credentials."""
    problems = []
    for r in _of(resources, INSTANCE):
        options = r.inputs.get("metadataOptions") or {}
        if options.get("httpTokens") != "required":
            problems.append(f"{r.name}: IMDSv2 not required (httpTokens={options.get('httpTokens')!r})")
        if options.get("httpPutResponseHopLimit") != 1:
            problems.append(f"{r.name}: metadata hop limit {options.get('httpPutResponseHopLimit')!r}, not 1")
    for r in _of(resources, LAUNCH_TEMPLATE):
        options = r.inputs.get("metadataOptions")
        if options and (options.get("httpTokens") != "required" or options.get("httpPutResponseHopLimit") not in (None, 1)):
            problems.append(f"{r.name}: launch template allows IMDSv1 or a hop limit above 1")
    return problems


def volumes_encrypted(resources: Sequence[Registered]) -> list[str]:
    problems = []
    for r in _of(resources, INSTANCE):
        root = r.inputs.get("rootBlockDevice")
        if not root or not _truthy(root.get("encrypted")):
            problems.append(f"{r.name}: root volume not encrypted")
        for device in r.inputs.get("ebsBlockDevices") or []:
            if not _truthy(device.get("encrypted")):
                problems.append(f"{r.name}: volume {device.get('deviceName')} not encrypted")
    for r in _of(resources, LAUNCH_TEMPLATE):
        for mapping in r.inputs.get("blockDeviceMappings") or []:
            if not _truthy((mapping.get("ebs") or {}).get("encrypted")):
                problems.append(f"{r.name}: launch template volume {mapping.get('deviceName')} not encrypted")
    for r in _of(resources, VOLUME):
        if not _truthy(r.inputs.get("encrypted")):
            problems.append(f"{r.name}: EBS volume not encrypted")
    return problems


def no_key_pair(resources: Sequence[Registered]) -> list[str]:
    """Shell access is SSM Session Manager: no SSH key pair anywhere."""
    problems = [f"{r.name}: an EC2 key pair" for r in _of(resources, KEY_PAIR)]
    for r in _of(resources, INSTANCE, LAUNCH_TEMPLATE):
        if r.inputs.get("keyName"):
            problems.append(f"{r.name}: uses key pair {r.inputs['keyName']!r}")
    return problems


def user_data_texts(resources: Sequence[Registered]) -> list[tuple[str, str]]:
    texts = []
    for r in _of(resources, INSTANCE):
        if r.inputs.get("userData"):
            texts.append((r.name, str(r.inputs["userData"])))
        if r.inputs.get("userDataBase64"):
            texts.append((r.name, base64.b64decode(r.inputs["userDataBase64"]).decode("utf-8", "replace")))
    for r in _of(resources, LAUNCH_TEMPLATE):
        if r.inputs.get("userData"):
            texts.append((r.name, base64.b64decode(r.inputs["userData"]).decode("utf-8", "replace")))
    return texts


def user_data_free_of_secrets(resources: Sequence[Registered], known_secrets: Sequence[str] = ()) -> list[str]:
    """No key-shaped string and none of the deployment's actual secret values in user data
    (which anyone with ec2:DescribeInstanceAttribute can read)."""
    from r1nest.cloud.userdata import find_secrets

    problems = []
    for name, text in user_data_texts(resources):
        for kind in find_secrets(text):
            problems.append(f"{name}: user data holds a {kind}")
        for secret in known_secrets:
            if secret and secret in text:
                problems.append(f"{name}: user data holds one of the deployment's keys")
    return problems


# -- network ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IngressRule:
    owner: str
    protocol: str
    from_port: int
    to_port: int
    cidrs: tuple[str, ...]
    from_groups: bool  # sourced from other security groups
    self_only: bool  # sourced only from the group itself

    def covers(self, port: int) -> bool:
        if self.protocol in ("-1", "all"):
            return True
        return self.from_port <= port <= self.to_port


def ingress_rules(resources: Sequence[Registered]) -> list[IngressRule]:
    rules = []
    for r in _of(resources, SECURITY_GROUP):
        for rule in r.inputs.get("ingress") or []:
            cidrs = tuple(rule.get("cidrBlocks") or ()) + tuple(rule.get("ipv6CidrBlocks") or ())
            groups = bool(rule.get("securityGroups")) or bool(rule.get("prefixListIds"))
            rules.append(IngressRule(r.name, str(rule.get("protocol")), int(rule.get("fromPort", 0)),
                                     int(rule.get("toPort", 0)), cidrs, groups,
                                     bool(rule.get("self")) and not cidrs and not groups))
    for r in _of(resources, SG_RULE):
        if r.inputs.get("type") != "ingress":
            continue
        cidrs = tuple(r.inputs.get("cidrBlocks") or ()) + tuple(r.inputs.get("ipv6CidrBlocks") or ())
        rules.append(IngressRule(r.name, str(r.inputs.get("protocol")), int(r.inputs.get("fromPort", 0)),
                                 int(r.inputs.get("toPort", 0)), cidrs,
                                 bool(r.inputs.get("sourceSecurityGroupId")) or bool(r.inputs.get("prefixListIds")),
                                 bool(r.inputs.get("self")) and not cidrs))
    for r in _of(resources, SG_INGRESS_RULE):
        cidrs = tuple(x for x in (r.inputs.get("cidrIpv4"), r.inputs.get("cidrIpv6")) if x)
        rules.append(IngressRule(r.name, str(r.inputs.get("ipProtocol")), int(r.inputs.get("fromPort") or 0),
                                 int(r.inputs.get("toPort") or 65535), cidrs,
                                 bool(r.inputs.get("referencedSecurityGroupId")), False))
    return rules


def only_gateway_port_open(resources: Sequence[Registered], *, allowed_cidrs: Sequence[str],
                           gateway_port: int, https_ports: Sequence[int] = ()) -> list[str]:
    """Ingress from addresses: only TCP `gateway_port` (with a domain: only the load balancer's
    `https_ports`, 443 and the redirecting 80), only from `allowed_cidrs` (so 0.0.0.0/0 only when
    the configuration says so). Ingress from groups: the gateway port (load balancer) or traffic
    inside the deployment's own group."""
    allowed = [ipaddress.ip_network(c) for c in allowed_cidrs]
    ports = (gateway_port, *https_ports)
    problems = []
    for rule in ingress_rules(resources):
        if rule.self_only:
            continue
        exact_port = rule.protocol in ("tcp", "6") and rule.from_port == rule.to_port and rule.from_port in ports
        if not exact_port:
            problems.append(f"{rule.owner}: ingress {rule.protocol} {rule.from_port}-{rule.to_port} "
                            f"(only tcp {', '.join(map(str, ports))} may be open)")
            continue
        for cidr in rule.cidrs:
            network = ipaddress.ip_network(cidr, strict=False)
            if not any(network.version == a.version and network.subnet_of(a) for a in allowed):  # type: ignore[arg-type]
                world = " (the whole internet)" if cidr in WORLD else ""
                problems.append(f"{rule.owner}: port {rule.from_port} open to {cidr}{world}, not an allowed CIDR")
    return problems


def engine_port_closed(resources: Sequence[Registered], *, engine_port: int) -> list[str]:
    """No rule lets anything outside the deployment's own group reach the engine port, and every
    engine listens on loopback."""
    problems = [
        f"{rule.owner}: ingress {rule.protocol} {rule.from_port}-{rule.to_port} reaches the engine port {engine_port}"
        for rule in ingress_rules(resources)
        if not rule.self_only and rule.covers(engine_port)
    ]
    for name, text in user_data_texts(resources):
        for host in engine_hosts(text):
            if host not in ("127.0.0.1", "localhost", "::1"):
                problems.append(f"{name}: the engine listens on {host}, not loopback")
    return problems


def exec_argv(line: str) -> list[str]:
    """The argv of a systemd `Exec...=` line as r1nest writes them (systemd_command)."""
    _, _, command = line.strip().partition("=")
    return shlex.split(command.lstrip("-").replace("$$", "$").replace("%%", "%"))


def engine_hosts(user_data: str) -> list[str]:
    """The --host of every engine command (ExecStart of r1nest-engine.service) in user data."""
    hosts = []
    for line in user_data.splitlines():
        line = line.strip()
        if line.startswith("ExecStart=") and "r1nest-engine" in line:
            argv = exec_argv(line)
            hosts += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--host"]
            hosts += [a.split("=", 1)[1] for a in argv if a.startswith("--host=")]
    return hosts


# -- IAM ----------------------------------------------------------------------------------------

def _statements(document: Any) -> list[dict[str, Any]]:
    if isinstance(document, str):
        document = json.loads(document)
    statements = document.get("Statement", [])
    return [statements] if isinstance(statements, dict) else list(statements)


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def iam_least_privilege(resources: Sequence[Registered], *, parameter_arns: Sequence[str],
                        table_arn: str | None = None) -> list[str]:
    """SSM reads only on the deployment's key parameters; DynamoDB only on its ledger table;
    no wildcard action; `*` resources only where AWS allows nothing narrower (ECR login);
    the one managed policy is SSM Session Manager's."""
    problems = []
    wildcard_ok = {"ecr:GetAuthorizationToken"}
    for r in _of(resources, ROLE_POLICY, POLICY):
        for statement in _statements(r.inputs.get("policy")):
            if statement.get("Effect") != "Allow":
                continue
            actions = _as_list(statement.get("Action"))
            resources_ = _as_list(statement.get("Resource"))
            if any(a == "*" or a.endswith(":*") for a in actions):
                problems.append(f"{r.name}: wildcard action in {actions}")
            if "*" in resources_ and not set(actions) <= wildcard_ok:
                problems.append(f"{r.name}: {actions} on every resource")
            if any(a.startswith("ssm:") for a in actions):
                if sorted(resources_) != sorted(parameter_arns):
                    problems.append(f"{r.name}: SSM access on {resources_}, not exactly the key parameters")
            if any(a.startswith("kms:") for a in actions) and "*" in resources_:
                problems.append(f"{r.name}: KMS on every key")
            if any(a.startswith("dynamodb:") for a in actions):
                expected = {table_arn, f"{table_arn}/index/*"} if table_arn else set()
                if not set(resources_) <= expected or not resources_:
                    problems.append(f"{r.name}: DynamoDB access on {resources_}, not the ledger table")
    for r in _of(resources, ROLE_POLICY_ATTACHMENT):
        if r.inputs.get("policyArn") != "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore":
            problems.append(f"{r.name}: managed policy {r.inputs.get('policyArn')} attached")
    return problems


# -- HTTPS --------------------------------------------------------------------------------------

LISTENER = "aws:lb/listener:Listener"
CERTIFICATE = "aws:acm/certificate:Certificate"
CERTIFICATE_VALIDATION = "aws:acm/certificateValidation:CertificateValidation"
DNS_RECORD = "aws:route53/record:Record"
# TLS 1.3 (+ 1.2 with forward-secret AEAD ciphers only): ELB's recommended policies, no CBC, no TLS 1.0/1.1
MODERN_TLS_POLICIES = (
    "ELBSecurityPolicy-TLS13-1-2-2021-06",
    "ELBSecurityPolicy-TLS13-1-2-Res-2021-06",
    "ELBSecurityPolicy-TLS13-1-3-2021-06",
)


def _default_actions(listener: Registered) -> list[Mapping[str, Any]]:
    return list(listener.inputs.get("defaultActions") or [])


def https_only(resources: Sequence[Registered], *, domain: str, gateway_port: int) -> list[str]:
    """With a domain: a DNS-validated ACM certificate for it, an HTTPS listener on HTTPS_PORT with a
    modern TLS policy, plain HTTP only as a redirect to HTTPS, an alias record for the domain, and
    the gateway port reachable from no address block at all (only from the load balancer)."""
    problems = []
    certificates = [r for r in _of(resources, CERTIFICATE) if r.inputs.get("domainName") == domain]
    if not certificates:
        problems.append(f"no ACM certificate for {domain}")
    for r in certificates:
        if r.inputs.get("validationMethod") != "DNS":
            problems.append(f"{r.name}: certificate validated by {r.inputs.get('validationMethod')!r}, not DNS")
    if not _of(resources, CERTIFICATE_VALIDATION):
        problems.append("the certificate's validation is not awaited (no CertificateValidation)")
    listeners = _of(resources, LISTENER)
    https = [r for r in listeners if r.inputs.get("protocol") == "HTTPS"]
    if not any(int(r.inputs.get("port", 0)) == HTTPS_PORT for r in https):
        problems.append(f"no HTTPS listener on {HTTPS_PORT}")
    for r in https:
        if r.inputs.get("sslPolicy") not in MODERN_TLS_POLICIES:
            problems.append(f"{r.name}: TLS policy {r.inputs.get('sslPolicy')!r} is not one of {MODERN_TLS_POLICIES}")
        if not r.inputs.get("certificateArn"):
            problems.append(f"{r.name}: HTTPS listener without a certificate")
    for r in listeners:
        if int(r.inputs.get("port", 0)) == gateway_port:
            problems.append(f"{r.name}: a listener on the gateway port {gateway_port}")
        if r.inputs.get("protocol") != "HTTPS":
            actions = _default_actions(r)
            redirects = [a for a in actions if a.get("type") == "redirect"
                         and (a.get("redirect") or {}).get("protocol") == "HTTPS"]
            if not actions or len(redirects) != len(actions):
                problems.append(f"{r.name}: plain {r.inputs.get('protocol')} on {int(r.inputs.get('port', 0))} "
                                "serves the API instead of redirecting to HTTPS")
    for rule in ingress_rules(resources):
        if rule.cidrs and rule.covers(gateway_port):
            problems.append(f"{rule.owner}: the gateway port {gateway_port} is open to {', '.join(rule.cidrs)}")
    aliases = [r for r in _of(resources, DNS_RECORD)
               if str(r.inputs.get("name", "")).rstrip(".") == domain and r.inputs.get("aliases")]
    if not aliases:
        problems.append(f"no alias record for {domain}")
    return problems


def plain_http_announced(outputs: Mapping[str, Any], warnings: Sequence[str]) -> list[str]:
    """A deployment without HTTPS says so: a warning at `pulumi up` naming who can reach the
    unencrypted endpoint, and outputs that let the overview page say it too."""
    endpoint = str(outputs.get("public_endpoint", ""))
    if endpoint.startswith("https://"):
        return [] if outputs.get("tls") == "https" else ["an https endpoint whose tls output is not 'https'"]
    problems = []
    if outputs.get("tls") != "none":
        problems.append(f"plain-HTTP endpoint {endpoint} with tls output {outputs.get('tls')!r}")
    cidrs = [c.strip() for c in str(outputs.get("allowed_cidrs", "")).split(",") if c.strip()]
    if not cidrs:
        problems.append("no allowed_cidrs output: the overview page cannot say who reaches the endpoint")
    said = [w for w in warnings if "unencrypted" in w.lower()]
    if not said:
        problems.append("no warning that the API is unencrypted HTTP")
    elif not all(c in said[0] for c in cidrs):
        problems.append("the plain-HTTP warning does not say who can reach the endpoint")
    return problems


# -- the source bundle in S3 --------------------------------------------------------------------

BUCKET = "aws:s3/bucket:Bucket"
BUCKET_OBJECTS = ("aws:s3/bucketObjectv2:BucketObjectv2", "aws:s3/bucketObject:BucketObject")
PUBLIC_ACCESS_BLOCK = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
BUCKET_SSE = "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
OWNERSHIP = "aws:s3/bucketOwnershipControls:BucketOwnershipControls"
BUCKET_POLICY = "aws:s3/bucketPolicy:BucketPolicy"
BUCKET_ACL = "aws:s3/bucketAcl:BucketAcl"
_BLOCK_FLAGS = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")


def source_bundle_private(resources: Sequence[Registered], *, object_arns: Sequence[str]) -> list[str]:
    """Every bucket: all public access blocked, ACLs disabled, encrypted at rest; no object or
    bucket ACL and no bucket-policy statement grants anything; the only read anyone is granted
    is s3:GetObject by the instance role on exactly the bundle object(s)."""
    problems = []

    def on(bucket: Registered, token: str) -> list[Registered]:
        return [r for r in _of(resources, token) if r.inputs.get("bucket") in (bucket.id, bucket.inputs.get("bucket"))]

    for bucket in _of(resources, BUCKET):
        blocks = on(bucket, PUBLIC_ACCESS_BLOCK)
        if not any(all(_truthy(b.inputs.get(flag)) for flag in _BLOCK_FLAGS) for b in blocks):
            problems.append(f"{bucket.name}: public access is not fully blocked")
        if not any(r.inputs.get("rule", {}).get("objectOwnership") == "BucketOwnerEnforced"
                   for r in on(bucket, OWNERSHIP)):
            problems.append(f"{bucket.name}: ACLs are not disabled (object ownership not BucketOwnerEnforced)")
        algorithms = [((rule.get("applyServerSideEncryptionByDefault") or {}).get("sseAlgorithm"))
                      for r in on(bucket, BUCKET_SSE) for rule in r.inputs.get("rules") or []]
        if not any(a in ("AES256", "aws:kms", "aws:kms:dsse") for a in algorithms):
            problems.append(f"{bucket.name}: no default server-side encryption")
        if bucket.inputs.get("acl") not in (None, "private") or on(bucket, BUCKET_ACL):
            problems.append(f"{bucket.name}: a bucket ACL ({bucket.inputs.get('acl')!r})")
        for policy in on(bucket, BUCKET_POLICY):
            for statement in _statements(policy.inputs.get("policy")):
                if statement.get("Effect") == "Allow":
                    public = statement.get("Principal") in ("*", {"AWS": "*"})
                    problems.append(f"{policy.name}: the bucket policy grants {statement.get('Action')}"
                                    + (" to everyone" if public else ""))
    for r in _of(resources, *BUCKET_OBJECTS):
        if r.inputs.get("acl") not in (None, "private"):
            problems.append(f"{r.name}: object ACL {r.inputs.get('acl')!r}")
    for r in _of(resources, ROLE_POLICY, POLICY):
        for statement in _statements(r.inputs.get("policy")):
            actions = _as_list(statement.get("Action"))
            if statement.get("Effect") != "Allow" or not any(a.lower().startswith("s3:") for a in actions):
                continue
            if actions != ["s3:GetObject"]:
                problems.append(f"{r.name}: S3 actions {actions}, not only s3:GetObject")
            if sorted(_as_list(statement.get("Resource"))) != sorted(object_arns):
                problems.append(f"{r.name}: S3 read on {statement.get('Resource')}, not exactly the source bundle")
    return problems
