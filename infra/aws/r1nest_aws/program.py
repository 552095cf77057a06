"""The program body: configuration in, one `Deployment`, stack outputs out.

A configuration or planning mistake stops `pulumi up` with one line that says what to set
(`pulumi.RunError` is printed without a stack trace).
"""

from __future__ import annotations

import pulumi

from r1nest_aws.config import NAMESPACE, parse_config
from r1nest_aws.deployment import Deployment

SECRET_OUTPUTS = ("api_key", "admin_key")


def stack_config() -> dict[str, str]:
    """Every `r1nest:*` value of the stack, without the namespace (unknown keys included, so
    that a typo is reported instead of silently ignored)."""
    from pulumi.runtime.config import CONFIG, get_config_env

    values: dict[str, str] = {}
    for source in (get_config_env(), CONFIG.get()):
        for key, value in source.items():
            namespace, _, name = key.partition(":")
            if namespace == NAMESPACE and name:
                values[name] = value
    return values


def run() -> Deployment:
    from r1nest.errors import R1nestError

    try:
        args = parse_config(stack_config(), region=pulumi.Config("aws").get("region"))
        deployment = Deployment("r1nest", args)
    except R1nestError as exc:
        raise pulumi.RunError(str(exc)) from None
    for name, value in deployment.outputs.items():
        pulumi.export(name, pulumi.Output.secret(value) if name in SECRET_OUTPUTS else value)
    return deployment
