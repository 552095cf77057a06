"""Files that hold secrets or state: written whole and readable by their owner only."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_private_text(path: Path, text: str) -> Path:
    """Writes `text` to `path` (mode 0600, parent created 0700) through a temporary file in the
    same folder, so a reader sees the old content or the new, never half of it."""
    path = path.expanduser()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
