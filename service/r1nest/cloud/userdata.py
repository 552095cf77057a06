"""What an AWS instance runs at first boot: the cloud-init document, rendered from `templates/`.

Pure: a `NodeBoot` (every value the box needs, none of them secret) in, text out. The Pulumi
program builds one `NodeBoot` per instance with `node_boot()` and hands the text to EC2.

On the box (Deep Learning Base GPU AMI: Docker, the NVIDIA container toolkit and the AWS CLI are
there) cloud-init writes:
- `/usr/local/sbin/r1nest-secrets` (root, 0700): reads the ApiKey and admin key from SSM Parameter
  Store through the instance role (`aws ssm get-parameter --with-decryption`), draws the engine's
  own random key, and writes them into `/etc/r1nest/secrets/` (root, 0600). User data names the
  parameters, never their values.
- `/usr/local/sbin/r1nest-image` (root, 0700), when the deployment builds its own image (no
  `r1nest:image`): downloads the r1nest source bundle the stack uploaded to its private S3 bucket
  (through the instance role), checks its SHA-256, and runs `docker build` of
  `images/<engine>.Dockerfile` on top of the engine project's official image. Skipped when the
  image of that hash is already there (a reboot).
- `r1nest-engine.service` on every node: `r1nest doctor` first, then the service image running
  the engine command the planner produced (`engine_argv`, this node's rank, the head's address).
- `r1nest-gateway.service` on the head node only: registers the generated ApiKey with the ledger
  (`python -m r1nest.cloud.bootstrap`, idempotent) and runs `r1nest gateway` in front of the
  engine on loopback: the only listener the security group lets through.

The scripts run as root under systemd, with no environment of their own. The tests run the very
same scripts against a scratch directory through two variables that are unset on the box:
`BOOT_ROOT` (a prefix for every path they write) and `BOOT_CONTAINER_UID` (the owner of the
engine's key files, otherwise the image's user).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from r1nest.keys import ADMIN_PREFIX, KEY_PREFIX

if TYPE_CHECKING:
    from jinja2 import Environment

USER_DATA_LIMIT_BYTES = 16 * 1024  # EC2 refuses larger user data (before base64)
ENGINE_KEY_SENTINEL = "@@R1NEST_ENGINE_KEY@@"  # stands for the key drawn on the box at boot

# The service image (images/*.Dockerfile) runs as uid 10001 with one volume at /data: the
# Hugging Face cache in /data/hf (HF_HOME) and r1nest's ledger in /data/r1nest. Engine and
# gateway share the named volume r1nest-data, which Docker seeds from the image (owner included).
DATA_VOLUME = "r1nest-data:/data"
CONTAINER_DATA_DIR = "/data/r1nest"
IMAGE_UID = 10001
ENGINE_UNIT = "r1nest-engine.service"
GATEWAY_UNIT = "r1nest-gateway.service"
SECRETS_DIR = "/etc/r1nest/secrets"
ENGINE_FILES_DIR = "/etc/r1nest/secrets/engine-files"
CONTAINER_SECRETS_DIR = "/run/r1nest-secrets"  # where the engine sees ENGINE_FILES_DIR

# Things that must never be in user data: anything shaped like a key or a credential.
SECRET_PATTERNS: dict[str, re.Pattern[str]] = {
    "r1nest key": re.compile(rf"\b(?:{KEY_PREFIX}|{ADMIN_PREFIX})-[0-9a-f]{{12}}-[A-Za-z0-9_-]{{20,}}"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key assignment": re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*\S+"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),
    "bearer token": re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/-]{20,}"),
    "literal key assignment": re.compile(
        r"(?i)(?:api[_-]?key|admin[_-]?key|password|secret|token)\s*[=:]\s*['\"]?[A-Za-z0-9_+/-]{24,}"
    ),
}


def find_secrets(text: str) -> list[str]:
    """Names of the secret patterns found in `text` (empty: clean). Never returns the match."""
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


class UserDataError(ValueError):
    pass


@dataclass(frozen=True)
class ImageBuild:
    """Where the r1nest source bundle lies and how to build the service image from it."""

    bucket: str
    key: str
    sha256: str  # of the bundle: checked before anything in it is used
    dockerfile: str  # inside the bundle, e.g. images/vllm.Dockerfile
    with_efa: bool = False  # the Dockerfiles' WITH_EFA build argument

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise UserDataError("the source bundle's hash must be a SHA-256 hex digest")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", self.bucket):
            raise UserDataError(f"{self.bucket!r} is not an S3 bucket name")
        if not re.fullmatch(r"[A-Za-z0-9_./-]{1,512}", self.key):
            raise UserDataError(f"{self.key!r} is not a source bundle key")
        if not re.fullmatch(r"images/[a-z]+\.Dockerfile", self.dockerfile):
            raise UserDataError("bad source bundle key or Dockerfile path")


@dataclass(frozen=True)
class NodeBoot:
    """One instance's boot description. Every field may be read by anyone with ec2:Describe*."""

    deployment: str
    region: str
    image: str
    node_rank: int
    nodes: int
    served_model: str
    engine_argv: tuple[str, ...]
    engine_env: tuple[tuple[str, str], ...]  # ENGINE_KEY_SENTINEL marks where the engine key goes
    doctor_argv: tuple[str, ...]
    api_key_parameter: str
    admin_key_parameter: str
    gateway_port: int
    engine_port: int
    efa: bool = False
    public_url: str | None = None
    internal_url: str | None = None
    price_prompt_per_mtok: int = 0
    price_completion_per_mtok: int = 0
    initial_credits: int = 0
    store: Literal["sqlite", "dynamodb"] = "sqlite"
    dynamodb_table: str | None = None
    ecr_registry: str | None = None  # log in to it with the instance role before pulling
    image_build: ImageBuild | None = None  # build `image` on the box instead of pulling it
    # files the engine reads its key from (SGLang), ENGINE_KEY_SENTINEL where the key goes;
    # written at boot into ENGINE_FILES_DIR, owned by the image's user, mounted read-only
    engine_secret_files: tuple[tuple[str, str], ...] = ()
    container_uid: int = IMAGE_UID
    extra_gateway_env: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def is_head(self) -> bool:
        return self.node_rank == 0


def systemd_quote(arg: str) -> str:
    """One argument of an Exec= line: `%` and `$` escaped, quoted when needed (systemd.service(5))."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if escaped and re.fullmatch(r"[A-Za-z0-9_./:=,@+-]+", escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_command(argv: list[str] | tuple[str, ...]) -> str:
    return " ".join(systemd_quote(a) for a in argv)


def _docker_run(boot: NodeBoot, *, name: str, env_files: list[str], entrypoint: str,
                args: list[str] | tuple[str, ...], gpus: bool, volumes: list[str],
                interactive: bool = False, healthcheck: bool = False) -> list[str]:
    argv = ["/usr/bin/docker", "run", "--name", name] if name else ["/usr/bin/docker", "run"]
    argv.append("--rm")
    if not healthcheck:  # the image's HEALTHCHECK probes the gateway port
        argv.append("--no-healthcheck")
    if interactive:
        argv.append("-i")
    argv += ["--network", "host"]
    if gpus:
        argv += ["--gpus", "all", "--ipc", "host", "--ulimit", "memlock=-1", "--ulimit", "stack=67108864"]
        if boot.efa:
            argv += ["--device", "/dev/infiniband"]
    for env_file in env_files:
        argv += ["--env-file", env_file]
    for volume in volumes:
        argv += ["-v", volume]
    argv += ["--entrypoint", entrypoint, boot.image, *args]
    return argv


def _env_lines(pairs: list[tuple[str, str]]) -> str:
    for name, value in pairs:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or "\n" in value:
            raise UserDataError(f"bad environment entry {name!r}")
    return "".join(f"{name}={value}\n" for name, value in pairs)


def gateway_env(boot: NodeBoot) -> list[tuple[str, str]]:
    """The gateway's non-secret settings (R1NEST_* names of r1nest.settings.Settings)."""
    pairs = [
        ("R1NEST_DATA_DIR", CONTAINER_DATA_DIR),
        ("R1NEST_HOST", "0.0.0.0"),
        ("R1NEST_PORT", str(boot.gateway_port)),
        ("R1NEST_SERVED_MODEL", boot.served_model),
        ("R1NEST_UPSTREAM_URL", f"http://127.0.0.1:{boot.engine_port}"),
        ("R1NEST_PRICE_PROMPT_PER_MTOK", str(boot.price_prompt_per_mtok)),
        ("R1NEST_PRICE_COMPLETION_PER_MTOK", str(boot.price_completion_per_mtok)),
        ("R1NEST_STORE", boot.store),
        ("R1NEST_AWS_REGION", boot.region),
    ]
    if boot.dynamodb_table:
        pairs.append(("R1NEST_DYNAMODB_TABLE", boot.dynamodb_table))
    if boot.public_url:
        pairs.append(("R1NEST_PUBLIC_URL", boot.public_url))
    if boot.internal_url:
        pairs.append(("R1NEST_INTERNAL_URL", boot.internal_url))
    pairs += list(boot.extra_gateway_env)
    return pairs


SECRETS_SCRIPT = "/usr/local/sbin/r1nest-secrets"
IMAGE_SCRIPT = "/usr/local/sbin/r1nest-image"
REGISTER_KEY_SCRIPT = "/usr/local/sbin/r1nest-register-key"
BUILD_DIR = "/var/lib/r1nest/build"


def _script_header(purpose: list[str]) -> list[str]:
    return [
        "#!/bin/bash",
        *[f"# {line}" for line in purpose],
        "set -euo pipefail",
        "umask 077",
        'ROOT="${BOOT_ROOT:-}"  # empty on the instance; a scratch directory in the tests',
    ]


def _secrets_script(boot: NodeBoot) -> str:
    secret_names = [name for name, value in boot.engine_env if value == ENGINE_KEY_SENTINEL]
    q = shlex.quote
    lines = _script_header([
        "Reads this deployment's keys from SSM Parameter Store through the instance role and",
        "writes them where only root can read them. Runs before the engine starts, every boot.",
    ]) + [
        f'SECRETS="$ROOT"{SECRETS_DIR}',
        f'FILES="$ROOT"{ENGINE_FILES_DIR}',
        f'OWNER="${{BOOT_CONTAINER_UID:-{boot.container_uid}}}"',
        'install -d -m 0700 "$SECRETS"',
        f"fetch() {{ aws ssm get-parameter --region {q(boot.region)} --with-decryption "
        '--name "$1" --query Parameter.Value --output text; }',
        'if [ ! -s "$SECRETS/engine_key" ]; then openssl rand -hex 32 > "$SECRETS/engine_key"; fi',
        'ENGINE_KEY="$(cat "$SECRETS/engine_key")"',
        "{",
        *[f"  printf '%s=%s\\n' {q(name)} \"$ENGINE_KEY\"" for name in secret_names],
        "  true",
        '} > "$SECRETS/engine.env"',
        'install -d -m 0700 -o "$OWNER" "$FILES"',
    ]
    for file_name, template in boot.engine_secret_files:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", file_name) or "R1NEST_EOF" in template:
            raise UserDataError(f"bad engine secret file {file_name!r}")
        target = f'"$FILES/{file_name}"'
        lines += [
            f"sed \"s/{ENGINE_KEY_SENTINEL}/$ENGINE_KEY/g\" > {target} <<'R1NEST_EOF'",
            template.rstrip("\n"),
            "R1NEST_EOF",
            f'chown "$OWNER" {target}',
        ]
    if boot.ecr_registry:
        lines.append(
            f"aws ecr get-login-password --region {q(boot.region)} | "
            f"docker login --username AWS --password-stdin {q(boot.ecr_registry)}"
        )
    if boot.is_head:
        lines += [
            # assignments, so that a failed read stops the script (set -e) before any file is written
            f"API_KEY=\"$(fetch {q(boot.api_key_parameter)})\"",
            f"ADMIN_KEY=\"$(fetch {q(boot.admin_key_parameter)})\"",
            'if [ -z "$API_KEY" ] || [ -z "$ADMIN_KEY" ]; then',
            '  echo "r1nest-secrets: empty key parameter" >&2',
            "  exit 1",
            "fi",
            'printf \'%s\\n\' "$API_KEY" > "$SECRETS/api_key.tmp"',
            'mv "$SECRETS/api_key.tmp" "$SECRETS/api_key"',
            "{",
            "  printf 'R1NEST_ADMIN_KEY=%s\\n' \"$ADMIN_KEY\"",
            "  printf 'R1NEST_UPSTREAM_KEY=%s\\n' \"$ENGINE_KEY\"",
            '} > "$SECRETS/gateway.env.tmp"',
            'mv "$SECRETS/gateway.env.tmp" "$SECRETS/gateway.env"',
        ]
    return "\n".join(lines) + "\n"


def _image_script(boot: NodeBoot) -> str:
    build = boot.image_build
    assert build is not None
    q = shlex.quote
    return "\n".join(_script_header([
        "Builds the service image from the r1nest source bundle of this deployment (a private S3",
        "object, read through the instance role) on top of the engine's official image, pinned by",
        "digest in the Dockerfile. Does nothing when the image of this bundle is already built.",
    ]) + [
        f"IMAGE={q(boot.image)}",
        'if docker image inspect "$IMAGE" > /dev/null 2>&1; then exit 0; fi',
        f'WORK="$ROOT"{BUILD_DIR}',
        'rm -rf "$WORK"',
        'install -d -m 0700 "$WORK/src"',
        f"aws s3 cp --region {q(boot.region)} --only-show-errors "
        f'{q(f"s3://{build.bucket}/{build.key}")} "$WORK/source.tar.gz"',
        f"printf '%s  %s\\n' {build.sha256} \"$WORK/source.tar.gz\" | sha256sum --check --quiet",
        'tar -xzf "$WORK/source.tar.gz" -C "$WORK/src" --no-same-owner',
        f'DOCKER_BUILDKIT=1 docker build --file "$WORK/src/"{q(build.dockerfile)} '
        f'--build-arg WITH_EFA={1 if build.with_efa else 0} --tag "$IMAGE" "$WORK/src"',
        'rm -rf "$WORK"',
    ]) + "\n"


def _register_key_script(boot: NodeBoot) -> str:
    argv = _docker_run(
        boot, name="", interactive=True, gpus=False,
        env_files=["/etc/r1nest/gateway.env", f"{SECRETS_DIR}/gateway.env"],
        volumes=[DATA_VOLUME], entrypoint="python3",
        args=["-m", "r1nest.cloud.bootstrap", "--name", "default", "--credits", str(boot.initial_credits)],
    )
    return (
        "#!/bin/bash\n"
        "# Registers the ApiKey that Pulumi generated with the ledger (idempotent): the key\n"
        "# travels on stdin, never in argv or the environment.\n"
        "set -euo pipefail\n"
        f"exec {' '.join(shlex.quote(a) for a in argv)} < {SECRETS_DIR}/api_key\n"
    )


def _units(boot: NodeBoot) -> list[tuple[str, dict[str, object]]]:
    engine_pre = [
        SECRETS_SCRIPT,
        IMAGE_SCRIPT if boot.image_build else systemd_command(["/usr/bin/docker", "pull", boot.image]),
        systemd_command(_docker_run(
            boot, name="", gpus=True, env_files=[], volumes=[DATA_VOLUME],
            entrypoint=boot.doctor_argv[0], args=boot.doctor_argv[1:],
        )),
    ]
    engine_volumes = [DATA_VOLUME]
    if boot.engine_secret_files:
        engine_volumes.append(f"{ENGINE_FILES_DIR}:{CONTAINER_SECRETS_DIR}:ro")
    engine_start = _docker_run(
        boot, name="r1nest-engine", gpus=True,
        env_files=["/etc/r1nest/engine.env", f"{SECRETS_DIR}/engine.env"],
        volumes=engine_volumes,
        entrypoint=boot.engine_argv[0], args=boot.engine_argv[1:],
    )
    units: list[tuple[str, dict[str, object]]] = [(ENGINE_UNIT, {
        "description": f"r1nest engine, node {boot.node_rank} of {boot.nodes} ({boot.served_model})",
        "after": [], "requires": [], "container": "r1nest-engine",
        "exec_start_pre": engine_pre, "exec_start": systemd_command(engine_start),
        "stop_timeout_s": 60,
    })]
    if boot.is_head:
        gateway_start = _docker_run(
            boot, name="r1nest-gateway", gpus=False,
            env_files=["/etc/r1nest/gateway.env", f"{SECRETS_DIR}/gateway.env"],
            volumes=[DATA_VOLUME], entrypoint="r1nest", args=["gateway"], healthcheck=True,
        )
        units.append((GATEWAY_UNIT, {
            "description": f"r1nest gateway on port {boot.gateway_port} ({boot.served_model})",
            "after": [ENGINE_UNIT], "requires": [ENGINE_UNIT], "container": "r1nest-gateway",
            "exec_start_pre": [REGISTER_KEY_SCRIPT],
            "exec_start": systemd_command(gateway_start),
            "stop_timeout_s": 45,  # the gateway drains open streams first
        }))
    return units


def _templates() -> Environment:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    from r1nest.paths import TEMPLATES_DIR

    return Environment(loader=FileSystemLoader(TEMPLATES_DIR), undefined=StrictUndefined,
                       keep_trailing_newline=True, autoescape=False, trim_blocks=True, lstrip_blocks=True)


def render_unit(**unit: object) -> str:
    """A systemd unit from templates/r1nest.service.j2."""
    return _templates().get_template("r1nest.service.j2").render(**unit)


def render_user_data(boot: NodeBoot) -> str:
    """The cloud-init document for one node. Raises UserDataError if it would carry a secret
    or exceed EC2's size limit."""
    if not boot.engine_argv or not boot.doctor_argv:
        raise UserDataError("engine and doctor commands must not be empty")
    if not 0 <= boot.node_rank < boot.nodes:
        raise UserDataError(f"node rank {boot.node_rank} outside 0..{boot.nodes - 1}")
    files: list[dict[str, str]] = [
        {"path": "/etc/r1nest/engine.env", "permissions": "0644",
         "content": _env_lines([(k, v) for k, v in boot.engine_env if v != ENGINE_KEY_SENTINEL])},
        {"path": SECRETS_SCRIPT, "permissions": "0700", "content": _secrets_script(boot)},
    ]
    if boot.image_build:
        files.append({"path": IMAGE_SCRIPT, "permissions": "0700", "content": _image_script(boot)})
    if boot.is_head:
        files += [
            {"path": "/etc/r1nest/gateway.env", "permissions": "0644", "content": _env_lines(gateway_env(boot))},
            {"path": REGISTER_KEY_SCRIPT, "permissions": "0700",
             "content": _register_key_script(boot)},
        ]
    units = _units(boot)
    for name, unit in units:
        files.append({"path": f"/etc/systemd/system/{name}", "permissions": "0644",
                      "content": render_unit(**unit)})
    text = _templates().get_template("cloud-init.yaml.j2").render(
        boot=boot, files=files, units=[name for name, _ in units],
    )
    found = find_secrets(text)
    if found:
        raise UserDataError(f"user data would carry a secret ({', '.join(found)}); refusing to render it")
    if len(text.encode("utf-8")) > USER_DATA_LIMIT_BYTES:
        raise UserDataError(f"user data is {len(text.encode())} bytes; EC2 accepts {USER_DATA_LIMIT_BYTES}")
    return text
