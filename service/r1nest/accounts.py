"""API keys on top of a ledger store: create (plaintext shown once), authenticate, admin key.

The store keeps only `sha256(key)`; `authenticate` looks the key up by its public id and compares
digests in constant time. The admin key is not in the store: it comes from settings, or is
generated once into `data_dir/admin_key` (mode 0600).
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import Any

from r1nest.errors import ConfigError, InvalidLedgerArgument
from r1nest.keys import ADMIN_PREFIX, digests_equal, hash_key, new_key, parse_key_id
from r1nest.ledger import rules
from r1nest.ledger.base import KeyRecord, Store
from r1nest.settings import Settings

ADMIN_KEY_FILE = "admin_key"
_MAX_ADMIN_KEY_FILE_BYTES = 1024


async def create_api_key(
    store: Store, *, name: str, credits: int, expires_at: float | None = None, now: float,
    max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
) -> tuple[KeyRecord, str]:
    """A new key with `credits` and its own limits (None: the deployment's defaults); returns its
    record and the plaintext, which nothing keeps. InvalidLedgerArgument for an expiry that is
    not finite unix seconds in the future, or a limit that is not a positive whole number."""
    expires_at = rules.check_expires_at(expires_at)
    if expires_at is not None and expires_at <= now:
        raise InvalidLedgerArgument("a key's expiry must be in the future")
    key_id, plaintext = new_key()
    record = await store.create_key(
        key_id=key_id, key_hash=hash_key(plaintext), name=name, credits=credits,
        expires_at=expires_at, now=now, max_concurrency=max_concurrency, rate_limit_rpm=rate_limit_rpm,
    )
    return record, plaintext


async def authenticate(store: Store, plaintext: str, *, now: float) -> KeyRecord | None:
    """The key's record if `plaintext` is a live key; None for malformed, unknown, wrong,
    revoked or expired keys alike (the caller answers 401 for all of them)."""
    key_id = parse_key_id(plaintext)
    if key_id is None or plaintext.startswith(ADMIN_PREFIX + "-"):
        return None
    record = await store.get_key(key_id)
    if record is None:
        return None
    if not digests_equal(record.key_hash, hash_key(plaintext)):
        return None
    return record if record.usable(now) else None


def ensure_admin_key(settings: Settings) -> str:
    """The admin key: `settings.admin_key` when set, else the one stored in the data dir,
    generated there (0600) the first time. Safe when two processes start at once."""
    if settings.admin_key is not None:
        value = settings.admin_key.get_secret_value().strip()
        if not value:
            raise ConfigError("admin_key is set but empty")
        return value
    data_dir = Path(settings.data_dir)
    path = data_dir / ADMIN_KEY_FILE
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            _write_new_admin_key(path)
        return _read_admin_key(path)
    except OSError as exc:
        raise ConfigError(f"cannot read or create the admin key in {data_dir}: {exc.strerror}") from None


def read_admin_key(settings: Settings) -> str | None:
    """The admin key if one is configured or already stored; never generates one (for clients
    such as `r1nest keys --url`, which must not invent a key the gateway does not know)."""
    if settings.admin_key is not None:
        return settings.admin_key.get_secret_value().strip() or None
    path = Path(settings.data_dir) / ADMIN_KEY_FILE
    try:
        return _read_admin_key(path) if path.exists() else None
    except OSError:
        return None


def _write_new_admin_key(path: Path) -> None:
    # Written whole into a private temporary file, then linked into place: a reader never sees
    # a half-written key, and when two processes race, the first link wins and both read it.
    _, plaintext = new_key(ADMIN_PREFIX)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(plaintext + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def _read_admin_key(path: Path) -> str:
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)  # never leave the admin key readable by others
    with open(path, encoding="ascii") as handle:
        value = handle.read(_MAX_ADMIN_KEY_FILE_BYTES).strip()
    if not value:
        raise ConfigError(f"{path} is empty; delete it to generate a new admin key")
    return value


def key_json(record: KeyRecord) -> dict[str, Any]:
    """A key as the admin API and `r1nest keys list --json` show it: never its hash or secret.
    `max_concurrency` and `rate_limit_rpm` are the key's own limits (null: the deployment's
    defaults apply). Always valid JSON: an expiry a store took before expiries were checked to be finite shows
    as what it does (+Infinity: never expires, null; NaN or -Infinity: never usable, 0)."""
    expires_at = record.expires_at
    if expires_at is not None and not math.isfinite(expires_at):
        expires_at = None if expires_at > 0 else 0.0
    return {
        "id": record.key_id,
        "name": record.name,
        "created_at": record.created_at,
        "expires_at": expires_at,
        "revoked": record.revoked,
        "remaining_credits": record.remaining_credits,
        "max_concurrency": record.max_concurrency,
        "rate_limit_rpm": record.rate_limit_rpm,
    }
