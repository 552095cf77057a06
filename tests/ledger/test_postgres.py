"""PostgreSQL specifics: versioned migrations (idempotent, safe when processes start together),
the settings and the CLI, the URL's password kept out of every message, outages (the server
stopped, a lock held past the statement timeout, no free pool connection) as StoreUnavailable and
the recovery without a restart, bugs as bare StoreError, the database's own backstops, and callers
that stop waiting."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from urllib.parse import quote

import asyncpg
import pytest
from r1nest.errors import ConfigError, InvalidLedgerArgument, StoreError, StoreUnavailable
from r1nest.ledger import open_store, postgres
from r1nest.ledger.postgres import LATEST_VERSION, MIGRATIONS, PostgresStore, describe_url
from r1nest.settings import Settings
from r1nest.testing.postgres import PostgresServer, free_port
from r1nest.testing.postgres import postgres_server as own_postgres_server

T0 = 1_700_000_000.0
KEY_ID = "0123456789ab"


async def new_store(url: str, credits: int = 100, **kw) -> PostgresStore:
    store = PostgresStore(url, **kw)
    await store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="t", credits=credits, expires_at=None, now=T0)
    return store


async def assert_consistent(store: PostgresStore, expected: int) -> None:
    assert await store.balance(KEY_ID) == expected
    assert sum(p.credits for p in await store.postings(KEY_ID)) == expected


def every_operation(store: PostgresStore, reservation_id: str = "f" * 32) -> list:
    return [
        store.get_key(KEY_ID),
        store.list_keys(),
        store.balance(KEY_ID),
        store.create_key(key_id="ba0ba0ba0ba0", key_hash="f" * 64, name="", credits=1, expires_at=None, now=T0),
        store.set_key_limits(KEY_ID, max_concurrency=2, rate_limit_rpm=None),
        store.revoke_key(KEY_ID),
        store.topup(KEY_ID, 5, idempotency_key="t", now=T0),
        store.reserve(KEY_ID, 5, ttl_s=60, now=T0),
        store.settle(reservation_id, 1, now=T0),
        store.void(reservation_id, now=T0),
        store.sweep_expired(now=T0),
        store.postings(KEY_ID),
        store.usage(key_id=None, since=T0, until=T0 + 60, bucket_s=60),
    ]


# migrations -------------------------------------------------------------------------------------


async def test_first_use_migrates_and_records_each_version_once(postgres_url: str) -> None:
    store = await new_store(postgres_url)
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch("SELECT version, description FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["description"]) for r in rows] == [(v, d) for v, d, _ in MIGRATIONS]
        tables = {r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert tables == {"schema_migrations", "keys", "reservations", "postings", "topups"}
        functions = {r[0] for r in await conn.fetch("SELECT proname FROM pg_proc WHERE proname LIKE 'r1nest_%'")}
        assert functions == {"r1nest_reserve", "r1nest_close", "r1nest_topup", "r1nest_sweep"}
    finally:
        await conn.close()
    assert await store.migrate() == []  # idempotent
    assert await store.schema_version() == LATEST_VERSION
    await store.close()
    # a new process (a new store) on a migrated database applies nothing and keeps the data
    again = PostgresStore(postgres_url)
    assert await again.migrate() == []
    await assert_consistent(again, 100)
    await again.close()


def test_processes_migrating_together_apply_each_version_once(postgres_server: PostgresServer) -> None:
    """Four `r1nest ledger migrate` at once on an empty database (gateways starting together do
    the same on first use): one applies the migrations, the others wait and apply nothing."""
    url = postgres_server.create_database("migrate_together")
    env = {"PATH": "/usr/bin:/bin", "R1NEST_STORE": "postgres", "R1NEST_DATABASE_URL": url}
    children = [
        subprocess.Popen([sys.executable, "-m", "r1nest", "ledger", "migrate"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(4)
    ]
    outputs = [child.communicate(timeout=120) for child in children]
    for child, (out, err) in zip(children, outputs):
        assert child.returncode == 0, err
        assert postgres_server.password not in out + err
    lines = sorted(out.strip() for out, _ in outputs)
    described = describe_url(url)
    assert lines.count(f"{described}: schema at version {LATEST_VERSION} of {LATEST_VERSION} (nothing to apply)") == 3
    assert lines.count(
        f"{described}: schema at version {LATEST_VERSION} of {LATEST_VERSION} (applied "
        + ", ".join(str(v) for v, _, _ in MIGRATIONS) + ")"
    ) == 1
    assert postgres_server.psql("SELECT count(*) FROM schema_migrations", "migrate_together") == str(len(MIGRATIONS))


async def test_a_failing_migration_leaves_the_previous_version(postgres_url: str, monkeypatch) -> None:
    broken = (*MIGRATIONS, (LATEST_VERSION + 1, "broken", "CREATE TABLE extra (x int); SELECT no_such_function();"))
    store = await new_store(postgres_url)
    monkeypatch.setattr(postgres, "MIGRATIONS", broken)
    with pytest.raises(StoreError) as caught:
        await store.migrate()
    assert not isinstance(caught.value, StoreUnavailable)  # a bug, not an outage
    monkeypatch.undo()
    assert await store.schema_version() == LATEST_VERSION
    conn = await asyncpg.connect(postgres_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('extra')") is None  # rolled back whole
    finally:
        await conn.close()
    await assert_consistent(store, 100)
    await store.close()


def test_ledger_migrate_for_other_stores_has_nothing_to_run(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "r1nest", "ledger", "migrate"], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "R1NEST_DATA_DIR": str(tmp_path)},
    )
    assert done.returncode == 0 and "nothing to run for the sqlite ledger" in done.stdout


# settings, the URL and its password ---------------------------------------------------------------


async def test_open_store_builds_a_postgres_store(postgres_url: str) -> None:
    store = open_store(Settings(store="postgres", database_url=postgres_url, database_pool_size=3))
    assert isinstance(store, PostgresStore) and store.pool_size == 3
    assert await store.list_keys() == []
    await store.close()


def test_settings_read_the_url_as_a_secret(monkeypatch) -> None:
    from r1nest.settings import load_settings

    monkeypatch.setenv("R1NEST_STORE", "postgres")
    monkeypatch.setenv("R1NEST_DATABASE_URL", "postgresql://app:hunter2-secret@db.internal:5432/ledger")
    settings = load_settings()
    assert settings.database_pool_size == 10
    assert "hunter2-secret" not in repr(settings) and "hunter2-secret" not in str(settings.model_dump())
    store = open_store(settings)
    assert "hunter2-secret" not in repr(store) + store.description
    assert store.description == "postgresql://app@db.internal:5432/ledger"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (None, "needs database_url"),
        ("mysql://app:hunter2-secret@db/ledger", "must start with postgresql://"),
        ("postgresql://app:hunter2-secret@db:5432", "names no database"),
        ("postgresql://app:hunter2-secret@db:port/ledger", "not a valid URL"),
    ],
)
def test_a_bad_url_is_a_config_error_without_the_password(url, message) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        open_store(Settings(store="postgres", database_url=url))
    assert "hunter2-secret" not in str(caught.value)


async def test_errors_and_logs_never_show_the_password(postgres_server: PostgresServer, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    url = postgres_server.create_database("quiet")
    store = await new_store(url)  # migrates: logs a line
    wrong = url.replace(quote(postgres_server.password, safe=""), "wrong-password-x")
    for bad_url in (wrong, url.rsplit("/", 1)[0] + "/no_such_database",
                    f"postgresql://r1nest:{postgres_server.password}@127.0.0.1:{free_port()}/quiet"):
        bad = PostgresStore(bad_url)
        with pytest.raises(StoreUnavailable) as caught:
            await bad.balance(KEY_ID)
        assert postgres_server.password not in str(caught.value) and "wrong-password-x" not in str(caught.value)
        await bad.close()
    assert "applied migration" in caplog.text
    assert postgres_server.password not in caplog.text
    await store.close()


def test_without_asyncpg_the_postgres_store_is_a_config_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # import fails
    with pytest.raises(ConfigError, match="needs asyncpg"):
        PostgresStore("postgresql://app@db/ledger")


# outages: the database cannot answer -> StoreUnavailable (HTTP 503), and recovery --------------


async def test_a_stopped_server_is_store_unavailable_and_the_store_recovers_when_it_is_back() -> None:
    """pg_ctl stop -m fast: pooled connections are terminated and new ones refused. The same store
    object works again once the server is back: the pool reconnects by itself."""
    with own_postgres_server() as server:
        url = server.create_database("outage")
        store = await new_store(url, credits=100)
        reservation = await store.reserve(KEY_ID, 10, ttl_s=60, now=T0)
        await asyncio.to_thread(server.stop)
        started = time.monotonic()
        for call in every_operation(store, reservation.reservation_id):
            with pytest.raises(StoreUnavailable):
                await call
        assert time.monotonic() - started < 30  # refused at once, not after long timeouts
        await asyncio.to_thread(server.start)
        assert await store.balance(KEY_ID) == 90  # nothing refused above changed anything
        assert await store.settle(reservation.reservation_id, 4, now=T0) == 96
        assert await store.topup(KEY_ID, 5, idempotency_key="t", now=T0) == 101
        await assert_consistent(store, 101)
        await store.close()


async def test_a_lock_held_past_the_statement_timeout_is_store_unavailable(postgres_url: str, monkeypatch) -> None:
    """Another session holds the key row (a long transaction, a migration by hand): operations
    that need it give up after the statement timeout; reads go on."""
    monkeypatch.setattr(postgres, "STATEMENT_TIMEOUT_S", 0.5)
    store = await new_store(postgres_url, credits=100)
    reservation = await store.reserve(KEY_ID, 10, ttl_s=60, now=T0)
    blocker = await asyncpg.connect(postgres_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT * FROM keys WHERE key_id = $1 FOR UPDATE", KEY_ID)
        for call in (
            store.reserve(KEY_ID, 5, ttl_s=60, now=T0),
            store.settle(reservation.reservation_id, 3, now=T0),
            store.topup(KEY_ID, 5, idempotency_key="t", now=T0),
            store.revoke_key(KEY_ID),
        ):
            with pytest.raises(StoreUnavailable):
                await call
        assert await store.balance(KEY_ID) == 90  # readers are not locked out
        await transaction.rollback()
    finally:
        await blocker.close()
    # the lock gone, the same calls go through: the refused ones changed nothing
    assert await store.topup(KEY_ID, 5, idempotency_key="t", now=T0) == 95
    assert await store.settle(reservation.reservation_id, 3, now=T0) == 102
    await assert_consistent(store, 102)
    await store.close()


async def test_no_free_connection_in_time_is_store_unavailable(postgres_url: str, monkeypatch) -> None:
    monkeypatch.setattr(postgres, "ACQUIRE_TIMEOUT_S", 0.3)
    store = await new_store(postgres_url, credits=100, pool_size=1)
    blocker = await asyncpg.connect(postgres_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT * FROM keys WHERE key_id = $1 FOR UPDATE", KEY_ID)
        waiting = asyncio.ensure_future(store.reserve(KEY_ID, 5, ttl_s=60, now=T0))  # holds the one connection
        await asyncio.sleep(0.2)
        with pytest.raises(StoreUnavailable, match="no free connection"):
            await store.balance(KEY_ID)
        await transaction.rollback()
        assert (await waiting).remaining_credits == 95
    finally:
        await blocker.close()
    assert await store.balance(KEY_ID) == 95
    await store.close()


async def test_a_closed_store_refuses_work(postgres_url: str) -> None:
    store = await new_store(postgres_url)
    await store.close()
    await store.close()  # twice is fine
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.balance(KEY_ID)


# bugs and backstops ------------------------------------------------------------------------------


async def test_a_statement_postgres_refuses_is_a_bug_not_an_outage(postgres_url: str) -> None:
    store = await new_store(postgres_url)
    for statement in ("SELECT * FROM no_such_table", "UPDATE keys SET remaining_credits = -1"):
        with pytest.raises(StoreError) as caught:
            await store._run("execute", statement)
        assert not isinstance(caught.value, (StoreUnavailable, InvalidLedgerArgument))
    await assert_consistent(store, 100)
    await store.close()


async def test_the_database_refuses_a_second_close_and_a_negative_balance_by_itself(postgres_url: str) -> None:
    """The constraints under the functions: were a function wrong, the transaction would fail
    instead of closing a reservation twice or spending credits that are not there."""
    store = await new_store(postgres_url, credits=100)
    reservation = await store.reserve(KEY_ID, 60, ttl_s=60, now=T0)
    await store.void(reservation.reservation_id, now=T0)
    conn = await asyncpg.connect(postgres_url)
    try:
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO postings (key_id, kind, credits, at, reservation_id, credits_charged)"
                " VALUES ($1, 'settle', 0, $2, $3, 60)", KEY_ID, T0, reservation.reservation_id,
            )
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE keys SET remaining_credits = remaining_credits - 101")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE keys SET open_reservations = open_reservations - 1")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE reservations SET credits_charged = 61, state = 'settled'")
    finally:
        await conn.close()
    await assert_consistent(store, 100)
    await store.close()


async def test_limits_and_open_reservations_are_counted_on_the_key_row(postgres_url: str) -> None:
    store = await new_store(postgres_url, credits=100)
    first = await store.reserve(KEY_ID, 1, ttl_s=10, now=T0)
    await store.reserve(KEY_ID, 1, ttl_s=10, now=T0)
    await store.settle(first.reservation_id, 1, now=T0)
    conn = await asyncpg.connect(postgres_url)
    try:
        row = await conn.fetchrow("SELECT open_reservations, rpm_window, rpm_count FROM keys")
        assert tuple(row) == (1, 1_699_999_980.0, 2)
        assert await store.sweep_expired(now=T0 + 10) == 1
        assert await conn.fetchval("SELECT open_reservations FROM keys") == 0
    finally:
        await conn.close()
    await store.close()


# event loops and callers that leave ------------------------------------------------------------


def test_one_store_used_from_successive_event_loops(postgres_url: str) -> None:
    """`asyncio.run` twice (a CLI does): each loop gets a pool of its own; closing from a loop
    other than the pool's does not raise."""
    store = PostgresStore(postgres_url)
    asyncio.run(store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="t", credits=5, expires_at=None, now=T0))
    assert asyncio.run(store.balance(KEY_ID)) == 5
    asyncio.run(store.close())


async def test_a_cancelled_reserve_gives_its_credits_back(postgres_url: str) -> None:
    store = await new_store(postgres_url, credits=100)
    task = asyncio.create_task(store.reserve(KEY_ID, 60, ttl_s=3600, now=T0))
    await asyncio.sleep(0)  # sent to the server
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 30
    while (kinds := [p.kind for p in await store.postings(KEY_ID)]) != ["grant", "reserve", "void"]:
        assert time.monotonic() < deadline, kinds
        await asyncio.sleep(0.02)
    await assert_consistent(store, 100)
    await store.close()
