"""The r1nest source bundle: the files of this checkout an instance needs to build the service image.

With no `r1nest:image` configured, `pulumi up` packs the build context of `images/*.Dockerfile`
(pyproject.toml, README.md, service/, templates/, scripts/ and images/ itself) into one gzip'd
tarball, uploads it as a private S3 object, and the instance builds the image from it at first
boot on top of the engine project's official image (pinned by digest in the Dockerfile).

README.md goes in as a one-line stand-in (pyproject.toml names it; pip only needs it to exist) and
images/ as its Dockerfiles only, so that a change to the documentation does not replace GPU
instances. The tarball is reproducible: entries sorted, timestamps, owners and modes normalised, gzip header
without a time. So its SHA-256 is a content hash of the packaged files: the same checkout gives
the same bytes (and the same launch inputs: nothing is replaced), any changed, added or removed
file gives another hash (the instances are replaced and build the new code).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from r1nest.errors import ConfigError

# What the Dockerfiles COPY (images/*.Dockerfile.dockerignore keeps the same set), plus images/.
BUNDLE_PATHS = ("pyproject.toml", "README.md", "service", "templates", "scripts", "images")
EXCLUDED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "node_modules"}
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".egg-info")
EXCLUDED_NAMES = {".DS_Store", ".env"}
README_STANDIN = b"# r1nest\n\nThe documentation is README.md of the r1nest repository.\n"
IMAGE_FILE_SUFFIXES = (".Dockerfile", ".Dockerfile.dockerignore")
MAX_BUNDLE_BYTES = 32 * 1024 * 1024  # the checkout's code is about 1 MB packed; a bigger one is a mistake


@dataclass(frozen=True)
class Bundle:
    data: bytes  # the .tar.gz
    sha256: str  # hex digest of `data`
    files: tuple[str, ...]  # the packaged paths, relative to the checkout

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    @property
    def object_key(self) -> str:
        """Content-addressed S3 key: a new checkout is a new object (and new launch inputs)."""
        return f"r1nest-source/{self.sha256}.tar.gz"

    def write(self, directory: Path) -> Path:
        """The bundle as a file named by its hash (what the upload reads); rewritten only when absent."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"r1nest-source-{self.sha256}.tar.gz"
        if not path.exists() or path.stat().st_size != len(self.data):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(self.data)
            tmp.replace(path)
        return path


def _excluded(path: Path) -> bool:
    return (
        path.name in EXCLUDED_NAMES
        or path.name in EXCLUDED_DIRS
        or path.name.endswith(EXCLUDED_SUFFIXES)
    )


def bundle_files(root: Path) -> list[Path]:
    """The files packed from checkout `root`, sorted (symlinks and special files are left out)."""
    missing = [name for name in BUNDLE_PATHS if not (root / name).exists()]
    if missing:
        raise ConfigError(
            f"{root} is not an r1nest checkout (no {', '.join(missing)}): run `pulumi up` from infra/aws "
            "of a checkout, or set r1nest:image to an image built from images/vllm.Dockerfile"
        )
    found: list[Path] = []
    for name in BUNDLE_PATHS:
        top = root / name
        if top.is_file():
            found.append(top)
            continue
        stack = [top]
        while stack:
            folder = stack.pop()
            for entry in folder.iterdir():
                if _excluded(entry) or entry.is_symlink():
                    continue
                if entry.is_dir():
                    stack.append(entry)
                elif entry.is_file() and (name != "images" or entry.name.endswith(IMAGE_FILE_SUFFIXES)):
                    found.append(entry)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def build_bundle(root: Path) -> Bundle:
    """The reproducible tarball of `root`'s bundle files."""
    root = root.resolve()
    files = bundle_files(root)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            data = README_STANDIN if path == root / "README.md" else path.read_bytes()
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size = len(data)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644
            tar.addfile(info, io.BytesIO(data))
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    data = packed.getvalue()
    if len(data) > MAX_BUNDLE_BYTES:
        raise ConfigError(
            f"the r1nest source bundle is {len(data) // 2**20} MiB (limit {MAX_BUNDLE_BYTES // 2**20} MiB): "
            "remove large files from service/, templates/, scripts/ or images/"
        )
    return Bundle(data=data, sha256=hashlib.sha256(data).hexdigest(),
                  files=tuple(p.relative_to(root).as_posix() for p in files))
