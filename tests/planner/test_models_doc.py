"""docs/models.md shows what the code does: its catalog and default-plan tables match."""

from __future__ import annotations

from r1nest.catalog import MODELS
from r1nest.paths import REPO_ROOT
from r1nest.planner import plan

DOC = (REPO_ROOT / "docs" / "models.md").read_text(encoding="utf-8")


def _rows(first_cell: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in DOC.splitlines()
        if line.startswith(f"| {first_cell} |")
    ]


def test_default_plan_table_matches_the_planner() -> None:
    for model_id in MODELS:
        rows = {row[1]: row for row in _rows(f"`{model_id}`") if row[1] in ("aws", "modal")}
        assert set(rows) == {"aws", "modal"}, model_id
        for cloud, row in rows.items():
            p = plan(model_id, cloud)  # type: ignore[arg-type]
            assert row[2] == p.hardware, (model_id, cloud)
            assert row[3].startswith(f"{p.tp} / {p.pp} / {p.dp} / {p.ep}"), (model_id, cloud)
            assert row[-1] == f"{p.cost_usd_per_hour:,.2f}", (model_id, cloud)


def test_catalog_table_matches_the_catalog() -> None:
    for model_id, spec in MODELS.items():
        row = next(r for r in _rows(f"`{model_id}`") if len(r) == 9)
        assert spec.hf_repo in row[1]
        bf16, fp8 = (int(x.replace(",", "")) for x in row[5].split(" / "))
        assert (bf16, fp8) == (spec.kv_bytes_per_token("bf16"), spec.kv_bytes_per_token("fp8"))
        assert row[6] == f"{spec.native_context:,}"


def test_weights_revision_table_matches_the_catalog() -> None:
    for model_id, spec in MODELS.items():
        row = next(r for r in _rows(f"`{model_id}`") if len(r) == 2)
        if spec.revision_pinned:
            assert f"`{spec.revision}`" in row[1] and f"/commit/{spec.revision}" in row[1], model_id
        else:
            assert row[1].startswith("unpinned"), model_id
            assert f"**`{model_id}` is unpinned.**" in DOC  # the reason is written down


def test_the_aws_multinode_sources_are_cited() -> None:
    for url in ("https://github.com/deepseek-ai/DeepEP/issues/369",
                "https://github.com/vllm-project/vllm/issues/27898",
                "https://github.com/vllm-project/vllm/pull/41183"):
        assert url in DOC, url
