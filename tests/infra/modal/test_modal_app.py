"""The Modal app, built offline: it imports with only `modal`, and what it asks Modal for is the plan."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("modal")

from r1nest.catalog import MODELS  # noqa: E402
from r1nest.engines.base import engine_argv  # noqa: E402
from r1nest.hardware import parse_gpu_string  # noqa: E402
from r1nest.planner import plan  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
APP_FILE = REPO / "infra" / "modal" / "app.py"


def load_app(monkeypatch: pytest.MonkeyPatch, model: str, engine: str = "vllm"):
    monkeypatch.setenv("R1NEST_MODEL", model)
    monkeypatch.setenv("R1NEST_ENGINE", engine)
    name = f"r1nest_modal_app_{re.sub(r'[^a-z0-9]', '_', model)}_{engine}"
    spec = importlib.util.spec_from_file_location(name, APP_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ONLY_MODAL = r"""
import importlib.abc, sys
REPO_SERVICE = sys.argv[2]
BLOCKED = {"torch", "vllm", "sglang", "boto3", "botocore", "pydantic", "pydantic_settings", "starlette",
           "uvicorn", "httpx", "jinja2", "openai", "huggingface_hub", "numpy", "transformers"}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed (blocked by the test)")
        return None

# r1nest is not installed either: drop the editable install's path entry and finders
sys.path[:] = [p for p in sys.path if p.rstrip("/") != REPO_SERVICE]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
sys.meta_path.insert(0, Blocker())
import importlib.util
spec = importlib.util.spec_from_file_location("app", sys.argv[1])
app = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app)
import r1nest
loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
print("RESULT " + __import__("json").dumps({"gpu": app.GPU, "r1nest": r1nest.__file__, "loaded": loaded}))
"""


def test_the_app_imports_with_only_modal_installed() -> None:
    done = subprocess.run(
        [sys.executable, "-c", ONLY_MODAL, str(APP_FILE), str(REPO / "service")],
        capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["loaded"] == []
    assert result["r1nest"].startswith(str(REPO / "service"))  # found beside the file
    assert result["gpu"] == plan("deepseek-r1", "modal").modal_gpu == "H200:8"


@pytest.mark.parametrize("model", sorted(MODELS))
def test_function_matches_the_plan_for_every_catalog_model(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_app(monkeypatch, model)
    expected = plan(model, "modal")
    assert module.PLAN == expected
    info = module.serve.info()
    gpu_name, gpu_count = parse_gpu_string(expected.modal_gpu)
    assert info.gpus == [(gpu_name, gpu_count)]
    assert {path: v.name for path, v in info.volumes.items()} == {"/data": "r1nest-weights"}
    assert sorted(info.secrets) == sorted(["modal.Secret.from_name('r1nest-keys')",
                                           "modal.Secret.from_name('r1nest-ledger')"])
    assert info.concurrency_info.max_inputs == expected.max_concurrency
    assert info.timeout == module.REQUEST_TIMEOUT_S >= 30 * 60  # the gateway's longest stream
    from modal._utils.async_utils import synchronizer

    # the @modal.web_server settings, as they will be sent to Modal (kept on the unwrapped Function)
    web = synchronizer._translate_in(module.serve)._webhook_config
    assert web.web_server_port == 8000
    assert web.web_server_startup_timeout == module.STARTUP_TIMEOUT_S
    # startup is sized from the weights: R1's 0.69 TB need far longer than a 1.5B distill
    from r1nest.engines.launcher import estimate_startup_s

    assert module.STARTUP_TIMEOUT_S >= estimate_startup_s(MODELS[model].weight_bytes, expected.hardware_class)
    assert 2 <= module.SCALEDOWN_WINDOW_S <= 3600 and module.MIN_CONTAINERS == 0
    download = module.download_weights.info()
    assert download.gpus == [] and list(download.volumes) == ["/data"]


def test_r1_and_a_distill_get_the_gpus_the_planner_names(monkeypatch: pytest.MonkeyPatch) -> None:
    r1 = load_app(monkeypatch, "deepseek-r1")
    small = load_app(monkeypatch, "deepseek-r1-distill-qwen-1.5b")
    assert r1.GPU == "H200:8"
    assert r1.STARTUP_TIMEOUT_S > small.STARTUP_TIMEOUT_S


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_the_container_runs_doctor_then_the_engine_profile_then_the_gateway(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from r1nest.gateway.cli import gateway

    module = load_app(monkeypatch, "deepseek-r1", engine)
    doctor, engine_cmd, gateway_cmd = module.container_commands(module.PLAN)
    assert doctor == ["r1nest", "doctor", "--model", "deepseek-r1", "--engine", engine, "--json"]
    assert engine_cmd == engine_argv(module.PLAN.profile, host="127.0.0.1", port=8100, python="python3",
                                     secrets_dir="/run/r1nest")
    assert gateway_cmd[:2] == ["r1nest", "gateway"]
    params = gateway.make_context("gateway", gateway_cmd[2:]).params
    assert params["upstream_url"] == "http://127.0.0.1:8100"
    assert params["served_model"] == module.PLAN.profile.served_model_name == "deepseek-r1"
    assert params["port"] == 8000 and params["upstream_key"] is None  # the key travels in the env
    assert not any("key" in arg.lower() and "=" in arg for arg in engine_cmd + gateway_cmd)


LEDGER_SECRETS = {
    "postgres": {"R1NEST_DATABASE_URL": "postgresql://r1nest:pw-in-the-secret@db.example.net:5432/ledger"},
    "dynamodb": {"R1NEST_DYNAMODB_TABLE": "r1nest-ledger", "R1NEST_AWS_REGION": "us-east-1",
                 "AWS_ACCESS_KEY_ID": "id-in-the-secret", "AWS_SECRET_ACCESS_KEY": "key-in-the-secret"},
}


@pytest.mark.parametrize("store", ["postgres", "dynamodb"])
def test_the_ledger_secret_picks_the_store_the_gateway_opens(
    store: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What `serve` hands the gateway: R1NEST_STORE from what the r1nest-ledger secret holds; the
    gateway's settings then open that store (built offline: nothing is contacted)."""
    from r1nest.ledger import open_store
    from r1nest.settings import load_settings

    module = load_app(monkeypatch, "deepseek-r1-distill-qwen-1.5b")
    secret = LEDGER_SECRETS[store]
    assert module.ledger_store(secret) == store
    for name in [n for n in os.environ if n.startswith(("R1NEST_", "AWS_"))]:
        monkeypatch.delenv(name)
    for name, value in {**secret, "R1NEST_STORE": module.ledger_store(secret), "R1NEST_DATA_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    opened = open_store(load_settings())
    assert type(opened).__name__ == {"postgres": "PostgresStore", "dynamodb": "DynamoStore"}[store]
    asyncio.run(opened.close())


def test_a_ledger_secret_naming_no_ledger_or_two_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_app(monkeypatch, "deepseek-r1-distill-qwen-1.5b")
    with pytest.raises(RuntimeError, match="needs R1NEST_DATABASE_URL"):
        module.ledger_store({"R1NEST_AWS_REGION": "us-east-1"})
    with pytest.raises(RuntimeError, match="not both"):
        module.ledger_store({**LEDGER_SECRETS["postgres"], **LEDGER_SECRETS["dynamodb"]})


def test_the_image_fixes_no_store_and_installs_both_ledger_drivers() -> None:
    text = APP_FILE.read_text()
    for block in re.findall(r"\.env\(\{(.*?)\}\)", text, flags=re.S):
        assert "R1NEST_STORE" not in block and "DATABASE_URL" not in block  # the secret decides
    assert re.search(r'"asyncpg==[0-9.]+"', text) and re.search(r'"boto3==[0-9.]+"', text)


def test_the_image_starts_from_the_same_pinned_bases_as_images(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_app(monkeypatch, "deepseek-r1")
    for engine, reference in module.BASE_IMAGES.items():
        dockerfile = (REPO / "images" / f"{engine}.Dockerfile").read_text()
        froms = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
        assert froms == [reference]


SECRET_PATTERNS = {
    "r1nest API key": re.compile(r"r1n-[0-9a-f]{12}-[A-Za-z0-9_-]{20,}"),
    "r1nest admin key": re.compile(r"r1nadmin-[0-9a-f]{12}-[A-Za-z0-9_-]{20,}"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),
    "Modal token": re.compile(r"\b(?:ak|as)-[A-Za-z0-9]{20,}\b"),
    "assigned secret": re.compile(r"(?i)(?:ADMIN_KEY|API_KEY|SECRET|TOKEN|PASSWORD)\s*[=:]\s*['\"][^'\"\s]{8,}['\"]"),
}


def secret_literals(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def test_no_secret_literal_in_the_app_file() -> None:
    from r1nest.keys import ADMIN_PREFIX, new_key

    text = APP_FILE.read_text()
    assert secret_literals(text) == []
    # the scan would catch one: plant each kind once
    for planted in (new_key()[1], new_key(ADMIN_PREFIX)[1], "AKIAIOSFODNN7EXAMPLE", 'R1NEST_ADMIN_KEY = "s3cr3t-admin-key-value"',
                    "hf_" + "a" * 34, "aws_secret_access_key=" + "A" * 40):
        assert secret_literals(text + "\n" + planted), planted
    # and nothing secret goes into the image's environment
    env_blocks = re.findall(r"\.env\(\{(.*?)\}\)", text, flags=re.S)
    assert env_blocks
    for block in env_blocks:
        assert not re.search(r'"[A-Z_]*(KEY|SECRET|TOKEN|PASSWORD)[A-Z_]*"\s*:', block), block


def test_the_container_side_import_plans_the_same(tmp_path: Path) -> None:
    """In the container the file sits alone at /root/app.py and r1nest is installed in the image."""
    shallow = Path("/tmp") / f"r1nest_modal_app_{tmp_path.name}.py"
    shallow.write_text(APP_FILE.read_text())
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import importlib.util, sys; s = importlib.util.spec_from_file_location('app', "
             "sys.argv[1]); m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print(m.GPU, m.MAX_INPUTS)",
             str(shallow)],
            capture_output=True, text=True, timeout=120, check=False,
            env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "R1NEST_MODEL": "deepseek-r1-distill-qwen-7b"},
        )
    finally:
        shallow.unlink()
    assert done.returncode == 0, done.stderr[-2000:]
    expected = plan("deepseek-r1-distill-qwen-7b", "modal")
    assert done.stdout.split() == [expected.modal_gpu, str(expected.max_concurrency)]


class FakeProcess:
    def __init__(self, exits_after_polls: int | None = None, returncode: int = 1) -> None:
        self.polls = 0
        self.exits_after_polls = exits_after_polls
        self.returncode: int | None = None
        self._code = returncode

    def poll(self) -> int | None:
        self.polls += 1
        if self.exits_after_polls is not None and self.polls > self.exits_after_polls:
            self.returncode = self._code
        return self.returncode


class Left(Exception):
    pass


def _leave(status: int) -> None:
    raise Left(status)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_container_leaves_when_the_engine_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_app(monkeypatch, "deepseek-r1-distill-qwen-1.5b")
    clock = Clock()
    engine = FakeProcess(exits_after_polls=3)
    with pytest.raises(Left):
        module._watch(engine, FakeProcess(), ready=lambda: True, leave=_leave, clock=clock, sleep=clock.sleep)
    assert engine.polls == 4


def test_the_container_leaves_when_the_engine_is_late_and_stays_once_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_app(monkeypatch, "deepseek-r1-distill-qwen-1.5b")
    clock = Clock()
    with pytest.raises(Left):
        module._watch(FakeProcess(), FakeProcess(), ready=lambda: False, leave=_leave, deadline_s=60,
                      poll_s=5, clock=clock, sleep=clock.sleep)
    assert 60 < clock.now <= 70

    clock = Clock()
    answers = iter([False, False, True])
    gateway = FakeProcess(exits_after_polls=100)  # ends the loop long after the deadline
    with pytest.raises(Left):
        module._watch(FakeProcess(), gateway, ready=lambda: next(answers), leave=_leave, deadline_s=60,
                      poll_s=5, clock=clock, sleep=clock.sleep)
    assert clock.now > 60  # ready in time: the deadline no longer applies
