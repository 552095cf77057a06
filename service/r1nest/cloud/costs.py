"""What each model costs per hour on AWS, straight from the planner (the README's table).

    python -m r1nest.cloud.costs      # prints the Markdown table README.md carries

tests/infra/aws/test_aws_readme.py fails when the README's table and the planner disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

# Plans shown besides each model's default: (model, instance type, nodes).
EXTRA_PLANS = (("deepseek-r1", "p5.48xlarge", 2),)


@dataclass(frozen=True)
class CostRow:
    model: str
    instance_type: str
    nodes: int
    gpus: str
    context: int
    cost_microusd_per_hour: int


def aws_cost_rows() -> list[CostRow]:
    from r1nest.catalog import MODELS
    from r1nest.planner import plan

    wanted = [(model, None, None) for model in MODELS] + list(EXTRA_PLANS)
    rows = []
    for model, instance_type, nodes in wanted:
        chosen = plan(model, "aws", instance_type=instance_type, nodes=nodes)
        rows.append(CostRow(model, str(chosen.instance_type), chosen.nodes,
                            f"{chosen.nodes * chosen.gpus_per_node}x {chosen.gpu}", chosen.context,
                            chosen.cost_microusd_per_hour))
    return rows


def _usd(microusd: int) -> str:
    cents = (microusd + 5_000) // 10_000  # to the nearest cent, in integers
    return f"${cents // 100:,}.{cents % 100:02d}"


def markdown_table() -> str:
    lines = [
        "| model (`r1nest:model`) | instance type | nodes | GPUs | context (tokens) | on-demand $/hour |",
        "|---|---|---:|---|---:|---:|",
    ]
    for row in aws_cost_rows():
        lines.append(f"| `{row.model}` | `{row.instance_type}` | {row.nodes} | {row.gpus} | "
                     f"{row.context:,} | {_usd(row.cost_microusd_per_hour)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
