"""The boot path run, not only rendered: the user data the program produces, checked and executed
with the real tools.

- `cloud-init schema` (Debian's cloud-init) validates every node's user data;
- `systemd-analyze verify` loads every unit in a root made of the files cloud-init writes, the
  host's own systemd units, and a stand-in for what the AMI ships (docker, docker.service);
- `shellcheck` reads every script;
- the secrets script runs with the real AWS CLI against moto's server, reading the two SSM
  SecureString parameters the stack creates (same names, same type and key); then the key is
  registered and `r1nest gateway` starts exactly as its unit says (its env files, its command),
  in front of a fake engine that demands the key the script drew: the ApiKey buys a completion
  and the admin key opens /overview;
- the worker's script (engine only) and the image-build script (the source bundle from S3,
  its hash checked, `docker build` of the engine's Dockerfile) run the same way.

The scripts are the ones that ship; they run under a scratch root (`BOOT_ROOT`) and, for the
engine's key files, the test's own user (`BOOT_CONTAINER_UID`). A missing tool skips with the
reason outside CI and fails in CI (CI=true), where scripts/setup-env installs them all.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from r1nest_aws import policies

from .conftest import ECR_IMAGE

INSTANCE = "aws:ec2/instance:Instance"
PARAMETER = "aws:ssm/parameter:Parameter"
TWO_NODES = {"model": "deepseek-r1", "instanceType": "p5.48xlarge", "nodes": "2"}
VENV_BIN = Path(sys.executable).parent
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing"}


def require(tool: str) -> str:
    """The tool's path; a skip that says what to install, or in CI a failure."""
    found = str(VENV_BIN / tool) if (VENV_BIN / tool).exists() else shutil.which(tool)
    if found:
        return found
    message = f"{tool} is not installed (scripts/setup-env installs it)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; CI must have it")
    pytest.skip(message)


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=kwargs.pop("timeout", 120), **kwargs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} after {timeout_s} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


# -- the rendered boot files -------------------------------------------------------------------------

def user_data_of(run, rank: int = 0) -> str:
    (instance,) = [i for i in run.of(INSTANCE) if i.inputs["tags"]["r1nest:node-rank"] == str(rank)][:1]
    return instance.inputs["userData"]


def boot_files(user_data: str) -> dict[str, dict]:
    return {f["path"]: f for f in yaml.safe_load(user_data)["write_files"]}


def write_boot_files(user_data: str, root: Path) -> dict[str, dict]:
    """What cloud-init's write_files does, under `root`."""
    files = boot_files(user_data)
    for path, entry in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(entry["content"])
        target.chmod(int(entry["permissions"], 8))
    return files


VARIANTS = ["head", "worker", "multi-node-head", "https-head", "image-override", "sglang-head"]


@pytest.fixture
def variants(run_stack) -> dict[str, str]:
    """Every kind of node's user data: the default head (image built on the box), a worker of a
    two-node replica, a head behind HTTPS, and a head that pulls a prebuilt image."""
    two = run_stack(**TWO_NODES)
    return {
        "head": user_data_of(run_stack()),
        "worker": user_data_of(two, rank=1),
        "multi-node-head": user_data_of(two, rank=0),
        "https-head": user_data_of(run_stack(domain="api.example.com")),
        "image-override": user_data_of(run_stack(image=ECR_IMAGE)),
        "sglang-head": user_data_of(run_stack(engine="sglang")),  # its key file, written from a heredoc
    }


# -- cloud-init schema -------------------------------------------------------------------------------

def _cloud_init_top_level_keys(cloud_init: str) -> set[str]:
    """The top-level keys cloud-init's own schema defines (its schema accepts unknown keys, so a
    misspelt `write_file` would otherwise pass)."""
    python = Path(cloud_init).read_text(errors="replace").splitlines()[0].removeprefix("#!").split()
    done = _run([*python, "-c", "import cloudinit, os; print(os.path.dirname(cloudinit.__file__))"])
    schema = json.loads((Path(done.stdout.strip()) / "config" / "schemas" / "schema-cloud-config-v1.json").read_text())
    keys: set[str] = set()
    for ref in schema["allOf"]:
        keys |= set(schema["$defs"][ref["$ref"].rsplit("/", 1)[-1]].get("properties", {}))
    return keys


def cloud_init_problems(user_data: str, tmp_path: Path) -> list[str]:
    cloud_init = require("cloud-init")
    path = tmp_path / "user-data.yaml"
    path.write_text(user_data)
    done = _run([cloud_init, "schema", "--config-file", str(path)])
    problems = [] if done.returncode == 0 and "Valid cloud-config" in done.stdout else [done.stdout + done.stderr]
    unknown = set(yaml.safe_load(user_data)) - _cloud_init_top_level_keys(cloud_init)
    return problems + [f"keys cloud-init does not know: {sorted(unknown)}"] * bool(unknown)


@pytest.mark.parametrize("variant", VARIANTS)
def test_user_data_passes_cloud_init_schema(variants, variant, tmp_path):
    user_data = variants[variant]
    assert user_data.startswith("#cloud-config\n")
    assert cloud_init_problems(user_data, tmp_path) == []


@pytest.mark.parametrize("mistake", ["runcmd-not-a-list", "bad-encoding", "misspelt-key"])
def test_cloud_init_check_reports_a_planted_mistake(variants, mistake, tmp_path):
    document = yaml.safe_load(variants["head"])
    if mistake == "runcmd-not-a-list":
        document["runcmd"] = {"systemctl": "daemon-reload"}
    elif mistake == "bad-encoding":
        document["write_files"][0]["encoding"] = "rot13"
    else:
        document["write_file"] = document.pop("write_files")
    assert cloud_init_problems("#cloud-config\n" + yaml.safe_dump(document), tmp_path)


# -- systemd-analyze verify --------------------------------------------------------------------------

STUB = "#!/bin/sh\nexit 0\n"
DOCKER_SERVICE = ("[Unit]\nDescription=Docker (stand-in)\n[Service]\nExecStart=/usr/bin/dockerd\n"
                  "[Install]\nWantedBy=multi-user.target\n")


def _system_unit_dir() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "multi-user.target").exists():
            return candidate
    pytest.skip("no systemd unit directory on this machine")


def unit_root(user_data: str, root: Path) -> list[str]:
    """A root holding what the AMI brings (systemd's units, docker) and what cloud-init writes;
    returns the r1nest unit paths inside it."""
    shutil.copytree(_system_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    for binary in ("usr/bin/docker", "usr/bin/dockerd"):
        (root / binary).parent.mkdir(parents=True, exist_ok=True)
        (root / binary).write_text(STUB)
        (root / binary).chmod(0o755)
    (root / "usr/lib/systemd/system/docker.service").write_text(DOCKER_SERVICE)
    files = write_boot_files(user_data, root)
    return sorted(path for path in files if path.startswith("/etc/systemd/system/"))


def systemd_problems(root: Path, units: list[str]) -> list[str]:
    """systemd-analyze verify must exit 0 and say nothing (it only warns about unknown keys), and
    every command a unit runs must exist in the root, executable."""
    analyze = require("systemd-analyze")
    done = _run([analyze, "verify", "--man=no", "--generators=no", f"--root={root}", *units])
    problems = [] if done.returncode == 0 and not (done.stdout + done.stderr).strip() else [done.stdout + done.stderr]
    for unit in units:
        for line in (root / unit.lstrip("/")).read_text().splitlines():
            if line.startswith(("ExecStart=", "ExecStartPre=", "ExecStop=")):
                binary = policies.exec_argv(line)[0]
                target = root / binary.lstrip("/")
                if not binary.startswith("/") or not target.is_file() or not os.access(target, os.X_OK):
                    problems.append(f"{unit}: {binary} is not an executable on the box")
    return problems


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_unit_passes_systemd_analyze_verify(variants, variant, tmp_path):
    units = unit_root(variants[variant], tmp_path / "root")
    expected = {"/etc/systemd/system/r1nest-engine.service"}
    if variant != "worker":
        expected.add("/etc/systemd/system/r1nest-gateway.service")
    assert set(units) == expected
    assert systemd_problems(tmp_path / "root", units) == []


@pytest.mark.parametrize("mistake", ["unknown-key", "missing-script", "relative-command", "missing-dependency"])
def test_systemd_check_reports_a_planted_mistake(variants, mistake, tmp_path):
    units = unit_root(variants["head"], tmp_path / "root")
    engine = tmp_path / "root" / units[0].lstrip("/")
    text = engine.read_text()
    if mistake == "unknown-key":
        text = text.replace("Restart=on-failure", "Restrat=on-failure")
    elif mistake == "missing-script":
        (tmp_path / "root/usr/local/sbin/r1nest-secrets").unlink()
    elif mistake == "relative-command":
        text = text.replace("ExecStart=/usr/bin/docker", "ExecStart=docker")
    else:
        text = text.replace("Requires=docker.service", "Requires=dockr.service")
    engine.write_text(text)
    assert systemd_problems(tmp_path / "root", units)


# -- shellcheck ------------------------------------------------------------------------------------

def scripts_of(user_data: str) -> dict[str, str]:
    return {path: f["content"] for path, f in boot_files(user_data).items() if f["content"].startswith("#!")}


def shellcheck_problems(script: str) -> list[str]:
    done = _run([require("shellcheck"), "--shell=bash", "--severity=style", "--format=gcc", "-"], input=script)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()] or (
        [f"shellcheck exited {done.returncode}"] if done.returncode else [])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_script_passes_shellcheck(variants, variant):
    scripts = scripts_of(variants[variant])
    expected = {"r1nest-secrets"}
    if variant != "image-override":
        expected.add("r1nest-image")
    if variant != "worker":
        expected.add("r1nest-register-key")
    assert {path.rsplit("/", 1)[-1] for path in scripts} == expected
    for path, script in scripts.items():
        assert shellcheck_problems(script) == [], path


def test_shellcheck_reports_a_planted_mistake(variants):
    script = scripts_of(variants["head"])["/usr/local/sbin/r1nest-image"]
    assert shellcheck_problems(script.replace('rm -rf "$WORK"', "rm -rf $WORK"))


# -- moto's server and the real AWS CLI ------------------------------------------------------------

@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        require("moto_server")  # skips (fails in CI) with what to install
    port = _free_port()
    log = open(os.devnull, "w")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=log)
    try:
        _wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)
        log.close()


def aws_env(moto_url: str, root: Path | None = None) -> dict[str, str]:
    """The environment the scripts get: the real AWS CLI first on PATH, moto as every endpoint,
    fake credentials, and the scratch root."""
    aws = require("aws")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "R1NEST_", "BOOT_"))}
    env.update(FAKE_CREDENTIALS, AWS_ENDPOINT_URL=moto_url, AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, PATH=f"{Path(aws).parent}{os.pathsep}{env.get('PATH', '')}")
    if root is not None:
        env.update(BOOT_ROOT=str(root), BOOT_CONTAINER_UID=str(os.getuid()))
    return env


def put_key_parameters(run, moto_url: str) -> None:
    """The stack's two SecureString parameters, created in moto as the program declares them."""
    import boto3

    ssm = boto3.client("ssm", region_name="us-east-1", endpoint_url=moto_url, **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing"})
    parameters = run.of(PARAMETER)
    assert len(parameters) == 2
    for parameter in parameters:
        inputs = parameter.inputs
        assert inputs["type"] == "SecureString"
        extra = {"KeyId": inputs["keyId"]} if inputs.get("keyId") else {}
        output = "api_key" if inputs["name"] == run.outputs["api_key_parameter"] else "admin_key"
        ssm.put_parameter(Name=inputs["name"], Value=run.outputs[output], Type=inputs["type"], Overwrite=True, **extra)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def read_env_file(path: Path) -> dict[str, str]:
    """`docker run --env-file` semantics: NAME=VALUE lines, no quoting."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            pairs[name] = value
    return pairs


# -- the head node: keys from SSM, the key registered, the gateway up ------------------------------

def container(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(env files, entrypoint, arguments) of one of the units' `docker run` commands."""
    assert argv[:2] == ["/usr/bin/docker", "run"], argv
    env_files = [argv[i + 1] for i, a in enumerate(argv) if a == "--env-file"]
    at = argv.index("--entrypoint")
    return env_files, argv[at + 1], argv[at + 3:]


def container_process_env(root: Path, env_files: list[str], overrides: dict[str, str]) -> dict[str, str]:
    """The container's environment as Docker builds it from the env files (later files win),
    with what the box provides differently here: the data volume, the ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("R1NEST_", "AWS_", "BOOT_"))}
    for env_file in env_files:
        env.update(read_env_file(root / env_file.lstrip("/")))
    env.update(overrides)
    return env


def _entrypoint(name: str) -> list[str]:
    return {"python3": [sys.executable], "r1nest": [sys.executable, "-m", "r1nest"]}[name]


def test_head_node_boot_reads_the_keys_from_ssm_and_the_gateway_serves_with_them(run_stack, moto_url, tmp_path):
    import httpx

    run = run_stack()
    root = tmp_path / "root"
    files = write_boot_files(user_data_of(run), root)
    put_key_parameters(run, moto_url)
    env = aws_env(moto_url, root)

    # 1. the secrets script, as shipped, twice (every boot runs it; the engine key stays)
    for _ in range(2):
        done = _run(["bash", str(root / "usr/local/sbin/r1nest-secrets")], env=env)
        assert done.returncode == 0, done.stderr
        assert run.outputs["api_key"] not in done.stdout + done.stderr
    secrets = root / "etc/r1nest/secrets"
    assert _mode(secrets) == 0o700
    written = {p.name: p for p in secrets.iterdir() if p.is_file()}
    assert set(written) == {"api_key", "engine_key", "engine.env", "gateway.env"}
    assert all(_mode(p) == 0o600 for p in written.values()), {n: oct(_mode(p)) for n, p in written.items()}
    engine_key = written["engine_key"].read_text().strip()
    assert len(engine_key) == 64
    assert written["api_key"].read_text() == run.outputs["api_key"] + "\n"
    assert read_env_file(written["gateway.env"]) == {"R1NEST_ADMIN_KEY": run.outputs["admin_key"],
                                                     "R1NEST_UPSTREAM_KEY": engine_key}
    assert read_env_file(written["engine.env"]) == {"VLLM_API_KEY": engine_key}

    # 2. the engine, on loopback, demanding the key the script drew (a fake engine: no GPU here)
    gateway_env_file = read_env_file(root / "etc/r1nest/gateway.env")
    served = gateway_env_file["R1NEST_SERVED_MODEL"]
    engine_port, gateway_port = _free_port(), _free_port()
    engine_env_key = read_env_file(written["engine.env"])["VLLM_API_KEY"]
    engine = subprocess.Popen([sys.executable, "-m", "r1nest.testing.fake_engine", "--port", str(engine_port),
                               "--served-model", served, "--api-key", engine_env_key],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    overrides = {"R1NEST_DATA_DIR": str(tmp_path / "data"), "R1NEST_HOST": "127.0.0.1",
                 "R1NEST_PORT": str(gateway_port), "R1NEST_UPSTREAM_URL": f"http://127.0.0.1:{engine_port}"}
    gateway = None
    try:
        _wait_for_port(engine_port, engine)
        # 3. the key registration, as r1nest-register-key runs it: the key on stdin
        register = files["/usr/local/sbin/r1nest-register-key"]["content"].strip().splitlines()[-1]
        command, _, stdin_path = register.removeprefix("exec ").partition(" < ")
        env_files, entrypoint, args = container(shlex.split(command))
        with open(root / stdin_path.strip().lstrip("/")) as stdin:
            done = _run(_entrypoint(entrypoint) + args, stdin=stdin,
                        env=container_process_env(root, env_files, overrides))
        assert done.returncode == 0 and "registered the deployment's API key" in done.stdout, done.stderr

        # 4. the gateway, as its unit starts it
        unit = files["/etc/systemd/system/r1nest-gateway.service"]["content"]
        exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
        env_files, entrypoint, args = container(policies.exec_argv(exec_start))
        assert args == ["gateway"]
        log = open(tmp_path / "gateway.log", "w")
        gateway = subprocess.Popen(_entrypoint(entrypoint) + args, stdout=log, stderr=subprocess.STDOUT,
                                   env=container_process_env(root, env_files, overrides))
        _wait_for_port(gateway_port, gateway)
        base = f"http://127.0.0.1:{gateway_port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 60
            while client.get("/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            chat = {"model": served, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}
            answer = client.post("/v1/chat/completions", json=chat,
                                 headers={"Authorization": f"Bearer {run.outputs['api_key']}"})
            assert answer.status_code == 200, answer.text
            remaining = int(answer.headers["x-remaining-credits"])
            assert 0 <= remaining < run.outputs["credits"]
            assert answer.json()["choices"][0]["message"]["content"]
            # a key that is not the deployment's buys nothing
            stranger = {"Authorization": "Bearer r1n-000000000000-" + "x" * 43}
            assert client.post("/v1/chat/completions", json=chat, headers=stranger).status_code == 401
            # the admin key from SSM opens the overview page
            assert client.get("/overview").status_code in (303, 307)
            assert client.post("/overview/login", data={"admin_key": "r1nadmin-wrong"}).status_code == 401
            login = client.post("/overview/login", data={"admin_key": run.outputs["admin_key"]})
            assert login.status_code == 303, login.text
            page = client.get("/overview")
            assert page.status_code == 200 and run.outputs["public_endpoint"] in page.text
    finally:
        if gateway is not None:
            _stop(gateway)
            log.close()
        _stop(engine)
    assert run.outputs["api_key"] not in (tmp_path / "gateway.log").read_text()


def test_secrets_script_stops_without_writing_when_a_parameter_is_missing(run_stack, moto_url, tmp_path):
    run = run_stack(allowedCidrs="198.51.100.0/24")
    root = tmp_path / "root"
    write_boot_files(user_data_of(run), root)
    env = aws_env(moto_url, root)
    env["AWS_DEFAULT_REGION"] = "us-east-1"
    import boto3

    ssm = boto3.client("ssm", region_name="us-east-1", endpoint_url=moto_url, aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    ssm.delete_parameters(Names=[run.outputs["api_key_parameter"], run.outputs["admin_key_parameter"]])
    done = _run(["bash", str(root / "usr/local/sbin/r1nest-secrets")], env=env)
    assert done.returncode != 0 and "ParameterNotFound" in done.stderr
    assert not (root / "etc/r1nest/secrets/gateway.env").exists() and not (root / "etc/r1nest/secrets/api_key").exists()


def test_worker_node_boot_writes_the_engine_key_only(run_stack, moto_url, tmp_path):
    run = run_stack(**TWO_NODES)
    root = tmp_path / "root"
    files = write_boot_files(user_data_of(run, rank=1), root)
    done = _run(["bash", str(root / "usr/local/sbin/r1nest-secrets")], env=aws_env(moto_url, root))
    assert done.returncode == 0, done.stderr
    secrets = root / "etc/r1nest/secrets"
    written = {p.name for p in secrets.iterdir() if p.is_file()}
    assert written == {"engine_key", "engine.env"}  # no ApiKey, no admin key on a worker
    assert all(_mode(secrets / name) == 0o600 for name in written)
    engine_key = (secrets / "engine_key").read_text().strip()
    assert read_env_file(secrets / "engine.env") == {"VLLM_API_KEY": engine_key}
    # the worker's engine joins the head at its private address, and runs no gateway
    head_ip = run.outputs["internal_endpoint"].split("//")[1].split(":")[0]
    engine_unit = files["/etc/systemd/system/r1nest-engine.service"]["content"]
    argv = policies.exec_argv(next(line for line in engine_unit.splitlines() if line.startswith("ExecStart=")))
    assert argv[argv.index("--master-addr") + 1] == head_ip and "--headless" in argv
    assert "/etc/systemd/system/r1nest-gateway.service" not in files


# -- the image build from the source bundle --------------------------------------------------------

DOCKER_STUB = """#!/bin/bash
# stands in for the AMI's docker: records the call; `image inspect` finds nothing yet
echo "$*" >> "$DOCKER_LOG"
case "$1" in
  image) exit 1 ;;
  build) ctx="${*: -1}"; [ -f "$ctx/pyproject.toml" ] && [ -f "$ctx/images/vllm.Dockerfile" ] \\
           && [ -f "$ctx/service/r1nest/cli.py" ] && echo "context complete" >> "$DOCKER_LOG" ;;
esac
"""


def _image_build_env(moto_url: str, root: Path, tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(DOCKER_STUB)
    (bin_dir / "docker").chmod(0o755)
    env = aws_env(moto_url, root)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", DOCKER_LOG=str(tmp_path / "docker.log"))
    return env


def _upload_bundle(run, moto_url: str, data: bytes) -> None:
    import boto3

    bucket, _, key = run.outputs["source_bundle"].removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_url, aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    s3.put_object(Bucket=bucket, Key=key, Body=data)


@pytest.mark.parametrize("tampered", [False, True], ids=["the-uploaded-bundle", "a-tampered-object"])
def test_image_script_downloads_checks_and_builds_the_bundle(run_stack, moto_url, tmp_path, tampered):
    from r1nest_aws.deployment import BUNDLE_DIR, CHECKOUT_ROOT

    from r1nest.cloud.bundle import build_bundle

    run = run_stack()
    bundle = build_bundle(CHECKOUT_ROOT)
    assert bundle.sha256 == run.outputs["source_sha256"]
    # what the stack uploads: the file its BucketObject's asset names
    data = (BUNDLE_DIR / f"r1nest-source-{bundle.sha256}.tar.gz").read_bytes()
    _upload_bundle(run, moto_url, data + b"\0" if tampered else data)
    root = tmp_path / "root"
    write_boot_files(user_data_of(run), root)
    env = _image_build_env(moto_url, root, tmp_path)
    done = _run(["bash", str(root / "usr/local/sbin/r1nest-image")], env=env)
    calls = (tmp_path / "docker.log").read_text().splitlines()
    if tampered:
        assert done.returncode != 0 and "FAILED" in done.stderr + done.stdout
        assert not [c for c in calls if c.startswith("build")]  # nothing from an unchecked bundle is used
        return
    assert done.returncode == 0, done.stderr
    image = run.outputs["image"]
    assert calls[0] == f"image inspect {image}"
    build = next(c for c in calls if c.startswith("build"))
    dockerfile = root / "var/lib/r1nest/build/src/images/vllm.Dockerfile"
    assert f"--file {dockerfile} --build-arg WITH_EFA=0 --tag {image}" in build
    assert calls[-1] == "context complete"
    assert not (root / "var/lib/r1nest/build").exists()  # the build context is removed afterwards
