"""The files a deployment keeps in its data dir, and how files that hold secrets or state are written.

One home for their names, their readers and their writes:
- `api_key`: the deployment's ApiKey, one line (`r1nest serve` writes the demo key it creates,
  the AWS boot writes the key Pulumi generated; the overview page shows it);
- `admin_key`: the admin key, generated once when the settings name none;
- `serve.json`: where `r1nest serve` runs things (gateway URL, engine, models); no secret;
- `modal/<app>.api_key`: the ApiKey of a Modal deployment, kept where `r1nest overview` looks;
- `ledger.sqlite3`: the SQLite ledger (its name only: the ledger's store opens and writes it).

Every write is whole (a temporary file in the same folder, then renamed or linked into place)
and private (mode 0600, parent folder created 0700). Readers answer None for a file that is not
there; a file that cannot be read or holds nothing usable is a ConfigError that names it.

Plain Python only: the Modal app imports this module without r1nest's dependencies.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from r1nest.errors import ConfigError

API_KEY_FILE = "api_key"
ADMIN_KEY_FILE = "admin_key"
SERVE_STATE_FILE = "serve.json"
LEDGER_FILE = "ledger.sqlite3"  # the SQLite ledger (r1nest.ledger.sqlite owns what is inside)
MODAL_KEYS_DIR = "modal"
MAX_KEY_FILE_BYTES = 1024
MAX_STATE_FILE_BYTES = 1024 * 1024


# -- writes --------------------------------------------------------------------------------------


def write_private_text(path: Path, text: str, *, replace: bool = True) -> Path:
    """Writes `text` to `path` (mode 0600, parent created 0700) through a temporary file in the
    same folder, so a reader sees the old content or the new, never half of it.

    With `replace=False` an existing file is kept: the first writer wins, and two processes that
    race both read what it wrote. ConfigError naming the file when it cannot be written."""
    path = path.expanduser()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            if replace:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    return path


def write_private_files(folder: Path, files: dict[str, str]) -> None:
    """Each of `files` (name -> text) written whole into `folder`, which is made private (0700)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create {folder}: {exc.strerror}") from None
    for name, text in files.items():
        write_private_text(folder / name, text)


def make_private(path: Path) -> None:
    """Takes away group and world permissions from an existing file (a key left readable)."""
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot make {path} private: {exc.strerror}") from None


# -- key files -----------------------------------------------------------------------------------


def read_key_file(path: Path, *, what: str = "API key", if_empty: str = "") -> str | None:
    """The key kept in `path` (its first MAX_KEY_FILE_BYTES, stripped), or None when there is no
    such file. ConfigError naming the file when it cannot be read or is empty (`if_empty` is
    added to that message: what to do about it)."""
    path = path.expanduser()
    try:
        with open(path, encoding="utf-8") as handle:
            value = handle.read(MAX_KEY_FILE_BYTES).strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ConfigError(f"cannot read the {what} file {path}: {reason}") from None
    if not value:
        raise ConfigError(f"the {what} file {path} is empty" + (f"; {if_empty}" if if_empty else ""))
    return value


def write_key_file(path: Path, key: str) -> Path:
    """Writes a key with owner-only permissions (the file holds a secret)."""
    return write_private_text(path, key + "\n")


def read_admin_key_file(data_dir: Path) -> str | None:
    """The admin key stored in the data dir, or None when none was generated yet. A key file
    that others may read is made private first."""
    path = Path(data_dir).expanduser() / ADMIN_KEY_FILE
    make_private(path)  # never leave the admin key readable by others
    return read_key_file(path, what="admin key", if_empty="delete it to generate a new admin key")


def create_admin_key_file(data_dir: Path, plaintext: str) -> str:
    """Stores `plaintext` as the admin key unless one is already stored; returns the stored key
    (when two processes start at once, both get the one that was stored first)."""
    write_private_text(Path(data_dir).expanduser() / ADMIN_KEY_FILE, plaintext + "\n", replace=False)
    stored = read_admin_key_file(data_dir)
    assert stored is not None, "the admin key file was just written"
    return stored


def modal_key_file(data_dir: Any, app_name: str) -> Path:
    """Where the ApiKey of a Modal deployment is kept locally when the key file is not named."""
    return Path(data_dir).expanduser() / MODAL_KEYS_DIR / f"{app_name}.{API_KEY_FILE}"


# -- serve.json ----------------------------------------------------------------------------------


def read_serve_state(data_dir: Path) -> dict[str, Any]:
    """`r1nest serve`'s data_dir/serve.json (where things run; no secret), or {} when absent."""
    path = Path(data_dir).expanduser() / SERVE_STATE_FILE
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read(MAX_STATE_FILE_BYTES))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        raise ConfigError(f"{path} is not readable JSON; is r1nest serve's data dir intact?") from None
    return data if isinstance(data, dict) else {}


def write_serve_state(data_dir: Path, state: dict[str, Any]) -> None:
    write_private_text(Path(data_dir) / SERVE_STATE_FILE, json.dumps(state, indent=1))


def remove_serve_state(data_dir: Path) -> None:
    (Path(data_dir) / SERVE_STATE_FILE).unlink(missing_ok=True)
