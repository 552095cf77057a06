"""The stack's configuration, read once into a typed, validated `DeploymentArgs`.

Pulumi keeps configuration as strings (`pulumi config set r1nest:nodes 2`); `parse_config` turns
the `r1nest:*` values into typed fields and refuses anything it does not understand, with a
message that says which key to set and how. It is a pure function of a mapping, so tests feed it
dictionaries and `__main__.py` feeds it the stack's configuration.

    key                      type          default         meaning
    model                    string        (required)      catalog id, e.g. deepseek-r1-distill-qwen-7b
    allowedCidrs             list/CSV      (required)      who may reach the API
    image                    string        built on box    a prebuilt service image instead (images/README.md)
    domain                   DNS name      none            HTTPS on 443 at this name (ACM + Route 53 + ALB)
    hostedZone               DNS name      domain's parent the Route 53 hosted zone holding `domain`
    engine                   vllm|sglang   vllm
    instanceType             string        planner's pick  override, e.g. g6e.xlarge
    nodes                    int 1..2      planner's pick  instances per replica (planner.MAX_NODES)
    replicas                 int 1..16     1               >1: load balancer + DynamoDB ledger
    context                  int           planner's pick  max context length in tokens
    availabilityZone         string        <region>a
    vpcId, subnetId          string        new VPC         deploy into an existing public subnet
    albSubnetIds             list/CSV      new VPC         two+ subnets in different AZs (replicas > 1)
    spot                     bool          false           spot instead of on-demand
    pricePromptPerMtok       int credits   1000000
    priceCompletionPerMtok   int credits   4000000
    initialCredits           int credits   1000000         credits of the generated ApiKey
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from r1nest.errors import ConfigError
from r1nest.planner import MAX_NODES  # one bound for the stack and the planner

NAMESPACE = "r1nest"
# The load balancer's listeners, with a domain: HTTPS, and plain HTTP only as a redirect to it.
HTTPS_PORT = 443
HTTP_PORT = 80

MAX_REPLICAS = 16
MAX_CIDRS = 50  # a security group holds at most 60 rules by default
MAX_CREDITS = 10**15

KNOWN_KEYS = (
    "model", "image", "allowedCidrs", "domain", "hostedZone", "engine", "instanceType", "nodes", "replicas",
    "context", "availabilityZone", "vpcId", "subnetId", "albSubnetIds", "spot", "pricePromptPerMtok",
    "priceCompletionPerMtok", "initialCredits",
)

_IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._/:@-]{0,254}$")
_VPC_RE = re.compile(r"^vpc-[0-9a-f]{8,17}$")
_SUBNET_RE = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_AZ_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d[a-z]$")
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")
_DNS_RE = re.compile(r"^(?=.{4,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


@dataclass(frozen=True)
class DeploymentArgs:
    """Everything the `r1nest:aws:Deployment` component needs; validated, typed, immutable."""

    model: str
    allowed_cidrs: tuple[str, ...]
    region: str
    availability_zone: str
    image: str | None = None  # None: build the service image on the instance from this checkout
    domain: str | None = None  # None: plain HTTP on the gateway port
    hosted_zone: str | None = None  # set whenever domain is
    engine: Literal["vllm", "sglang"] = "vllm"
    instance_type: str | None = None
    nodes: int | None = None
    replicas: int = 1
    context: int | None = None
    vpc_id: str | None = None
    subnet_id: str | None = None
    alb_subnet_ids: tuple[str, ...] = ()
    spot: bool = False
    price_prompt_per_mtok: int = 1_000_000
    price_completion_per_mtok: int = 4_000_000
    initial_credits: int = 1_000_000

    @property
    def new_vpc(self) -> bool:
        return self.vpc_id is None

    @property
    def load_balanced(self) -> bool:
        """An Application Load Balancer in front: several replicas, or HTTPS (it holds the certificate)."""
        return self.replicas > 1 or self.domain is not None


def _set_hint(key: str, example: str) -> str:
    return f"`pulumi config set {NAMESPACE}:{key} {example}`"


def _int(values: Mapping[str, str], key: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = values.get(key)
    if raw is None or str(raw).strip() == "":
        return default
    try:
        number = int(str(raw).strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"{NAMESPACE}:{key} must be a whole number, not {raw!r}") from None
    if not lo <= number <= hi:
        raise ConfigError(f"{NAMESPACE}:{key} must be between {lo} and {hi}, not {number}")
    return number


def _bool(values: Mapping[str, str], key: str, default: bool) -> bool:
    raw = values.get(key)
    if raw is None or str(raw).strip() == "":
        return default
    text = str(raw).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ConfigError(f"{NAMESPACE}:{key} must be true or false, not {raw!r}")


def _list(values: Mapping[str, str], key: str) -> tuple[str, ...]:
    """A JSON list (`pulumi config set --path`) or a comma-separated string."""
    raw = values.get(key)
    if raw is None:
        return ()
    if isinstance(raw, (list, tuple)):
        items = [str(x) for x in raw]
    else:
        text = str(raw).strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(f"{NAMESPACE}:{key} is not a valid JSON list: {text!r}") from None
            if not isinstance(parsed, list):
                raise ConfigError(f"{NAMESPACE}:{key} must be a list")
            items = [str(x) for x in parsed]
        else:
            items = text.split(",")
    return tuple(item.strip() for item in items if item.strip())


def _cidrs(values: Mapping[str, str]) -> tuple[str, ...]:
    cidrs = _list(values, "allowedCidrs")
    if not cidrs:
        raise ConfigError(
            f"{NAMESPACE}:allowedCidrs is not set: say who may call the API, e.g. "
            f"{_set_hint('allowedCidrs', '203.0.113.7/32')} (your address), or 0.0.0.0/0 to open "
            "the gateway port to the whole internet"
        )
    if len(cidrs) > MAX_CIDRS:
        raise ConfigError(f"{NAMESPACE}:allowedCidrs holds at most {MAX_CIDRS} entries, not {len(cidrs)}")
    normalised = []
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            raise ConfigError(f"{NAMESPACE}:allowedCidrs: {cidr!r} is not a CIDR block ({exc})") from None
        if network.version != 4:
            raise ConfigError(f"{NAMESPACE}:allowedCidrs: only IPv4 blocks are supported, not {cidr!r}")
        normalised.append(str(network))
    return tuple(dict.fromkeys(normalised))


def _domain(values: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(domain, hosted zone): the zone defaults to the domain's parent (api.example.com ->
    example.com), or the domain itself when it has two labels (example.com)."""
    domain = (values.get("domain") or "").strip().lower().rstrip(".") or None
    zone = (values.get("hostedZone") or "").strip().lower().rstrip(".") or None
    if domain is None:
        if zone is not None:
            raise ConfigError(f"{NAMESPACE}:hostedZone only applies with {NAMESPACE}:domain")
        return None, None
    if not _DNS_RE.match(domain):
        raise ConfigError(f"{NAMESPACE}:domain {domain!r} is not a DNS name such as api.example.com")
    if zone is None:
        labels = domain.split(".")
        zone = domain if len(labels) <= 2 else ".".join(labels[1:])
    if not _DNS_RE.match(zone) or not (domain == zone or domain.endswith("." + zone)):
        raise ConfigError(
            f"{NAMESPACE}:hostedZone {zone!r} does not hold {domain!r}: set it to the Route 53 hosted zone "
            f"the name lives in, e.g. {_set_hint('hostedZone', 'example.com')}"
        )
    return domain, zone


def parse_config(values: Mapping[str, str], *, region: str | None) -> DeploymentArgs:
    """`values`: the `r1nest:*` configuration without the namespace; `region`: `aws:region`."""
    _refuse_unknown_keys(values)
    region = _region(region)
    model = _model(values)
    image = _image(values)
    domain, hosted_zone = _domain(values)
    engine = _engine(values)
    instance_type = (values.get("instanceType") or "").strip().lower() or None
    availability_zone = _availability_zone(values, region)
    alb_subnet_ids = _list(values, "albSubnetIds")
    replicas = _int(values, "replicas", 1, 1, MAX_REPLICAS)
    assert replicas is not None
    vpc_id, subnet_id = _existing_network(values, alb_subnet_ids, replicas=replicas, https=domain is not None)
    return DeploymentArgs(
        model=model,
        image=image,
        domain=domain,
        hosted_zone=hosted_zone,
        allowed_cidrs=_cidrs(values),
        region=region,
        availability_zone=availability_zone,
        engine=engine,  # type: ignore[arg-type]
        instance_type=instance_type,
        nodes=_int(values, "nodes", None, 1, MAX_NODES),
        replicas=replicas,
        context=_int(values, "context", None, 1024, 10_000_000),
        vpc_id=vpc_id,
        subnet_id=subnet_id,
        alb_subnet_ids=alb_subnet_ids,
        spot=_bool(values, "spot", False),
        price_prompt_per_mtok=_int(values, "pricePromptPerMtok", 1_000_000, 0, MAX_CREDITS),  # type: ignore[arg-type]
        price_completion_per_mtok=_int(values, "priceCompletionPerMtok", 4_000_000, 0, MAX_CREDITS),  # type: ignore[arg-type]
        initial_credits=_int(values, "initialCredits", 1_000_000, 0, MAX_CREDITS),  # type: ignore[arg-type]
    )


def _refuse_unknown_keys(values: Mapping[str, str]) -> None:
    unknown = sorted(set(values) - set(KNOWN_KEYS))
    if unknown:
        lower = {k.lower(): k for k in KNOWN_KEYS}
        hints = [f"{k} (did you mean {lower[k.lower()]}?)" if k.lower() in lower else k for k in unknown]
        raise ConfigError(
            f"unknown configuration key(s) {', '.join(f'{NAMESPACE}:' + h for h in hints)}; "
            f"known keys: {', '.join(KNOWN_KEYS)}"
        )


def _region(region: str | None) -> str:
    if not region or not _REGION_RE.match(region.strip()):
        raise ConfigError("aws:region is not set or not a region name: `pulumi config set aws:region us-east-1`")
    return region.strip()


def _model(values: Mapping[str, str]) -> str:
    model = (values.get("model") or "").strip()
    if not model:
        raise ConfigError(f"{NAMESPACE}:model is not set: {_set_hint('model', 'deepseek-r1-distill-qwen-7b')} "
                          "(`r1nest plan --cloud aws --model ID` shows what each model needs)")
    return model


def _image(values: Mapping[str, str]) -> str | None:
    image = (values.get("image") or "").strip() or None
    if image is not None and not _IMAGE_RE.match(image):
        raise ConfigError(f"{NAMESPACE}:image {image!r} is not an image reference")
    return image


def _engine(values: Mapping[str, str]) -> str:
    engine = (values.get("engine") or "vllm").strip().lower()
    if engine not in ("vllm", "sglang"):
        raise ConfigError(f"{NAMESPACE}:engine must be vllm or sglang, not {engine!r}")
    return engine


def _availability_zone(values: Mapping[str, str], region: str) -> str:
    availability_zone = (values.get("availabilityZone") or "").strip() or f"{region}a"
    if not _AZ_RE.match(availability_zone) or not availability_zone.startswith(region):
        raise ConfigError(
            f"{NAMESPACE}:availabilityZone {availability_zone!r} is not a zone of {region} (e.g. {region}a)"
        )
    return availability_zone


def _existing_network(values: Mapping[str, str], alb_subnet_ids: tuple[str, ...], *, replicas: int,
                      https: bool) -> tuple[str | None, str | None]:
    """(vpc id, subnet id) of an existing network, or (None, None) for a new VPC. A load balancer
    (replicas > 1, or HTTPS) in an existing VPC needs `alb_subnet_ids` in two zones."""
    vpc_id = (values.get("vpcId") or "").strip() or None
    subnet_id = (values.get("subnetId") or "").strip() or None
    if (vpc_id is None) != (subnet_id is None):
        raise ConfigError(
            f"set both {NAMESPACE}:vpcId and {NAMESPACE}:subnetId to use an existing network, "
            "or neither to create a new VPC"
        )
    if vpc_id is not None and not _VPC_RE.match(vpc_id):
        raise ConfigError(f"{NAMESPACE}:vpcId {vpc_id!r} is not a VPC id (vpc-...)")
    for subnet in ((subnet_id,) if subnet_id else ()) + alb_subnet_ids:
        if not _SUBNET_RE.match(subnet):
            raise ConfigError(f"{subnet!r} is not a subnet id (subnet-...)")
    if alb_subnet_ids and vpc_id is None:
        raise ConfigError(f"{NAMESPACE}:albSubnetIds only applies with {NAMESPACE}:vpcId and subnetId")
    if vpc_id is not None and (replicas > 1 or https) and len(alb_subnet_ids) < 2:
        why = f"{NAMESPACE}:replicas > 1" if replicas > 1 else f"HTTPS ({NAMESPACE}:domain)"
        raise ConfigError(
            f"{why} in an existing VPC needs a load balancer in two availability "
            f"zones: {_set_hint('albSubnetIds', 'subnet-aaaa...,subnet-bbbb...')}"
        )
    return vpc_id, subnet_id
