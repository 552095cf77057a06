"""The README's AWS section says what the code does: its cost table is the planner's, and the
stack outputs it tells users to open with `r1nest overview` really render the page."""

from __future__ import annotations

import re

from r1nest.cloud.costs import markdown_table
from r1nest.paths import REPO_ROOT


def readme_cost_table() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- aws-costs:begin -->\n(.*?)<!-- aws-costs:end -->", text, re.S)
    assert match, "README.md lacks the aws-costs markers"
    return match.group(1)


def test_readme_cost_table_is_the_planners():
    assert readme_cost_table() == markdown_table(), (
        "README's AWS cost table is out of date: paste `python -m r1nest.cloud.costs` between the markers")


def test_the_cost_check_would_catch_a_changed_price(monkeypatch):
    from r1nest import hardware

    changed = hardware.AWS_INSTANCE_TYPES["g6.xlarge"].__class__(
        **{**hardware.AWS_INSTANCE_TYPES["g6.xlarge"].__dict__, "price_microusd_per_hour": 999_000_000})
    monkeypatch.setitem(hardware.AWS_INSTANCE_TYPES, "g6.xlarge", changed)
    assert readme_cost_table() != markdown_table()


def test_readme_deploy_commands_use_the_real_config_keys():
    from r1nest_aws.config import KNOWN_KEYS

    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Deploy to AWS")
    end = text.find("\n## ", start + 1)
    section = text[start:] if end < 0 else text[start:end]
    used = set(re.findall(r"(?<![/\w])r1nest:([A-Za-z]+)", section)) - {"aws", "deployment"}
    assert used and used <= set(KNOWN_KEYS), used - set(KNOWN_KEYS)
    assert "pulumi up" in section and "pulumi destroy" in section and "r1nest overview --from pulumi" in section


def test_stack_outputs_render_the_overview_page(run_stack):
    from r1nest.overview.render import render_overview
    from r1nest.overview.sources import from_pulumi_outputs

    run = run_stack()
    ctx = from_pulumi_outputs(run.outputs)
    page = render_overview(ctx)
    assert run.outputs["public_endpoint"] in page and run.outputs["internal_endpoint"] in page
    assert ctx.api_key == run.outputs["api_key"] and ctx.model == "deepseek-r1-distill-qwen-7b"
    # without a domain the page says the endpoint is plain HTTP, and who can reach it
    assert 'id="unencrypted-notice"' in page and "<code>203.0.113.0/24</code>" in page


def test_with_a_domain_the_page_and_its_examples_use_https(run_stack):
    from r1nest.overview.render import render_overview
    from r1nest.overview.sources import from_pulumi_outputs

    run = run_stack(domain="api.example.com")
    page = render_overview(from_pulumi_outputs(run.outputs))
    assert "https://api.example.com/v1" in page and "unencrypted-notice" not in page
    assert 'base_url="https://api.example.com/v1"' in page or "https://api.example.com/v1/chat/completions" in page
    assert "http://198.51.100." not in page  # no plain-HTTP public address anywhere on it


def _aws_section() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Deploy to AWS")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_readme_deploys_with_three_settings_and_nothing_to_build():
    section = _aws_section()
    block = section[section.index("```bash"):]
    block = block[: block.index("```", 7)]
    settings = re.findall(r"pulumi config set (\S+)", block)
    assert settings == ["aws:region", "r1nest:model", "r1nest:allowedCidrs"]
    assert "docker build" not in block and "docker push" not in block and "pulumi up" in block
    # the optional paths and the facts a user plans around are all there
    for needed in ("pulumi config set r1nest:domain", "pulumi config set r1nest:image", "https://api.example.com/v1",
                   "first boot", "pulumi destroy", "ELBSecurityPolicy-TLS13-1-2-2021-06", "aws-costs:begin"):
        assert needed in section, needed
