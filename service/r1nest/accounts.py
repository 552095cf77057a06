"""API keys on top of a ledger store: create (plaintext shown once), authenticate, the
deployment's demo key, the admin key.

The store keeps only `sha256(key)`; `authenticate` looks the key up by its public id and compares
digests in constant time. The admin key is not in the store: it comes from settings, or is
generated once into the data dir (r1nest.files keeps it, mode 0600).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from r1nest.errors import ConfigError, InvalidLedgerArgument
from r1nest.files import API_KEY_FILE, create_admin_key_file, read_admin_key_file, read_key_file, write_key_file
from r1nest.keys import ADMIN_PREFIX, digests_equal, hash_key, new_key, parse_key_id
from r1nest.ledger import rules
from r1nest.ledger.base import KeyRecord, Store
from r1nest.settings import Settings

log = logging.getLogger("r1nest.accounts")


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


async def ensure_demo_key(store: Store, data_dir: Path, *, credits: int, now: float) -> tuple[str, bool]:
    """(plaintext, created): the deployment's demo key, kept in the data dir's ApiKey file and
    created with `credits` on the first run.

    A key file whose key this ledger does not know (a new ledger) is replaced; a key that was
    revoked or has expired is kept: that was someone's decision.
    """
    path = Path(data_dir) / API_KEY_FILE
    existing = read_key_file(path)
    if existing is not None:
        key_id = parse_key_id(existing)
        if key_id is not None and await store.get_key(key_id) is not None:
            return existing, False
        log.warning("%s holds a key this ledger does not know: creating a new demo key", path)
    _, plaintext = await create_api_key(store, name="demo", credits=credits, now=now)
    write_key_file(path, plaintext)
    return plaintext, True


def ensure_admin_key(settings: Settings) -> str:
    """The admin key: `settings.admin_key` when set, else the one stored in the data dir,
    generated there (0600) the first time. Safe when two processes start at once."""
    if settings.admin_key is not None:
        value = settings.admin_key.get_secret_value().strip()
        if not value:
            raise ConfigError("admin_key is set but empty")
        return value
    stored = read_admin_key_file(settings.data_dir)
    if stored is not None:
        return stored
    _, plaintext = new_key(ADMIN_PREFIX)
    return create_admin_key_file(settings.data_dir, plaintext)


def read_admin_key(settings: Settings) -> str | None:
    """The admin key if one is configured or already stored; never generates one (for clients
    such as `r1nest keys --url`, which must not invent a key the gateway does not know)."""
    if settings.admin_key is not None:
        return settings.admin_key.get_secret_value().strip() or None
    return read_admin_key_file(settings.data_dir)


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
