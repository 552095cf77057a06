"""`r1nest status`: is an AWS deployment up, healthy, and can the account run it at all?

    r1nest status [--stack-dir infra/aws | --stack-json FILE] [--region R] [--json]

Three checks, from the stack's outputs (`pulumi stack output --json`):
- instances: EC2 `describe_instances` by the tag `r1nest:deployment` (state, type, addresses);
- health: `GET <public endpoint>/health` on the gateway (ready / warming with an ETA);
- GPU quota: Service Quotas, the vCPU quota of the instance family the plan uses (G and VT or P,
  on-demand or spot) against the vCPUs the deployment needs. New AWS accounts often have 0 vCPUs
  for P instances: that is the first thing to know before `pulumi up`.

The boto3 clients are passed in (`Ec2Api`, `QuotasApi`: the calls used, nothing more), so tests
run against moto or fakes that answer like AWS. Exit status 0 when every check passes, 1 when one
fails (the report says which), 2 for bad input.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import click

from r1nest.errors import ConfigError, R1nestError

DEPLOYMENT_TAG = "r1nest:deployment"
MAX_INSTANCES = 200
MAX_STACK_JSON_BYTES = 1024 * 1024
HEALTH_TIMEOUT_S = 5.0
PULUMI_TIMEOUT_S = 60.0
MAX_HEALTH_BODY_CHARS = 500

# Service Quotas codes (service "ec2"), in vCPUs.
QUOTA_CODES: dict[tuple[str, bool], tuple[str, str]] = {
    ("G", False): ("L-DB2E81BA", "Running On-Demand G and VT instances"),
    ("P", False): ("L-417A185B", "Running On-Demand P instances"),
    ("G", True): ("L-3819A6DF", "All G and VT Spot Instance Requests"),
    ("P", True): ("L-7212CCBC", "All P Spot Instance Requests"),
}


class Ec2Api(Protocol):
    def describe_instances(self, **kwargs: Any) -> dict[str, Any]: ...


class QuotasApi(Protocol):
    def get_service_quota(self, *, ServiceCode: str, QuotaCode: str) -> dict[str, Any]: ...

    def get_aws_default_service_quota(self, *, ServiceCode: str, QuotaCode: str) -> dict[str, Any]: ...


HealthProbe = Callable[[str], tuple[int | None, str]]  # url -> (HTTP status or None, body or error)


@dataclass(frozen=True)
class StackFacts:
    """What status needs from the stack outputs."""

    deployment: str
    region: str
    instance_type: str
    nodes: int
    replicas: int
    spot: bool
    public_endpoint: str
    instance_ids: tuple[str, ...] = ()

    @classmethod
    def from_outputs(cls, outputs: Mapping[str, Any], *, region: str | None = None) -> "StackFacts":
        missing = [k for k in ("deployment", "instance_type", "public_endpoint") if not outputs.get(k)]
        if missing:
            raise ConfigError(f"the stack outputs lack {', '.join(missing)}: is this an r1nest stack after `pulumi up`?")
        chosen_region = region or outputs.get("region")
        if not chosen_region:
            raise ConfigError("no region in the stack outputs; pass --region")
        try:
            return cls(
                deployment=str(outputs["deployment"]), region=str(chosen_region),
                instance_type=str(outputs["instance_type"]), nodes=int(outputs.get("nodes", 1)),
                replicas=int(outputs.get("replicas", 1)), spot=bool(outputs.get("spot", False)),
                public_endpoint=str(outputs["public_endpoint"]),
                instance_ids=tuple(str(i) for i in outputs.get("instance_ids") or ()),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"unexpected stack outputs: {exc}") from None

    @property
    def health_url(self) -> str:
        base = self.public_endpoint.rstrip("/")
        base = base[: -len("/v1")] if base.endswith("/v1") else base
        return base + "/health"


@dataclass(frozen=True)
class InstanceState:
    instance_id: str
    state: str
    instance_type: str
    role: str
    private_ip: str | None
    public_ip: str | None


@dataclass(frozen=True)
class QuotaCheck:
    code: str
    name: str
    value_vcpus: int | None  # None: Service Quotas did not say
    needed_vcpus: int
    ok: bool
    message: str


@dataclass(frozen=True)
class HealthCheck:
    url: str
    status: int | None
    body: str
    ok: bool
    phase: str  # "ready", "warming", "down", "unreachable"


@dataclass(frozen=True)
class StatusReport:
    facts: StackFacts
    instances: tuple[InstanceState, ...]
    health: HealthCheck
    quota: QuotaCheck
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "deployment": self.facts.deployment, "region": self.facts.region,
            "instance_type": self.facts.instance_type, "nodes": self.facts.nodes, "replicas": self.facts.replicas,
            "instances": [asdict(i) for i in self.instances], "health": asdict(self.health),
            "quota": asdict(self.quota), "ok": self.ok, "problems": list(self.problems),
        }


# -- pure assessment ------------------------------------------------------------------------------

def needed_vcpus(facts: StackFacts) -> int:
    from r1nest.hardware import get_instance_type

    return get_instance_type(facts.instance_type).vcpus * facts.nodes * facts.replicas


def quota_for(facts: StackFacts) -> tuple[str, str]:
    from r1nest.hardware import get_instance_type

    return QUOTA_CODES[(get_instance_type(facts.instance_type).quota_family, facts.spot)]


def assess_quota(facts: StackFacts, value_vcpus: int | None) -> QuotaCheck:
    code, name = quota_for(facts)
    needed = needed_vcpus(facts)
    per_node = needed // (facts.nodes * facts.replicas)
    count = facts.nodes * facts.replicas
    shape = f"{count} x {facts.instance_type} at {per_node} vCPUs each" if count > 1 else f"{facts.instance_type}, {per_node} vCPUs"
    request = (f"aws service-quotas request-service-quota-increase --service-code ec2 --quota-code {code} "
               f"--desired-value {needed} --region {facts.region}")
    if value_vcpus is None:
        return QuotaCheck(code, name, None, needed, True,
                          f"Service Quotas has no value for '{name}' ({code}) in {facts.region}; "
                          f"this deployment needs {needed} vCPUs ({shape}). If launches fail, run: {request}")
    if value_vcpus >= needed:
        return QuotaCheck(code, name, value_vcpus, needed, True,
                          f"'{name}' quota in {facts.region}: {value_vcpus} vCPUs, this deployment needs {needed}")
    return QuotaCheck(code, name, value_vcpus, needed, False,
                      f"GPU quota too low: '{name}' ({code}) in {facts.region} is {value_vcpus} vCPUs but this "
                      f"deployment needs {needed} ({shape}). EC2 will refuse to launch it. Ask AWS for more: {request}")


def assess_health(url: str, status: int | None, body: str) -> HealthCheck:
    text = body[:MAX_HEALTH_BODY_CHARS]
    if status is None:
        return HealthCheck(url, None, text, False, "unreachable")
    phase = "down"
    try:
        document = json.loads(body)
        if isinstance(document, dict):
            phase = str(document.get("status") or document.get("phase") or phase)
    except ValueError:
        lowered = body.lower()
        phase = "ready" if "ready" in lowered else "warming" if "warming" in lowered else phase
    if status == 200 and phase not in ("warming", "down", "draining"):
        phase = "ready"
    return HealthCheck(url, status, text, status == 200 and phase == "ready", phase)


def assess(facts: StackFacts, instances: list[InstanceState], health: HealthCheck, quota: QuotaCheck) -> StatusReport:
    problems: list[str] = []
    expected = facts.nodes * facts.replicas
    running = [i for i in instances if i.state == "running"]
    if len(running) < expected:
        states = ", ".join(f"{i.instance_id} {i.state}" for i in instances) or "none found"
        problems.append(f"{len(running)} of {expected} instances running ({states})")
    missing = sorted(set(facts.instance_ids) - {i.instance_id for i in instances})
    if missing:
        problems.append(f"instances in the stack outputs but not in EC2: {', '.join(missing)}")
    if not health.ok:
        problems.append(f"gateway {health.url}: {health.phase}" + (f" (HTTP {health.status})" if health.status else f" ({health.body})"))
    if not quota.ok:
        problems.append(quota.message)
    return StatusReport(facts, tuple(instances), health, quota, tuple(problems))


# -- I/O at the edges -----------------------------------------------------------------------------

def find_instances(ec2: Ec2Api, deployment: str) -> list[InstanceState]:
    found: list[InstanceState] = []
    kwargs: dict[str, Any] = {"Filters": [{"Name": f"tag:{DEPLOYMENT_TAG}", "Values": [deployment]}], "MaxResults": 100}
    while len(found) < MAX_INSTANCES:
        page = ec2.describe_instances(**kwargs)
        for reservation in page.get("Reservations", []):
            for item in reservation.get("Instances", []):
                tags = {t["Key"]: t["Value"] for t in item.get("Tags", [])}
                found.append(InstanceState(
                    instance_id=item["InstanceId"], state=item.get("State", {}).get("Name", "unknown"),
                    instance_type=item.get("InstanceType", ""), role=tags.get("r1nest:role", ""),
                    private_ip=item.get("PrivateIpAddress"), public_ip=item.get("PublicIpAddress"),
                ))
        token = page.get("NextToken")
        if not token:
            break
        kwargs["NextToken"] = token
    return [i for i in found if i.state != "terminated"][:MAX_INSTANCES]


def read_quota(quotas: QuotasApi, code: str) -> int | None:
    """The account's applied value, else AWS's default, else None (no value known)."""
    from botocore.exceptions import ClientError

    for call in (quotas.get_service_quota, quotas.get_aws_default_service_quota):
        try:
            value = call(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"]
            return int(value)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("NoSuchResourceException", "NoSuchResource"):
                raise
    return None


def probe_health(url: str) -> tuple[int | None, str]:
    import httpx

    try:
        response = httpx.get(url, timeout=HEALTH_TIMEOUT_S, follow_redirects=False)
        return response.status_code, response.text[:MAX_HEALTH_BODY_CHARS]
    except httpx.HTTPError as exc:
        return None, type(exc).__name__


def collect(facts: StackFacts, *, ec2: Ec2Api, quotas: QuotasApi, probe: HealthProbe = probe_health) -> StatusReport:
    instances = find_instances(ec2, facts.deployment)
    status, body = probe(facts.health_url)
    code, _ = quota_for(facts)
    return assess(facts, instances, assess_health(facts.health_url, status, body), assess_quota(facts, read_quota(quotas, code)))


def aws_clients(region: str) -> tuple[Ec2Api, QuotasApi]:
    import boto3

    session = boto3.session.Session(region_name=region)
    return session.client("ec2"), session.client("service-quotas")


def load_outputs(*, stack_json: Path | None, stack_dir: Path | None) -> dict[str, Any]:
    if stack_json is not None:
        try:
            with open(stack_json, encoding="utf-8") as handle:
                text = handle.read(MAX_STACK_JSON_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read {stack_json}: {exc.strerror}") from None
        if len(text) > MAX_STACK_JSON_BYTES:
            raise ConfigError(f"{stack_json} is larger than {MAX_STACK_JSON_BYTES} bytes")
    else:
        directory = stack_dir or Path("infra/aws")
        try:
            done = subprocess.run(["pulumi", "stack", "output", "--json"], cwd=directory, capture_output=True,
                                  text=True, timeout=PULUMI_TIMEOUT_S, check=False)
        except FileNotFoundError:
            raise ConfigError("the Pulumi CLI is not installed here; pass --stack-json FILE "
                              "(written by `pulumi stack output --json > FILE` where it is)") from None
        except subprocess.TimeoutExpired:
            raise ConfigError(f"`pulumi stack output` did not answer within {PULUMI_TIMEOUT_S:.0f} s") from None
        if done.returncode != 0:
            raise ConfigError(f"`pulumi stack output --json` in {directory} failed: {done.stderr.strip()[:300]}")
        text = done.stdout
    try:
        outputs = json.loads(text)
    except ValueError:
        raise ConfigError("the stack outputs are not JSON") from None
    if not isinstance(outputs, dict):
        raise ConfigError("the stack outputs are not a JSON object")
    return outputs


def render_report(report: StatusReport) -> str:
    facts = report.facts
    lines = [f"deployment {facts.deployment} in {facts.region}: "
             f"{facts.replicas} x {facts.nodes} x {facts.instance_type}"]
    for i in report.instances:
        lines.append(f"  {i.instance_id}  {i.state:<13} {i.instance_type:<18} {i.role or '-':<6} "
                     f"private {i.private_ip or '-'}  public {i.public_ip or '-'}")
    if not report.instances:
        lines.append("  no instances found with the deployment's tag")
    health = report.health
    lines.append(f"health  {health.url}: {health.phase}" + (f" (HTTP {health.status})" if health.status else ""))
    lines.append(f"quota   {report.quota.message}")
    lines.append("ok" if report.ok else "problems:\n" + "\n".join(f"  - {p}" for p in report.problems))
    return "\n".join(lines)


@click.command(help="State, health and GPU quota of an AWS deployment (reads its Pulumi stack outputs).")
@click.option("--stack-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the Pulumi project folder (default: infra/aws); runs `pulumi stack output --json` there")
@click.option("--stack-json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="a file written by `pulumi stack output --json` instead")
@click.option("--region", default=None, help="AWS region (default: the stack's)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable report")
def status(stack_dir: Path | None, stack_json: Path | None, region: str | None, as_json: bool) -> None:
    if stack_dir is not None and stack_json is not None:
        raise ConfigError("give --stack-dir or --stack-json, not both")
    facts = StackFacts.from_outputs(load_outputs(stack_json=stack_json, stack_dir=stack_dir), region=region)
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise ConfigError("r1nest status needs boto3: pip install 'r1nest[aws]'") from None
    try:
        ec2, quotas = aws_clients(facts.region)
        report = collect(facts, ec2=ec2, quotas=quotas)
    except (BotoCoreError, ClientError) as exc:
        raise R1nestError(f"AWS answered: {exc}") from None
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else render_report(report))
    if not report.ok:
        raise SystemExit(1)
