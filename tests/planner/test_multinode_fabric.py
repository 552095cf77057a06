"""Multi-node plans fit the fabric between the nodes, and one bound limits the node count.

AWS p5/p5en instances talk over EFA, not InfiniBand. DeepEP's original inter-node kernels need
InfiniBand GPUDirect Async (IBGDA), which EFA does not provide, so no command line the planner
emits for AWS may select them (r1nest.engines.base.IBGDA_ONLY_ALL2ALL). The check runs over every
multi-node AWS plan: each model, engine, mode and EFA instance type, every node's argv.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from r1nest import planner
from r1nest.catalog import MODELS
from r1nest.engines.base import engine_argv, ibgda_only_backend
from r1nest.errors import ConfigError, PlanError
from r1nest.hardware import AWS_INSTANCE_TYPES


def aws_multinode_plans() -> list[tuple[str, planner.Plan]]:
    plans = []
    efa_types = [t.name for t in AWS_INSTANCE_TYPES.values() if t.efa_interfaces > 0]
    for model_id, spec in MODELS.items():
        if not spec.is_moe:
            continue
        for engine in ("vllm", "sglang"):
            for mode in ("latency", "throughput"):
                for instance_type in efa_types:
                    try:
                        p = planner.plan(model_id, "aws", engine=engine, mode=mode,  # type: ignore[arg-type]
                                         nodes=planner.MAX_NODES, instance_type=instance_type)
                    except PlanError:
                        continue
                    plans.append((f"{model_id}:{engine}:{mode}:{instance_type}", p))
    return plans


def all_argvs(p: planner.Plan) -> list[list[str]]:
    return [engine_argv(p.profile, host="127.0.0.1", port=8100, node_rank=rank, head_address="10.0.0.1",
                        python="python3", secrets_dir="/run/r1nest")
            for rank in range(p.nodes)]


def ibgda_violations(plans: list[tuple[str, planner.Plan]]) -> list[str]:
    return [f"{label} rank {rank}: {backend}"
            for label, p in plans
            for rank, argv in enumerate(all_argvs(p))
            if (backend := ibgda_only_backend(p.engine, argv))]


def test_no_aws_multinode_argv_uses_an_ibgda_only_all2all() -> None:
    plans = aws_multinode_plans()
    engines_modes = {(p.engine, p.mode) for _, p in plans}
    assert engines_modes == {("vllm", "latency"), ("vllm", "throughput"),
                             ("sglang", "latency"), ("sglang", "throughput")}, "the sweep lost a case"
    assert ibgda_violations(plans) == []
    for _, p in plans:
        assert p.nodes == planner.MAX_NODES and p.profile.fabric == "efa"
        if p.dp > 1:  # expert all-to-all between nodes: named, not left to the engine's default
            flag = "--all2all-backend" if p.engine == "vllm" else "--moe-a2a-backend"
            assert p.profile.flag_value(flag) in ("allgather_reducescatter", "none")


def test_the_check_catches_an_ibgda_backend_planted_on_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plan AWS as if it had InfiniBand: SGLang's DP attention then picks DeepEP, and the check says so."""
    monkeypatch.setitem(planner.CLOUD_FABRIC, "aws", "infiniband")
    violations = ibgda_violations(aws_multinode_plans())
    assert violations and all(v.endswith(": deepep") and ":sglang:throughput:" in v for v in violations)


def test_vllm_ibgda_backends_are_recognised_too() -> None:
    p = planner.plan("deepseek-r1", "aws", engine="vllm", mode="throughput", nodes=2, instance_type="p5.48xlarge")
    argv = all_argvs(p)[0]
    assert ibgda_only_backend("vllm", argv) is None
    i = argv.index("--all2all-backend")
    for planted in (argv[: i + 1] + ["deepep_low_latency"] + argv[i + 2:],
                    argv + ["--all2all-backend=deepep_high_throughput"]):
        assert ibgda_only_backend("vllm", planted) in ("deepep_low_latency", "deepep_high_throughput")


def test_an_infiniband_cluster_keeps_deepep_for_sglang() -> None:
    p = planner.plan("deepseek-r1", "local", engine="sglang", mode="throughput", nodes=2,
                     local_gpus="H200:8", fabric="infiniband")
    assert p.profile.flag_value("--moe-a2a-backend") == "deepep"
    unknown = planner.plan("deepseek-r1", "local", engine="sglang", mode="throughput", nodes=2, local_gpus="H200:8")
    assert unknown.profile.flag_value("--moe-a2a-backend") == "none"  # not known to be InfiniBand


def test_aws_is_efa_whatever_the_caller_says() -> None:
    with pytest.raises(ConfigError, match="aws nodes talk over efa"):
        planner.plan("deepseek-r1", "aws", nodes=2, fabric="infiniband")
    with pytest.raises(ConfigError, match="unknown fabric"):
        planner.plan("deepseek-r1", "local", nodes=2, local_gpus="H200:8", fabric="roce")  # type: ignore[arg-type]


def test_nodes_beyond_max_nodes_are_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=f"nodes must be 1..{planner.MAX_NODES}"):
        planner.plan("deepseek-r1", "aws", nodes=planner.MAX_NODES + 1)
    from r1nest.planner_cli import plan as plan_cli

    result = CliRunner().invoke(plan_cli, ["--model", "deepseek-r1", "--cloud", "aws",
                                           "--nodes", str(planner.MAX_NODES + 1)])
    assert result.exit_code == 2 and f"1<=x<={planner.MAX_NODES}" in result.output
    from r1nest.doctor import doctor

    result = CliRunner().invoke(doctor, ["--model", "deepseek-r1", "--nodes", str(planner.MAX_NODES + 1)])
    assert result.exit_code == 2 and f"1<=x<={planner.MAX_NODES}" in result.output
