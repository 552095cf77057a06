"""`r1nest plan`: print the planner's choice as a table or JSON; refusals exit non-zero."""

from __future__ import annotations

import json
import shlex
from typing import Any

import click

from r1nest.engines.base import EngineName, Mode
from r1nest.hardware import HARDWARE_CLASSES, HardwareClass, format_usd_per_hour
from r1nest.planner import MAX_NODES, Cloud


@click.command("plan")
@click.option("--model", "model_id", required=True, help="Catalog id (see docs/models.md) or a checkpoint directory.")
@click.option("--cloud", type=click.Choice(["aws", "modal", "local"]), required=True)
@click.option("--context", type=click.IntRange(1, 1_048_576), default=None,
              help="Tokens per sequence (prompt + output). Default: the model's default.")
@click.option("--concurrency", type=click.IntRange(1, 100_000), default=1, show_default=True,
              help="Sequences of --context tokens to hold at once.")
@click.option("--engine", type=click.Choice(["vllm", "sglang"]), default="vllm", show_default=True)
@click.option("--instance-type", default=None, help="AWS instance type, or a Modal GPU string such as H200:8.")
@click.option("--nodes", type=click.IntRange(1, MAX_NODES), default=None,
              help=f"Nodes per replica (1..{MAX_NODES}); multi-node for the R1 family only.")
@click.option("--hardware-class", type=click.Choice(HARDWARE_CLASSES), default=None)
@click.option("--mode", type=click.Choice(["latency", "throughput"]), default=None,
              help="R1: TP + MTP for latency, DP attention + EP for throughput. Default: cheapest.")
@click.option("--gpus", "local_gpus", default=None, help="Local GPUs for --cloud local, e.g. H100:8.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(
    model_id: str, cloud: Cloud, context: int | None, concurrency: int, engine: EngineName,
    instance_type: str | None, nodes: int | None, hardware_class: HardwareClass | None, mode: Mode | None,
    local_gpus: str | None, as_json: bool,
) -> None:
    """Pick hardware and the engine launch for a model, or say why nothing fits."""
    from r1nest.planner import plan as make_plan

    result = make_plan(
        model_id, cloud,
        context=context, concurrency=concurrency, engine=engine,
        instance_type=instance_type, nodes=nodes, hardware_class=hardware_class,
        mode=mode, local_gpus=local_gpus,
    )
    data = result.to_json()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    _print_table(data)


def _print_table(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    par = data["parallelism"]
    rows = [
        ("model", data["model"]),
        ("cloud / engine", f"{data['cloud']} / {data['engine']}"),
        ("hardware", _hardware(data)),
        ("parallelism", f"TP {par['tp']} · PP {par['pp']} · DP {par['dp']} · EP {par['ep']} ({data['mode']})"),
        ("context", f"{data['context']:,} tokens"),
        ("KV cache", f"{data['kv_cache_dtype']}, {data['kv_bytes_per_token']:,} B/token, "
                     f"{data['kv_capacity_tokens']:,} tokens"),
        ("max concurrency", f"{data['max_concurrency']:,} sequences of {data['context']:,} tokens "
                            f"(asked: {data['concurrency']:,})"),
        ("weights per GPU", f"{data['weight_bytes_per_gpu'] / 2**30:,.1f} GiB"),
        ("cost", format_usd_per_hour(data["cost_microusd_per_hour"]) + " (list price, estimate)"),
        ("root volume", f"{data['root_volume_gib']:,} GiB per node"),
        ("weights revision", data.get("revision") or "-"),
        ("engine env", " ".join(f"{k}={v}" for k, v in data["engine_env"].items()) or "-"),
        ("engine command", shlex.join(data["engine_argv"])),
    ]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    for note in data["notes"]:
        table.add_row("note", note)
    Console(width=120, soft_wrap=False).print(table)


def _hardware(data: dict[str, Any]) -> str:
    if data["gpu"] is None:
        return "CPU (vLLM CPU build)"
    where = data["instance_type"] or data["modal_gpu"] or "local"
    per_node = f"{data['gpus_per_node']}x {data['gpu']}"
    return f"{data['nodes']} x {where} ({per_node} each)" if data["nodes"] > 1 else f"{where} ({per_node})"
