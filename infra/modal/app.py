# ---
# cmd: ["modal", "deploy", "infra/modal/app.py"]
# ---

# # DeepSeek-R1 as your own metered API, on Modal

# This file deploys r1nest on [Modal](https://modal.com): the same service that `r1nest serve`
# runs on one machine and that `pulumi up` runs on AWS. Clients get one HTTPS endpoint that speaks
# OpenAI's chat API, returns DeepSeek's `reasoning_content`, authenticates API keys
# (`Authorization: Bearer` or `x-api-key`), and charges credits reported in `x-remaining-credits`.
# Idle, it scales to zero GPUs.

# ```bash
# modal deploy infra/modal/app.py                                      # DeepSeek-R1 on H200:8
# R1NEST_MODEL=deepseek-r1-distill-qwen-7b modal deploy infra/modal/app.py   # a distill on one GPU
# ```

# The README's "Deploy on Modal" section lists the secrets to create first and what a cold start
# costs. This file imports with only `modal` installed: everything heavy is imported inside the
# functions that run in the cloud.

import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import modal

# ## Which model, which engine, which GPUs: the planner decides

# The model and engine come from the environment of `modal deploy` (the same `R1NEST_MODEL` and
# `R1NEST_ENGINE` the rest of r1nest reads), or from the defaults below.

MODEL = os.environ.get("R1NEST_MODEL", "deepseek-r1")
ENGINE = os.environ.get("R1NEST_ENGINE", "vllm")
if ENGINE not in ("vllm", "sglang"):
    raise RuntimeError(f"R1NEST_ENGINE must be vllm or sglang, not {ENGINE!r}")
CONTEXT_TOKENS = None  # None: the catalog's default context for the model; or e.g. 32_768
APP_NAME = "r1nest"  # `r1nest overview --modal-app r1nest` finds the deployment by this name

# Everything else (the GPU string, parallelism, the engine's flags, how many requests one
# container holds) comes from r1nest's planner, the same pure function behind `r1nest plan`.
# The planner is plain Python (no third-party imports), so this file imports it straight from the
# repository's `service/` directory beside `infra/` when r1nest is not installed: `modal deploy`
# always runs from a checkout. Inside the container r1nest is installed in the image, and the
# image's environment carries `R1NEST_MODEL` / `R1NEST_ENGINE`, so the container computes the very
# same plan when Modal imports this file there.

HERE = Path(__file__).resolve()
REPO_ROOT = HERE.parents[2] if len(HERE.parents) > 2 else HERE.parent  # in the container: /root
try:
    from r1nest import planner
except ImportError:
    sys.path.insert(0, str(REPO_ROOT / "service"))
    from r1nest import planner

from r1nest.catalog import resolve_model  # noqa: E402  (plain Python too)
from r1nest.engines.launcher import estimate_startup_s  # noqa: E402
from r1nest.ports import ENGINE_PORT, GATEWAY_PORT  # noqa: E402

PLAN = planner.plan(MODEL, "modal", engine="sglang" if ENGINE == "sglang" else "vllm", context=CONTEXT_TOKENS)
if PLAN.nodes != 1:
    raise RuntimeError(f"the plan for {MODEL} needs {PLAN.nodes} nodes; a Modal container has at most 8 GPUs")

# For DeepSeek-R1 that is `H200:8`: ~0.69 TB of FP8 weights do not fit 8 x H100 (640 GB). For
# the 7B distill it is one `L4`. `r1nest plan --model ID --cloud modal` prints the full plan.

GPU = PLAN.modal_gpu
MAX_INPUTS = PLAN.max_concurrency  # concurrent requests one container serves (KV-cache bound)

# ## Timing

MINUTES = 60  # seconds
WEIGHT_BYTES = resolve_model(MODEL).weight_bytes

# How long a container may take to come up. The engine loads the weights from the Volume; the
# estimate is r1nest's own (a fixed start-up cost plus the weights at ~1.5 GB/s), doubled for
# Modal's network-backed Volumes and JIT compilation. While the engine warms, the gateway already
# answers: 503 with `Retry-After`, and `/health` says `warming` with an ETA.
STARTUP_TIMEOUT_S = int(2 * estimate_startup_s(WEIGHT_BYTES, PLAN.hardware_class)) + 5 * MINUTES

# The longest request: a stream may last as long as the gateway allows (`stream_timeout_s`).
REQUEST_TIMEOUT_S = 35 * MINUTES

# How long an idle container stays up. A cold start of R1 is ten minutes or more of GPU time, so
# an idle container waits twice the start-up budget before it goes (10 minutes at least; Modal
# allows one hour at most).
SCALEDOWN_WINDOW_S = min(60 * MINUTES, max(10 * MINUTES, 2 * STARTUP_TIMEOUT_S))

# Containers kept running when there is no traffic. 0 scales to zero: nothing is billed while
# idle, and the first request after a quiet period waits for a cold start (minutes for R1, under
# one for the small distills). 1 removes the wait for one container's worth of traffic and bills
# its GPUs around the clock (`PLAN.cost_usd_per_hour`, e.g. ~$36/h for H200:8).
MIN_CONTAINERS = 0

# The gateway listens on r1nest's GATEWAY_PORT, the only port Modal exposes; the engine on
# ENGINE_PORT, loopback only, with its own random key.

# ## The container image: the same one as `images/`

# The image starts from the engine project's official image, pinned by tag and digest, exactly
# the `FROM` line of `images/vllm.Dockerfile` / `images/sglang.Dockerfile` (a test keeps them
# equal), and installs r1nest the same way: the repository under `/opt/r1nest`, editable, so its
# `templates/` sit beside the package. The EFA layer of those images is left out: Modal has no
# EFA, and one container is one node. Modal runs containers in its own sandbox, as root.

BASE_IMAGES = {
    "vllm": "vllm/vllm-openai:v0.30.0@sha256:8a69ffad015f138d7170c4ddc429e230a3bc1c1719f67e14324749df200a4b90",
    "sglang": "lmsysorg/sglang:v0.5.20@sha256:06e4f2ed21afde4ff513cda65070124e727ba23ccaeff7712b8c40e1097d611f",
}
R1NEST_DIR = "/opt/r1nest"
HF_HOME = "/data/hf"  # on the weights Volume

serve_image = (
    modal.Image.from_registry(BASE_IMAGES[ENGINE])
    .entrypoint([])  # the vLLM image's entrypoint is `vllm serve`; Modal starts its own
    .run_commands('ln -sf "$(command -v python3)" /usr/local/bin/python')
    .add_local_file(REPO_ROOT / "pyproject.toml", f"{R1NEST_DIR}/pyproject.toml", copy=True)
    .add_local_file(REPO_ROOT / "README.md", f"{R1NEST_DIR}/README.md", copy=True)
    .add_local_dir(REPO_ROOT / "service", f"{R1NEST_DIR}/service", copy=True,
                   ignore=["**/__pycache__", "**/*.egg-info"])
    .add_local_dir(REPO_ROOT / "templates", f"{R1NEST_DIR}/templates", copy=True)
    .run_commands(
        f'PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir -e {R1NEST_DIR} '
        '"asyncpg==0.32.0" "boto3==1.44.5"'  # the ledger's drivers: PostgreSQL, DynamoDB
    )
    .env({
        # the plan's inputs, so that the container plans what `modal deploy` planned
        "R1NEST_MODEL": MODEL,
        "R1NEST_ENGINE": ENGINE,
        # the ledger (shared by every container) is named by the r1nest-ledger secret: see below
        "R1NEST_DATA_DIR": "/tmp/r1nest",
        "HF_HOME": HF_HOME,
        "HF_HUB_OFFLINE": "1",  # serve from the Volume only; download_weights fills it
    })
)

# ## Weights on a Volume

# The weights live on a [Modal Volume](https://modal.com/docs/guide/volumes) that every container
# mounts, filled once by `download_weights` below, not at each cold start.

weights_volume = modal.Volume.from_name("r1nest-weights", create_if_missing=True)

# ## Secrets: never in this file, never in the image

# `r1nest-keys` holds `R1NEST_ADMIN_KEY` (it guards `/admin`, `/metrics` and `/overview`).
# `r1nest-ledger` says where the credit ledger is, which every container shares. Either:
# - `R1NEST_DATABASE_URL`: a PostgreSQL database (`postgresql://user:password@host:5432/db`),
#   any provider's; the gateways create and migrate their tables on first use. No AWS account.
# - or DynamoDB: `R1NEST_DYNAMODB_TABLE`, `R1NEST_AWS_REGION`, and credentials that may use that
#   table (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
# The container picks the store from what the secret holds (`ledger_store` below).

keys_secret = modal.Secret.from_name("r1nest-keys")
ledger_secret = modal.Secret.from_name("r1nest-ledger")


def ledger_store(environ: Mapping[str, str]) -> str:
    """The `R1NEST_STORE` for what the r1nest-ledger secret put in the environment."""
    has_postgres = bool(environ.get("R1NEST_DATABASE_URL"))
    has_dynamodb = bool(environ.get("R1NEST_DYNAMODB_TABLE"))
    if has_postgres and has_dynamodb:
        raise RuntimeError("the r1nest-ledger secret names two ledgers: keep R1NEST_DATABASE_URL "
                           "(PostgreSQL) or R1NEST_DYNAMODB_TABLE (DynamoDB), not both")
    if has_postgres:
        return "postgres"
    if has_dynamodb:
        return "dynamodb"
    raise RuntimeError("the r1nest-ledger secret needs R1NEST_DATABASE_URL (PostgreSQL) or "
                       "R1NEST_DYNAMODB_TABLE with R1NEST_AWS_REGION and AWS credentials (DynamoDB)")


app = modal.App(APP_NAME)

# ## Download the weights (once)

# `modal run infra/modal/app.py::download_weights` copies the model from Hugging Face to the
# Volume. It goes in batches and commits the Volume after each, so an interrupted run resumes
# where it stopped (files already there are skipped), and it prints its progress.

DOWNLOAD_BATCH_FILES = 8
DOWNLOAD_TIMEOUT_S = 24 * 60 * MINUTES  # 0.69 TB at a few hundred MB/s: hours, not minutes

download_image = modal.Image.debian_slim(python_version="3.12").pip_install("huggingface_hub==2.4.0").env(
    {"HF_HOME": HF_HOME, "HF_XET_HIGH_PERFORMANCE": "1"}
)


@app.function(image=download_image, volumes={"/data": weights_volume}, timeout=DOWNLOAD_TIMEOUT_S)
def download_weights(repo_id: str = PLAN.profile.model, revision: str | None = PLAN.profile.revision) -> None:
    from huggingface_hub import HfApi, snapshot_download

    # revision: the catalog's pinned commit (the engine loads the same one); None: main, and the
    # commit it resolved to is printed, so the deployment's log records what it serves
    files = sorted(HfApi().list_repo_files(repo_id, revision=revision))
    total = len(files)
    for start in range(0, total, DOWNLOAD_BATCH_FILES):
        batch = files[start : start + DOWNLOAD_BATCH_FILES]
        path = snapshot_download(repo_id, revision=revision, allow_patterns=batch)  # resumes, skips complete
        weights_volume.commit()
        print(f"{min(start + len(batch), total)}/{total} files of {repo_id} on the Volume", flush=True)
    commit = os.path.basename(path.rstrip("/")) if total else "?"
    print(f"weights: {repo_id} at commit {commit} ({'pinned' if revision else 'main, unpinned'})", flush=True)


# ## The ledger (once)

# `modal run infra/modal/app.py::prepare_ledger` readies the ledger the `r1nest-ledger` secret
# names: PostgreSQL's schema migrations (`r1nest ledger migrate`; the gateways would apply them
# on first use anyway), or the DynamoDB table with TTL on reservations. Deployments that manage
# AWS with Pulumi or Terraform create the table from `r1nest.ledger.dynamodb.table_spec()`.


@app.function(image=serve_image, secrets=[ledger_secret], timeout=5 * MINUTES)
def prepare_ledger() -> None:
    import subprocess

    store = ledger_store(os.environ)
    os.environ["R1NEST_STORE"] = store
    if store == "postgres":
        subprocess.run(["r1nest", "ledger", "migrate"], check=True)
        return
    from r1nest.ledger.dynamodb import create_table
    from r1nest.settings import load_settings

    settings = load_settings()
    if not settings.aws_region or not settings.dynamodb_table:
        raise SystemExit("the r1nest-ledger secret needs R1NEST_AWS_REGION beside R1NEST_DYNAMODB_TABLE")
    create_table(settings.dynamodb_table, settings.aws_region)
    print(f"created {settings.dynamodb_table} in {settings.aws_region}")


# ## Engine + gateway behind one web server

# Each container runs three commands, all of them derived from the plan:
# 1. `r1nest doctor`: GPUs, a real FP8 GEMM on each, the kernels import, the weights are on the
#    Volume. A container that cannot serve stops here with the reason in its log;
# 2. the engine, with the planner's launch profile, on loopback with a random key of its own;
# 3. `r1nest gateway` on port 8000: keys, credits, `reasoning_content`, 503 while warming.
# There is no internal endpoint on Modal: one public HTTPS URL per deployment, and code running
# on Modal calls that URL too.


def container_commands(plan: planner.Plan, *, engine_port: int = ENGINE_PORT, gateway_port: int = GATEWAY_PORT,
                       secrets_dir: str = "/run/r1nest", python: str = "python3"
                       ) -> tuple[list[str], list[str], list[str]]:
    """(doctor, engine, gateway) argv lists for a plan. Pure: no key in any of them."""
    from r1nest.engines.base import engine_argv

    profile = plan.profile
    doctor = ["r1nest", "doctor", "--model", plan.model, "--engine", plan.engine, "--json"]
    engine = engine_argv(profile, host="127.0.0.1", port=engine_port, python=python, secrets_dir=secrets_dir)
    gateway = ["r1nest", "gateway", "--upstream", f"http://127.0.0.1:{engine_port}",
               "--served-model", profile.served_model_name, "--host", "0.0.0.0", "--port", str(gateway_port)]
    return doctor, engine, gateway


@app.function(
    image=serve_image,
    gpu=GPU,
    volumes={"/data": weights_volume},
    secrets=[keys_secret, ledger_secret],
    timeout=REQUEST_TIMEOUT_S,
    scaledown_window=SCALEDOWN_WINDOW_S,
    min_containers=MIN_CONTAINERS,
)
@modal.concurrent(max_inputs=MAX_INPUTS)
@modal.web_server(port=GATEWAY_PORT, startup_timeout=STARTUP_TIMEOUT_S)
def serve() -> None:
    import secrets
    import subprocess
    import threading

    from r1nest.engines.base import engine_env, engine_secret_files
    from r1nest.files import write_private_files

    store = ledger_store(os.environ)  # a secret that names no ledger stops the container here
    doctor, engine, gateway = container_commands(PLAN)
    report = subprocess.run(doctor, capture_output=True, text=True, timeout=15 * MINUTES, check=False)
    verdict = json.loads(report.stdout) if report.stdout.strip().startswith("{") else {}
    print(report.stdout if not verdict else json.dumps({k: verdict[k] for k in ("ok", "reason", "backends")}))
    if report.returncode != 0:
        raise RuntimeError(f"r1nest doctor: this container cannot serve {MODEL}: {verdict.get('reason') or report.stderr}")
    if verdict["disk"]["cached_bytes"] < 0.95 * WEIGHT_BYTES:
        raise RuntimeError(f"the weights of {MODEL} are not on the Volume: "
                           "run `modal run infra/modal/app.py::download_weights` first")

    # the engine's own key: in its environment (vLLM) or a 0600 file (SGLang), never in argv;
    # the engine gets neither the admin key nor the ledger's URL or AWS credentials
    engine_key = secrets.token_urlsafe(32)
    write_private_files(Path("/run/r1nest"), engine_secret_files(PLAN.profile, api_key=engine_key))
    engine_environ = {k: v for k, v in os.environ.items() if not k.startswith(("R1NEST_", "AWS_"))}
    engine_environ.update(engine_env(PLAN.profile, api_key=engine_key))
    engine_process = subprocess.Popen(engine, env=engine_environ)
    gateway_environ = {**os.environ, "R1NEST_STORE": store, "R1NEST_UPSTREAM_KEY": engine_key}
    gateway_process = subprocess.Popen(gateway, env=gateway_environ)

    # Modal replaces a container that exits: leave when either process dies, or when the engine
    # is not ready within the start-up budget.
    threading.Thread(target=_watch, args=(engine_process, gateway_process), daemon=True).start()


def _gateway_ready() -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{GATEWAY_PORT}/health", timeout=5) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):  # 503 while warming is an HTTPError, a URLError
        return False


def _watch(engine_process: Any, gateway_process: Any, *, ready: Callable[[], bool] = _gateway_ready,
           leave: Callable[[int], Any] = os._exit, deadline_s: float = STARTUP_TIMEOUT_S, poll_s: float = 5.0,
           clock: Callable[[], float] | None = None, sleep: Callable[[float], Any] | None = None) -> None:
    """Return only by leaving the container: when a process dies, or the engine is late. The
    loop is r1nest's own health watch (the gateway's and `r1nest serve`'s), here probing until
    the gateway first says ready; from then on the gateway watches the engine itself."""
    import asyncio
    import time

    from r1nest.gateway.health import LATE, watch_health
    from r1nest.gateway.state import EngineState

    sleep = sleep or time.sleep

    def exited() -> bool:
        for name, process in (("engine", engine_process), ("gateway", gateway_process)):
            if process.poll() is not None:
                print(f"the {name} exited with status {process.returncode}: stopping this container", flush=True)
                return True
        return False

    async def probe() -> bool:
        return bool(ready())

    async def wait(seconds: float) -> None:
        sleep(seconds)

    outcome = asyncio.run(watch_health(probe, EngineState(phase="warming"), interval_s=poll_s, exited=exited,
                                       wait=wait, ready_within_s=deadline_s, until_ready=True,
                                       clock=clock or time.monotonic))
    if outcome == LATE:
        print(f"the engine was not ready after {deadline_s:.0f} s: stopping this container", flush=True)
    leave(1)


# ## Deploy, then try it

# ```bash
# modal deploy infra/modal/app.py
# R1NEST_ADMIN_KEY=... modal run infra/modal/app.py::smoke
# ```

# The smoke test runs on your machine against the deployed URL. With the admin key (the one in the
# `r1nest-keys` secret) it creates an API key through the gateway's admin API, keeps it where
# `r1nest overview --from modal` looks for it (`<data dir>/modal/r1nest.api_key`, mode 0600),
# then streams a chat completion with the OpenAI SDK and prints the reasoning and the answer apart,
# and the credits left.


@app.local_entrypoint()
def smoke(credits: int = 1_000_000, prompt: str = "What is 17 * 23? Answer briefly.",
          wait_s: int = 30 * MINUTES) -> None:
    import time
    import urllib.error
    import urllib.request

    from openai import OpenAI

    admin_key = os.environ.get("R1NEST_ADMIN_KEY")
    if not admin_key:
        raise SystemExit("set R1NEST_ADMIN_KEY to the admin key stored in the r1nest-keys secret")
    web_url = modal.Function.from_name(APP_NAME, "serve").get_web_url()
    if web_url is None:
        raise SystemExit(f"the {APP_NAME} app has no web endpoint: deploy it first (modal deploy infra/modal/app.py)")
    url = web_url.rstrip("/")
    print(f"waiting for {url}/health (a cold start of {MODEL} takes minutes)")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=60) as resp:
                if resp.status == 200:
                    break
        except urllib.error.HTTPError as exc:  # 503 while warming, with Retry-After
            if exc.code != 503:
                raise
            pause = min(60, int(exc.headers.get("Retry-After") or 10))
        except urllib.error.URLError:
            pause = 10
        else:
            pause = 10
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} was not ready after {wait_s} s")
        time.sleep(pause)

    request = urllib.request.Request(
        f"{url}/admin/keys", method="POST",
        data=json.dumps({"name": "modal-smoke", "credits": credits}).encode(),
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        api_key = json.loads(resp.read())["key"]
    from r1nest.files import modal_key_file, write_key_file

    try:  # where `r1nest overview --from modal` looks (the data dir's modal/ folder)
        from r1nest.settings import load_settings

        data_dir = load_settings().data_dir
    except ImportError:  # r1nest's own dependencies are not installed here: the default data dir
        data_dir = Path.home() / ".r1nest"
    key_file = write_key_file(modal_key_file(data_dir, APP_NAME), api_key)
    print(f"new API key kept in {key_file}")

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key)
    stream = client.chat.completions.create(
        model=PLAN.profile.served_model_name, messages=[{"role": "user", "content": prompt}],
        stream=True, stream_options={"include_usage": True}, max_tokens=2048,
    )
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning = getattr(delta, "reasoning_content", None) or (delta.model_extra or {}).get("reasoning_content")
            if reasoning:
                print(f"\x1b[2m{reasoning}\x1b[0m", end="", flush=True)
            if delta.content:
                print(delta.content, end="", flush=True)
        elif chunk.usage is not None:
            extra = chunk.model_extra or {}
            print(f"\n\nusage: {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} "
                  f"completion tokens; remaining credits: {extra.get('remaining_credits')}")
