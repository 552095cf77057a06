"""Run the Pulumi program offline under `pulumi.runtime.Mocks` and record what it registers.

`run_stack(config, plant=None)` runs `infra/aws/__main__.py`'s program body with the given
`r1nest:*` configuration against fresh mocks and a fresh root stack, and returns a `StackRun`:
every resource registered (type, name, inputs as the engine sees them), the stack outputs
resolved, and which outputs are secret. `plant` is a stack transformation (pulumi's
`register_stack_transformation`) that alters resources on their way to the engine: the tests use
it to plant one violation and watch the matching policy check report it.
"""

from __future__ import annotations

import asyncio
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

pulumi = pytest.importorskip("pulumi")
pytest.importorskip("pulumi_aws")
pytest.importorskip("pulumi_random")

INFRA_DIR = Path(__file__).resolve().parents[3] / "infra" / "aws"
if str(INFRA_DIR) not in sys.path:
    sys.path.insert(0, str(INFRA_DIR))

from r1nest_aws.policies import Registered  # noqa: E402

ACCOUNT = "123456789012"
REGION = "us-east-1"
# the three keys a user sets: nothing to build, the node builds the image from this checkout
BASE_CONFIG = {
    "model": "deepseek-r1-distill-qwen-7b",
    "allowedCidrs": "203.0.113.0/24",
}
ECR_IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/r1nest:vllm"
ZONE_ID = "Z0123456789ABCDEFGHIJ"
ALB_ZONE_ID = "Z35SXDOTRQ7X7K"


class RecordingMocks(pulumi.runtime.Mocks):
    """Answers like AWS would (ids, ARNs, addresses) and records every registration."""

    def __init__(self) -> None:
        self.resources: list[Registered] = []
        self._count = 0

    def _next(self, args: pulumi.runtime.MockResourceArgs) -> int:
        """A number of the resource's own, the same in every run (as AWS keeps a resource's id
        and addresses in the stack's state): registration order varies between runs."""
        self._count += 1
        return zlib.crc32(f"{args.typ}/{args.name}".encode()) % 200 + 1

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        resource_id, outputs = self._answer(args)
        self.resources.append(Registered(args.typ, args.name, dict(args.inputs), resource_id))
        return resource_id, outputs

    def _answer(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        n = self._next(args)
        outputs = dict(args.inputs)
        token = args.typ
        if token == "random:index/randomId:RandomId":
            outputs.update(hex=f"{n:012x}", b64Url="x", dec=str(n))
        elif token == "random:index/randomPassword:RandomPassword":
            outputs.update(result=(f"S{n:03d}" + "Zq9" * 20)[: int(args.inputs.get("length", 43))])
        elif token == "aws:ssm/parameter:Parameter":
            outputs["arn"] = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{args.inputs['name']}"
        elif token == "aws:ec2/networkInterface:NetworkInterface":
            outputs.update(privateIp=f"10.42.0.{10 + n}")
        elif token == "aws:ec2/eip:Eip":
            outputs.update(publicIp=f"198.51.100.{n}", allocationId=f"eipalloc-{n:08x}")
        elif token == "aws:ec2/instance:Instance":
            outputs.update(primaryNetworkInterfaceId=f"eni-{n:08x}", arn=f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-{n:017x}")
            return f"i-{n:017x}", outputs
        elif token == "aws:lb/loadBalancer:LoadBalancer":
            outputs.update(dnsName=f"{args.name}-1234.{REGION}.elb.amazonaws.com", zoneId=ALB_ZONE_ID,
                           arn=f"arn:aws:elasticloadbalancing:{REGION}:{ACCOUNT}:loadbalancer/app/{args.name}/1")
        elif token == "aws:s3/bucket:Bucket":  # the id of a bucket is its name
            bucket = f"{args.name}-{n:07x}"
            outputs.update(bucket=bucket, arn=f"arn:aws:s3:::{bucket}")
            return bucket, outputs
        elif token == "aws:acm/certificate:Certificate":
            outputs.update(arn=f"arn:aws:acm:{REGION}:{ACCOUNT}:certificate/{n:08x}", domainValidationOptions=[{
                "domainName": args.inputs["domainName"], "resourceRecordType": "CNAME",
                "resourceRecordName": f"_0a1b2c.{args.inputs['domainName']}.",
                "resourceRecordValue": "_3d4e5f.acm-validations.aws.",
            }])
        elif token == "aws:acm/certificateValidation:CertificateValidation":
            outputs["certificateArn"] = args.inputs["certificateArn"]
        elif token == "aws:route53/record:Record":
            outputs["fqdn"] = str(args.inputs["name"]).rstrip(".")
        elif token == "aws:dynamodb/table:Table":
            outputs.update(name=f"{args.name}-{n:04x}", arn=f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{args.name}-{n:04x}")
        elif token in ("aws:iam/role:Role", "aws:iam/instanceProfile:InstanceProfile"):
            outputs.update(name=f"{args.name}-{n:04x}", arn=f"arn:aws:iam::{ACCOUNT}:role/{args.name}")
        elif "arn" not in outputs:
            outputs["arn"] = f"arn:aws:mock:{REGION}:{ACCOUNT}:{args.name}"
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict, list | None]:
        if args.token == "aws:ec2/getAmi:getAmi":
            return {"id": "ami-0123456789abcdef0", "name": "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) 20260101",
                    "architecture": "x86_64"}, []
        if args.token == "aws:route53/getZone:getZone":
            return {"zoneId": ZONE_ID, "id": ZONE_ID, "name": args.args["name"],
                    "arn": f"arn:aws:route53:::hostedzone/{ZONE_ID}"}, []
        if args.token == "aws:index/getAvailabilityZones:getAvailabilityZones":
            return {"names": [f"{REGION}a", f"{REGION}b", f"{REGION}c"], "zoneIds": ["use1-az1", "use1-az2", "use1-az4"],
                    "id": REGION}, []
        return {}, []


@dataclass
class StackRun:
    resources: list[Registered]
    outputs: dict[str, Any]
    secret_outputs: set[str]
    config: dict[str, str] = field(default_factory=dict)

    def of(self, token: str) -> list[Registered]:
        return [r for r in self.resources if r.type == token]

    def one(self, token: str) -> Registered:
        found = self.of(token)
        assert len(found) == 1, f"expected one {token}, found {len(found)}"
        return found[0]


Plant = Callable[[Any], Any]


def _run(config: dict[str, str], plant: Plant | None, region: str | None, via_main: bool = False) -> StackRun:
    from pulumi.runtime import settings

    from r1nest_aws import program

    # pulumi (set_mocks included) drives its loop through asyncio.get_event_loop(); a test that ran asyncio.run() before
    # leaves none (or a closed one) behind: give pulumi a fresh one then, and keep it
    try:
        usable = not asyncio.get_event_loop_policy().get_event_loop().is_closed()
    except RuntimeError:
        usable = False
    if not usable:
        asyncio.set_event_loop(asyncio.new_event_loop())
    mocks = RecordingMocks()
    settings.ROOT.set(None)  # a fresh root stack for every run
    pulumi.runtime.set_mocks(mocks, project="r1nest", stack="test", preview=False)
    all_config = {f"r1nest:{k}": v for k, v in config.items()}
    if region:
        all_config["aws:region"] = region
    pulumi.runtime.set_all_config(all_config)
    outputs: dict[str, Any] = {}
    secret: set[str] = set()

    @pulumi.runtime.test
    def body():
        if plant is not None:
            pulumi.runtime.register_stack_transformation(plant)
        if via_main:  # the file `pulumi up` runs
            import runpy

            runpy.run_path(str(INFRA_DIR / "__main__.py"), run_name="__main__")
        else:
            program.run()
        exported = dict(settings.get_root_resource().outputs)

        async def collect() -> None:
            for name, value in exported.items():
                out = pulumi.Output.from_input(value)
                outputs[name] = await out.future()
                if await out.is_secret():
                    secret.add(name)

        return asyncio.ensure_future(collect())

    body()
    return StackRun(mocks.resources, outputs, secret, dict(config))


@pytest.fixture
def run_stack() -> Callable[..., StackRun]:
    def run(config: dict[str, str] | None = None, *, plant: Plant | None = None, region: str | None = REGION,
            via_main: bool = False, **overrides: str) -> StackRun:
        merged = dict(BASE_CONFIG if config is None else config)
        merged.update(overrides)
        return _run(merged, plant, region, via_main)

    return run
