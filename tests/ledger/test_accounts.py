"""The key service: keys shown once and stored hashed, authentication, the admin key file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr
from r1nest.accounts import (
    authenticate,
    create_api_key,
    ensure_admin_key,
    read_admin_key,
)
from r1nest.errors import ConfigError, InvalidLedgerArgument
from r1nest.files import ADMIN_KEY_FILE
from r1nest.keys import hash_key, parse_key_id
from r1nest.ledger.memory import MemoryStore
from r1nest.ledger.sqlite import SqliteStore
from r1nest.settings import Settings

T0 = 1_700_000_000.0


async def test_a_created_key_authenticates_and_only_its_hash_is_kept(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ledger.sqlite3")
    record, plaintext = await create_api_key(store, name="alice", credits=7, now=T0)
    assert parse_key_id(plaintext) == record.key_id
    assert record.key_hash == hash_key(plaintext) and record.remaining_credits == 7
    assert await authenticate(store, plaintext, now=T0 + 1) == record
    await store.close()
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert plaintext.encode() not in on_disk
    assert plaintext.split("-", 2)[2].encode() not in on_disk
    assert record.key_hash.encode() in on_disk


async def test_every_kind_of_bad_key_is_refused_alike() -> None:
    store = MemoryStore()
    record, plaintext = await create_api_key(store, name="", credits=1, expires_at=T0 + 100, now=T0)
    other_secret = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")  # same id, wrong secret
    unknown_id = "r1n-ffffffffffff-" + plaintext.split("-", 2)[2]
    admin_shaped = plaintext.replace("r1n-", "r1nadmin-", 1)
    for bad in ["", "garbage", plaintext + "x", " " + plaintext, other_secret, unknown_id, admin_shaped]:
        assert await authenticate(store, bad, now=T0) is None, bad
    assert await authenticate(store, plaintext, now=T0 + 100) is None  # expired
    assert await authenticate(store, plaintext, now=T0 + 99) is not None
    await store.revoke_key(record.key_id)
    assert await authenticate(store, plaintext, now=T0) is None  # revoked


async def test_expiry_in_the_past_is_refused() -> None:
    with pytest.raises(InvalidLedgerArgument):
        await create_api_key(MemoryStore(), name="", credits=1, expires_at=T0, now=T0)


@pytest.mark.parametrize("expires_at", [float("nan"), float("inf"), 10**400], ids=["nan", "inf", "10**400"])
async def test_an_expiry_that_is_not_finite_is_refused(expires_at) -> None:
    """NaN compares False with `now`, so `expires_at <= now` alone let it through."""
    store = MemoryStore()
    with pytest.raises(InvalidLedgerArgument):
        await create_api_key(store, name="", credits=1, expires_at=expires_at, now=T0)
    assert await store.list_keys() == []


async def test_a_key_is_created_with_its_limits_and_lists_them(tmp_path: Path) -> None:
    from r1nest.accounts import key_json

    store = SqliteStore(tmp_path / "ledger.sqlite3")
    record, _ = await create_api_key(store, name="team", credits=9, now=T0, max_concurrency=4, rate_limit_rpm=90)
    stored = await store.get_key(record.key_id)
    assert (stored.max_concurrency, stored.rate_limit_rpm) == (4, 90)
    listed = key_json(stored)
    assert (listed["max_concurrency"], listed["rate_limit_rpm"]) == (4, 90)
    assert set(listed) == {
        "id", "name", "created_at", "expires_at", "revoked", "remaining_credits", "max_concurrency", "rate_limit_rpm",
    }
    default, _ = await create_api_key(store, name="", credits=1, now=T0)
    assert (key_json(default)["max_concurrency"], key_json(default)["rate_limit_rpm"]) == (None, None)
    with pytest.raises(InvalidLedgerArgument):
        await create_api_key(store, name="", credits=1, now=T0, max_concurrency=0)
    assert len(await store.list_keys()) == 2
    await store.close()


def test_key_json_is_valid_json_for_an_expiry_stored_before_the_checks() -> None:
    """A row written before expiries were checked (Infinity, NaN) still lists as JSON."""
    import json

    from r1nest.accounts import key_json
    from r1nest.ledger.base import KeyRecord

    def strict(value: object) -> object:
        return json.loads(json.dumps(value, allow_nan=False))

    never = KeyRecord("0123456789ab", "", "f" * 64, T0, float("inf"), False, 1)
    assert strict(key_json(never))["expires_at"] is None  # usable forever, as null means
    for unusable in (float("nan"), float("-inf")):
        record = KeyRecord("0123456789ab", "", "f" * 64, T0, unusable, False, 1)
        assert not record.usable(T0)
        assert strict(key_json(record))["expires_at"] == 0.0  # expired, as the record acts


def test_admin_key_from_settings_wins(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, admin_key=SecretStr("r1nadmin-set"))
    assert ensure_admin_key(settings) == "r1nadmin-set"
    assert not (tmp_path / ADMIN_KEY_FILE).exists()


def test_admin_key_is_generated_once_and_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    assert read_admin_key(settings) is None  # reading never generates
    first = ensure_admin_key(settings)
    assert first.startswith("r1nadmin-") and parse_key_id(first)
    path = tmp_path / "data" / ADMIN_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    assert ensure_admin_key(settings) == first == read_admin_key(settings)
    assert [p.name for p in path.parent.iterdir()] == [ADMIN_KEY_FILE]  # no temporary files left


def test_loose_admin_key_permissions_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / ADMIN_KEY_FILE
    path.write_text("r1nadmin-mine\n")
    os.chmod(path, 0o644)
    assert ensure_admin_key(Settings(data_dir=tmp_path)) == "r1nadmin-mine"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_empty_admin_key_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / ADMIN_KEY_FILE).write_text("\n")
    with pytest.raises(ConfigError, match="delete it"):
        ensure_admin_key(Settings(data_dir=tmp_path))


def test_processes_starting_together_agree_on_one_admin_key(tmp_path: Path) -> None:
    script = (
        "import sys; from r1nest.accounts import ensure_admin_key; from r1nest.settings import Settings; "
        "print(ensure_admin_key(Settings(data_dir=sys.argv[1])))"
    )
    children = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    keys = {child.communicate(timeout=60)[0].strip() for child in children}
    assert len(keys) == 1 and (tmp_path / ADMIN_KEY_FILE).read_text().strip() in keys


async def test_ledger_file_is_private(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "sub" / "ledger.sqlite3")
    await store.close()
    assert stat.S_IMODE((tmp_path / "sub" / "ledger.sqlite3").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "sub").stat().st_mode) == 0o700
