"""`r1nest keys` against the local store (a temporary data dir) and against a running gateway's
admin API (`--url`): the real gateway app on uvicorn on loopback."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from r1nest.accounts import authenticate
from r1nest.errors import ConfigError, R1nestError, StoreUnavailable, UnknownKey
from r1nest.keys_cli import keys
from r1nest.ledger.sqlite import SqliteStore

ADMIN_KEY = "r1nadmin-0b0b0b0b0b0b-" + "B" * 43


def invoke(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(keys, [*args, "--data-dir", str(data_dir)], env=env)


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def in_store(data_dir: Path, operation):
    async def run():
        store = SqliteStore(data_dir / "ledger.sqlite3")
        try:
            return await operation(store)
        finally:
            await store.close()

    return asyncio.run(run())


# local store --------------------------------------------------------------------------------


def test_create_prints_a_working_key_once(tmp_path: Path) -> None:
    out = ok(invoke(tmp_path, "create", "--credits", "500", "--name", "alice"))
    key = out.strip().splitlines()[-1]
    record = in_store(tmp_path, lambda s: authenticate(s, key, now=time.time()))
    assert record is not None and record.name == "alice" and record.remaining_credits == 500
    assert f"Created key {record.key_id} (alice) with 500 credits." in out
    listing = ok(invoke(tmp_path, "list")) + ok(invoke(tmp_path, "list", "--json"))
    secret = key.split("-", 2)[2]
    assert secret not in listing and record.key_hash not in listing
    assert secret.encode() not in (tmp_path / "ledger.sqlite3").read_bytes()


def test_create_json_has_exactly_id_key_and_credits(tmp_path: Path) -> None:
    created = json.loads(ok(invoke(tmp_path, "create", "--credits", "42", "--json")))
    assert set(created) == {"id", "key", "remaining_credits"}
    assert created["remaining_credits"] == 42
    assert created["key"].startswith(f"r1n-{created['id']}-")


def test_create_with_expiry(tmp_path: Path) -> None:
    created = json.loads(ok(invoke(tmp_path, "create", "--credits", "1", "--expires-in", "2", "--json")))
    listed = json.loads(ok(invoke(tmp_path, "list", "--json")))["data"]
    assert listed[0]["expires_at"] == pytest.approx(time.time() + 2 * 86_400, abs=60)
    record = in_store(tmp_path, lambda s: authenticate(s, created["key"], now=time.time() + 3 * 86_400))
    assert record is None  # expired by then


def test_list_shows_keys_without_secrets(tmp_path: Path) -> None:
    assert "No keys yet" in ok(invoke(tmp_path, "list"))
    first = json.loads(ok(invoke(tmp_path, "create", "--credits", "10", "--name", "a", "--json")))
    second = json.loads(ok(invoke(tmp_path, "create", "--credits", "20", "--json")))
    ok(invoke(tmp_path, "revoke", second["id"]))
    data = json.loads(ok(invoke(tmp_path, "list", "--json")))["data"]
    assert [(d["id"], d["remaining_credits"], d["revoked"]) for d in data] == [
        (first["id"], 10, False), (second["id"], 20, True),
    ]
    assert set(data[0]) == {"id", "name", "created_at", "expires_at", "revoked", "remaining_credits",
                            "max_concurrency", "rate_limit_rpm"}
    text = ok(invoke(tmp_path, "list"))
    assert text.splitlines()[0].split() == ["ID", "NAME", "CREDITS", "CREATED", "EXPIRES", "STATUS", "CONCURRENCY", "RPM"]
    assert "revoked" in text and "active" in text
    assert first["key"] not in text and second["key"] not in text


def test_revoke_stops_the_key(tmp_path: Path) -> None:
    created = json.loads(ok(invoke(tmp_path, "create", "--credits", "10", "--json")))
    assert ok(invoke(tmp_path, "revoke", created["id"])).strip() == f"Revoked key {created['id']}."
    assert in_store(tmp_path, lambda s: authenticate(s, created["key"], now=time.time())) is None


def test_topup_is_idempotent_per_idempotency_key(tmp_path: Path) -> None:
    key_id = json.loads(ok(invoke(tmp_path, "create", "--credits", "10", "--json")))["id"]
    first = json.loads(ok(invoke(tmp_path, "topup", key_id, "5", "--idempotency-key", "order-17", "--json")))
    again = json.loads(ok(invoke(tmp_path, "topup", key_id, "5", "--idempotency-key", "order-17", "--json")))
    assert first == again == {"id": key_id, "remaining_credits": 15, "idempotency_key": "order-17"}
    out = ok(invoke(tmp_path, "topup", key_id, "7"))
    assert f"Key {key_id} now has 22 credits." in out
    generated = out.split("Idempotency key: ")[1].split()[0]
    assert len(generated) == 36  # a uuid, printed so a retry can reuse it
    retried = json.loads(ok(invoke(tmp_path, "topup", key_id, "7", "--idempotency-key", generated, "--json")))
    assert retried["remaining_credits"] == 22


@pytest.mark.parametrize(
    "args",
    [
        ["create", "--credits", "-5"],
        ["create", "--credits", "lots"],
        ["create", "--credits", str(2**53)],
        ["create"],
        ["create", "--credits", "1", "--expires-in", "0"],
        ["create", "--credits", "1", "--name", "n" * 201],
        ["topup", "0123456789ab", "0"],
        ["topup", "0123456789ab", "1.5"],
        ["topup", "0123456789ab", "1", "--idempotency-key", "has space"],
        ["revoke", "not-an-id"],
        ["topup", "ABCDEF012345", "3"],
        ["create", "--credits", "1", "--max-concurrency", "0"],
        ["create", "--credits", "1", "--max-concurrency", "none"],
        ["create", "--credits", "1", "--max-concurrency", "100001"],
        ["create", "--credits", "1", "--rate-limit-rpm", "-1"],
        ["create", "--credits", "1", "--rate-limit-rpm", "1.5"],
        ["limits", "0123456789ab", "--max-concurrency", "0"],
        ["limits", "0123456789ab", "--rate-limit-rpm", "lots"],
        ["limits", "0123456789ab", "--rate-limit-rpm", "10000001"],
        ["limits", "not-an-id", "--max-concurrency", "2"],
    ],
)
def test_bad_input_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    result = invoke(tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_a_whole_key_in_place_of_an_id_is_refused_without_echoing_it(tmp_path: Path) -> None:
    key = json.loads(ok(invoke(tmp_path, "create", "--credits", "1", "--json")))["key"]
    result = invoke(tmp_path, "revoke", key)
    assert result.exit_code == 2
    assert "not the key itself" in result.output and key not in result.output


@pytest.mark.parametrize(
    "command",
    [["revoke", "000000000000"], ["topup", "000000000000", "5"], ["limits", "000000000000", "--max-concurrency", "2"],
     ["limits", "000000000000"]],
)
def test_unknown_id_is_a_clear_error(tmp_path: Path, command: list[str]) -> None:
    result = invoke(tmp_path, *command)
    assert isinstance(result.exception, UnknownKey)
    assert str(result.exception) == "no key with id 000000000000"


def test_errors_reach_the_user_as_one_line_without_a_traceback(tmp_path: Path) -> None:
    """Through the real entry point: `error: ...` on stderr, exit 1, no stack trace."""
    done = subprocess.run(
        [sys.executable, "-m", "r1nest", "keys", "revoke", "000000000000", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "error: no key with id 000000000000"
    assert "Traceback" not in done.stderr + done.stdout


def test_create_with_limits_and_list_shows_them(tmp_path: Path) -> None:
    out = ok(invoke(tmp_path, "create", "--credits", "5", "--max-concurrency", "3", "--rate-limit-rpm", "120"))
    assert "at most 3 requests at once; at most 120 requests per minute." in out
    limited = out.split("Created key ")[1].split()[0]
    plain = json.loads(ok(invoke(tmp_path, "create", "--credits", "5", "--json")))["id"]
    record = in_store(tmp_path, lambda s: s.get_key(limited))
    assert (record.max_concurrency, record.rate_limit_rpm) == (3, 120)
    data = {d["id"]: d for d in json.loads(ok(invoke(tmp_path, "list", "--json")))["data"]}
    assert (data[limited]["max_concurrency"], data[limited]["rate_limit_rpm"]) == (3, 120)
    assert (data[plain]["max_concurrency"], data[plain]["rate_limit_rpm"]) == (None, None)
    rows = {line.split()[0]: line.split() for line in ok(invoke(tmp_path, "list")).splitlines()[1:]}
    assert rows[limited][-2:] == ["3", "120"] and rows[plain][-2:] == ["default", "default"]


def test_limits_sets_one_keeps_the_other_and_none_clears(tmp_path: Path) -> None:
    key_id = json.loads(ok(invoke(tmp_path, "create", "--credits", "5", "--json")))["id"]

    def stored() -> tuple[int | None, int | None]:
        record = in_store(tmp_path, lambda s: s.get_key(key_id))
        return record.max_concurrency, record.rate_limit_rpm

    shown = ok(invoke(tmp_path, "limits", key_id))
    assert shown.strip() == (f"Key {key_id}: concurrency: the deployment's default; "
                             "rate: the deployment's default.")
    assert stored() == (None, None)
    answer = json.loads(ok(invoke(tmp_path, "limits", key_id, "--max-concurrency", "4", "--json")))
    assert answer == {"id": key_id, "max_concurrency": 4, "rate_limit_rpm": None} and stored() == (4, None)
    ok(invoke(tmp_path, "limits", key_id, "--rate-limit-rpm", "60"))
    assert stored() == (4, 60)  # the concurrency limit was kept
    out = ok(invoke(tmp_path, "limits", key_id, "--max-concurrency", "none"))
    assert out.strip() == f"Key {key_id}: concurrency: the deployment's default; at most 60 requests per minute."
    assert stored() == (None, 60)
    ok(invoke(tmp_path, "limits", key_id, "--max-concurrency", "2", "--rate-limit-rpm", "NONE"))
    assert stored() == (2, None)
    assert json.loads(ok(invoke(tmp_path, "limits", key_id, "--json"))) == {
        "id": key_id, "max_concurrency": 2, "rate_limit_rpm": None,
    }


# a gateway's admin API (--url) -----------------------------------------------------------------


@pytest.fixture
def gateway_url(tmp_path: Path) -> Iterator[tuple[str, SqliteStore]]:
    with serve_gateway(tmp_path) as served:
        yield served


@contextmanager
def serve_gateway(tmp_path: Path) -> Iterator[tuple[str, SqliteStore]]:
    from r1nest.gateway.app import create_app
    from r1nest.gateway.upstream import UpstreamConfig
    from r1nest.settings import Settings
    from r1nest.testing.asgi_server import ServedApp

    settings = Settings(data_dir=tmp_path / "gateway")
    store = SqliteStore(settings.ledger_path)
    app = create_app(
        settings=settings, store=store, upstream=UpstreamConfig(url="http://127.0.0.1:9", served_model="m"),
        admin_key=ADMIN_KEY,
    )
    with ServedApp(app) as served:
        yield served.url, store
        served.call(store.close())


def remote(tmp_path: Path, url: str, *args: str, admin_key: str | None = ADMIN_KEY) -> Result:
    env = {"R1NEST_ADMIN_KEY": admin_key} if admin_key else {}
    return invoke(tmp_path / "client", *args, "--url", url, env=env)


def test_admin_api_round_trip(tmp_path: Path, gateway_url) -> None:
    url, _ = gateway_url
    created = json.loads(ok(remote(tmp_path, url, "create", "--credits", "100", "--name", "bob", "--json")))
    assert set(created) == {"id", "key", "remaining_credits"} and created["remaining_credits"] == 100
    key_id = created["id"]

    topped = json.loads(ok(remote(tmp_path, url, "topup", key_id, "11", "--idempotency-key", "inv-1", "--json")))
    assert topped["remaining_credits"] == 111
    again = json.loads(ok(remote(tmp_path, url, "topup", key_id, "11", "--idempotency-key", "inv-1", "--json")))
    assert again["remaining_credits"] == 111  # the gateway saw the same Idempotency-Key

    listed = ok(remote(tmp_path, url, "list", "--json"))
    assert created["key"] not in listed
    assert json.loads(listed)["data"][0]["remaining_credits"] == 111
    assert ok(remote(tmp_path, url, "revoke", key_id)).strip() == f"Revoked key {key_id}."
    assert json.loads(ok(remote(tmp_path, url, "list", "--json")))["data"][0]["revoked"] is True
    # the key really works against the gateway until revoked; now it is refused
    import httpx

    credits = httpx.get(url + "/v1/credits", headers={"Authorization": f"Bearer {created['key']}"})
    assert credits.status_code == 401
    assert not (tmp_path / "client" / "ledger.sqlite3").exists()  # --url never opened a local store


def test_admin_api_limits(tmp_path: Path, gateway_url) -> None:
    url, store = gateway_url
    created = json.loads(ok(remote(
        tmp_path, url, "create", "--credits", "10", "--max-concurrency", "2", "--rate-limit-rpm", "30", "--json",
    )))
    key_id = created["id"]
    listed = json.loads(ok(remote(tmp_path, url, "list", "--json")))["data"]
    assert [(d["id"], d["max_concurrency"], d["rate_limit_rpm"]) for d in listed] == [(key_id, 2, 30)]
    answer = json.loads(ok(remote(tmp_path, url, "limits", key_id, "--rate-limit-rpm", "none", "--json")))
    assert answer == {"id": key_id, "max_concurrency": 2, "rate_limit_rpm": None}  # the other one kept
    answer = json.loads(ok(remote(tmp_path, url, "limits", key_id, "--max-concurrency", "7", "--json")))
    assert answer == {"id": key_id, "max_concurrency": 7, "rate_limit_rpm": None}
    held = in_store(store.path.parent, lambda s: s.get_key(key_id))  # the gateway's ledger, read beside it
    assert (held.max_concurrency, held.rate_limit_rpm) == (7, None)
    unknown = remote(tmp_path, url, "limits", "000000000000", "--max-concurrency", "1")
    assert isinstance(unknown.exception, UnknownKey)


def test_admin_api_errors(tmp_path: Path, gateway_url) -> None:
    url, _ = gateway_url
    unknown = remote(tmp_path, url, "revoke", "000000000000")
    assert isinstance(unknown.exception, UnknownKey)
    wrong = remote(tmp_path, url, "list", admin_key="r1nadmin-0c0c0c0c0c0c-" + "C" * 43)
    assert isinstance(wrong.exception, R1nestError) and "refused the admin key" in str(wrong.exception)
    missing = remote(tmp_path, url, "list", admin_key=None)
    assert isinstance(missing.exception, ConfigError) and "R1NEST_ADMIN_KEY" in str(missing.exception)
    topup = remote(tmp_path, url, "topup", "000000000000", "5", "--idempotency-key", "k1")
    assert isinstance(topup.exception, UnknownKey)


def test_unreachable_url_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = remote(tmp_path, f"http://127.0.0.1:{port}", "list")
    assert isinstance(result.exception, R1nestError)
    assert f"cannot reach the gateway at http://127.0.0.1:{port}" in str(result.exception)
    topup = remote(tmp_path, f"http://127.0.0.1:{port}", "topup", "0123456789ab", "5", "--idempotency-key", "k9")
    assert "retry safely with --idempotency-key k9" in str(topup.exception)


@pytest.mark.parametrize("url", ["ftp://example.com", "example.com", "http://user:pw@host.example"])
def test_bad_url_is_a_config_error(tmp_path: Path, url: str) -> None:
    result = remote(tmp_path, url, "list")
    assert isinstance(result.exception, ConfigError)
    assert "pw" not in str(result.exception)


def test_a_url_without_an_admin_api_is_named(tmp_path: Path) -> None:
    from r1nest.testing.asgi_server import ServedApp
    from starlette.applications import Starlette

    with ServedApp(Starlette()) as served:
        result = remote(tmp_path, served.url, "list")
    assert "is this an r1nest gateway?" in str(result.exception)


def test_local_mode_follows_the_settings_to_dynamodb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """R1NEST_STORE=dynamodb: the same commands on the shared table (moto's server on loopback)."""
    from r1nest.ledger.dynamodb import create_table
    from r1nest.testing.dynamodb import FAKE_AWS_ENV, REGION, moto_dynamodb_server

    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with moto_dynamodb_server() as endpoint:
        create_table("keys-cli", REGION, endpoint_url=endpoint)
        env = {
            "R1NEST_STORE": "dynamodb", "R1NEST_DYNAMODB_TABLE": "keys-cli",
            "R1NEST_AWS_REGION": REGION, "R1NEST_DYNAMODB_ENDPOINT_URL": endpoint,
        }
        created = json.loads(ok(invoke(tmp_path, "create", "--credits", "9", "--json", env=env)))
        ok(invoke(tmp_path, "topup", created["id"], "1", "--idempotency-key", "a", env=env))
        ok(invoke(tmp_path, "topup", created["id"], "1", "--idempotency-key", "a", env=env))
        listed = json.loads(ok(invoke(tmp_path, "list", "--json", env=env)))["data"]
    assert [(d["id"], d["remaining_credits"]) for d in listed] == [(created["id"], 10)]
    assert not (tmp_path / "ledger.sqlite3").exists()


# the store cannot answer: one line, exit 1, never a traceback ---------------------------------


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Another connection holds `BEGIN EXCLUSIVE` on the ledger file."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


@pytest.fixture
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("r1nest.ledger.sqlite.BUSY_TIMEOUT_MS", 200)


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`r1nest keys ...` through the real entry point (`r1nest.cli.main`), in this process so
    that the busy timeout can be short: (exit code, stdout, stderr)."""
    from r1nest.cli import main

    monkeypatch.setattr(sys, "argv", ["r1nest", "keys", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def assert_one_line_error(code: int, out: str, err: str, *expected: str) -> None:
    assert code == 1, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in out + err
    for text in expected:
        assert text in err, err


def test_a_locked_local_ledger_is_a_one_line_error(
    tmp_path: Path, short_busy_timeout, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key_id = json.loads(ok(invoke(tmp_path, "create", "--credits", "5", "--json")))["id"]
    with locked(tmp_path / "ledger.sqlite3"):
        created = run_main(monkeypatch, capsys, "create", "--credits", "1", "--data-dir", str(tmp_path))
        topped = run_main(monkeypatch, capsys, "topup", key_id, "3", "--idempotency-key", "p1", "--data-dir", str(tmp_path))
        revoked = run_main(monkeypatch, capsys, "revoke", key_id, "--data-dir", str(tmp_path))
    assert_one_line_error(*created, "the key store cannot be reached now", "database is locked", "retry shortly")
    assert_one_line_error(*topped, "database is locked", "retry safely with --idempotency-key p1")
    assert_one_line_error(*revoked, "database is locked")
    listed = json.loads(ok(invoke(tmp_path, "list", "--json")))["data"]
    assert [(d["id"], d["remaining_credits"], d["revoked"]) for d in listed] == [(key_id, 5, False)]  # nothing applied


def test_an_unreachable_dynamodb_table_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from r1nest.testing.dynamodb import FAKE_AWS_ENV, REGION

    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setattr("r1nest.ledger.dynamodb.MAX_ATTEMPTS", 1)  # no backoff: the point is the message
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for name, value in {
        "R1NEST_STORE": "dynamodb", "R1NEST_DYNAMODB_TABLE": "keys-cli", "R1NEST_AWS_REGION": REGION,
        "R1NEST_DYNAMODB_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }.items():
        monkeypatch.setenv(name, value)
    listed = run_main(monkeypatch, capsys, "list", "--data-dir", str(tmp_path))
    assert_one_line_error(*listed, "the key store cannot be reached now", f"127.0.0.1:{port}")


@pytest.fixture
def gateway_with_short_busy_timeout(tmp_path: Path, short_busy_timeout) -> Iterator[tuple[str, SqliteStore]]:
    with serve_gateway(tmp_path) as served:
        yield served


def test_a_gateway_whose_ledger_is_locked_is_a_one_line_error(
    tmp_path: Path, gateway_with_short_busy_timeout, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, store = gateway_with_short_busy_timeout
    monkeypatch.setenv("R1NEST_ADMIN_KEY", ADMIN_KEY)
    with locked(store.path):
        created = remote(tmp_path, url, "create", "--credits", "1")
        assert isinstance(created.exception, StoreUnavailable)
        assert "(503)" in str(created.exception) and "retry in 5 s" in str(created.exception)
        code, out, err = run_main(monkeypatch, capsys, "create", "--credits", "1", "--url", url, "--data-dir", str(tmp_path))
    assert_one_line_error(code, out, err, f"the gateway at {url} cannot answer POST /admin/keys now (503)", "database is locked")
    assert json.loads(ok(remote(tmp_path, url, "list", "--json")))["data"] == []
