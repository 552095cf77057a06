"""The PostgreSQL ledger: several gateways (replicas, Modal containers) share one database.

One round trip per operation. Reserve, settle/void, top-up and the sweep are PL/pgSQL functions
(installed by the migrations below) called with one `SELECT`; key creation is one statement (a
CTE). Nothing is read into Python and written back: every check and every write of an operation
runs inside the server, in one transaction.

Isolation: READ COMMITTED (PostgreSQL's default) plus row locks, not SERIALIZABLE. Each function
first locks the row whose invariant it guards (`SELECT ... FOR NO KEY UPDATE` on the key row for
reserve and top-up; the conditional `UPDATE ... WHERE state = 'pending'` on the reservation row
for a close), then reads that row's latest committed version and writes. Concurrent operations on
one key therefore queue on its row lock and each sees the effects of those before it, so a
balance check can never be made against a stale balance, and no operation needs retrying.
SERIALIZABLE would give the same outcomes but refuse conflicting transactions (SQLSTATE 40001),
which on a busy key means most of them, to be retried from Python. The CHECK constraints
(`remaining_credits BETWEEN 0 AND 2**53-1`, `credits_charged <= credits_reserved`,
`open_reservations >= 0`) and the unique index of close postings per reservation back the
rules up: a bug would abort its transaction, not spend money. docs/ledger.md has the reasoning
for each operation.

Per-key limits live on the key row, under the same lock as the balance: `open_reservations`
(up by reserve, down by the one close of each reservation) and a fixed-window counter
(`rpm_window`, `rpm_count`). A refused reservation returns before any write.

Errors: a server that cannot answer now (connection refused or lost, the server shutting down or
starting, too many connections, a pool with no free connection in time, a timed-out statement, a
read-only standby, refused credentials, a missing database) raises StoreUnavailable
(`_translate`); the pool reconnects by itself once the server is back. A duplicate key id is
InvalidLedgerArgument; any other constraint violation or SQL error is a bare StoreError (a bug).
Deadlocks cannot arise from these functions (docs/ledger.md, lock order) but are retried anyway.

Connections: an asyncpg pool of at most `pool_size` connections per process, made on first use
in the running event loop (asyncpg pools belong to one loop; a store used from a new loop, one
loop at a time, gets a new pool). The schema is migrated on first use (`migrate`), under an advisory lock so that
processes starting together apply each migration once. asyncpg is imported when a store is built:
the gateway starts without it when it uses SQLite.

The database URL carries a password: only `describe_url` (no password) appears in messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from r1nest.errors import (
    ConfigError,
    InsufficientCredits,
    InvalidLedgerArgument,
    KeyLimitReached,
    ReservationClosed,
    StoreError,
    StoreUnavailable,
    UnknownKey,
)
from r1nest.ledger import rules
from r1nest.ledger.base import KeyRecord, Posting, Reservation, Usage, UsageBucket

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 10
CONNECT_TIMEOUT_S = 5.0  # to open one connection
ACQUIRE_TIMEOUT_S = 10.0  # to get a connection from the pool (all busy: StoreUnavailable)
STATEMENT_TIMEOUT_S = 10.0  # one call, on the client; the server is told the same
CLOSE_TIMEOUT_S = 10.0
MIGRATION_TIMEOUT_S = 600.0  # a migration (or waiting for another process's) may rewrite tables
SWEEP_CHUNK = 1000  # reservations voided per sweep transaction
MAX_DEADLOCK_RETRIES = 5
MIGRATION_LOCK_ID = 125_556_631_106_420  # pg_advisory_xact_lock key: b"r1nest" as an integer

T = TypeVar("T")

# SQLSTATE classes and codes that mean "the database cannot answer now"; the same call may
# succeed later. 08: connection exception; 53: insufficient resources (disk full, out of memory,
# too many connections); 57: operator intervention (shutdown, crash, starting up, statement
# cancelled by timeout); 58: system error (I/O); 28: invalid authorization (credentials refused:
# nothing this call can fix, like DynamoDB's refused credentials); 3D000: no such database;
# 25006: read-only transaction (a standby after a failover); 55P03: lock not available;
# 40001/40P01: serialization failure or deadlock, after the retries.
UNAVAILABLE_CLASSES = frozenset({"08", "53", "57", "58", "28"})
UNAVAILABLE_CODES = frozenset({"3D000", "25006", "55P03", "40001", "40P01"})
RETRIED_CODES = frozenset({"40001", "40P01"})

# Migrations: (version, what, SQL). Applied in order, each once, in one transaction with the
# row that records it in schema_migrations. Never edit one that has shipped: add the next.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "keys, reservations, postings, top-ups; reserve/close/top-up/sweep functions", """
CREATE TABLE keys (
    key_id            text PRIMARY KEY,
    name              text NOT NULL,
    key_hash          text NOT NULL,
    created_at        double precision NOT NULL,
    expires_at        double precision,
    revoked           boolean NOT NULL DEFAULT false,
    remaining_credits bigint NOT NULL CHECK (remaining_credits BETWEEN 0 AND 9007199254740991),
    max_concurrency   integer CHECK (max_concurrency >= 1),
    rate_limit_rpm    integer CHECK (rate_limit_rpm >= 1),
    open_reservations integer NOT NULL DEFAULT 0 CHECK (open_reservations >= 0),
    rpm_window        double precision,            -- start of the window rpm_count counts
    rpm_count         integer NOT NULL DEFAULT 0 CHECK (rpm_count >= 0)
);
CREATE INDEX keys_by_creation ON keys (created_at, key_id);

CREATE TABLE reservations (
    reservation_id   text PRIMARY KEY,
    key_id           text NOT NULL REFERENCES keys (key_id),
    credits_reserved bigint NOT NULL CHECK (credits_reserved >= 0),
    created_at       double precision NOT NULL,
    expires_at       double precision NOT NULL,
    state            text NOT NULL CHECK (state IN ('pending', 'settled', 'voided')),
    credits_charged  bigint CHECK (credits_charged BETWEEN 0 AND credits_reserved),
    closed_at        double precision,
    CHECK ((state = 'pending') = (closed_at IS NULL)),
    CHECK ((state = 'settled') = (credits_charged IS NOT NULL))
);
CREATE INDEX reservations_pending_by_deadline ON reservations (expires_at) WHERE state = 'pending';

CREATE TABLE postings (
    seq               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id            text NOT NULL REFERENCES keys (key_id),
    kind              text NOT NULL CHECK (kind IN ('grant', 'topup', 'reserve', 'settle', 'void')),
    credits           bigint NOT NULL,
    at                double precision NOT NULL,
    reservation_id    text,
    note              text NOT NULL DEFAULT '',
    credits_charged   bigint,                      -- settle postings: what the request cost
    prompt_tokens     bigint NOT NULL DEFAULT 0,   -- settle postings: the request's usage
    cached_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    CHECK ((kind = 'settle') = (credits_charged IS NOT NULL))
);
CREATE INDEX postings_by_key ON postings (key_id, seq);
CREATE INDEX postings_settled_by_time ON postings (at) WHERE kind = 'settle';
CREATE INDEX postings_settled_by_key ON postings (key_id, at) WHERE kind = 'settle';
-- a reservation has one close, whatever a bug above this line might try
CREATE UNIQUE INDEX postings_one_close_per_reservation ON postings (reservation_id)
    WHERE kind IN ('settle', 'void');

CREATE TABLE topups (
    key_id          text NOT NULL REFERENCES keys (key_id),
    idempotency_key text NOT NULL,
    credits         bigint NOT NULL,
    at              double precision NOT NULL,
    PRIMARY KEY (key_id, idempotency_key)
);

-- Reserve: lock the key row, check it (usable, balance, limits), then debit, count, record.
-- Every reserve, close and top-up of the key waits on this lock, so the checks read the
-- balance and counters as the last committed operation left them.
CREATE FUNCTION r1nest_reserve(
    p_key_id text, p_reservation_id text, p_credits bigint, p_now double precision,
    p_expires_at double precision, p_max_concurrency integer, p_rate_limit_rpm integer,
    OUT outcome text, OUT remaining_credits bigint, OUT retry_after_s double precision
) LANGUAGE plpgsql AS $$
DECLARE
    k keys%ROWTYPE;
    v_window double precision := floor(p_now / 60) * 60;
    v_count integer := 0;
BEGIN
    SELECT * INTO k FROM keys WHERE key_id = p_key_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        outcome := 'unknown_key';
        RETURN;
    END IF;
    remaining_credits := k.remaining_credits;
    IF k.revoked OR (k.expires_at IS NOT NULL AND k.expires_at <= p_now) THEN
        outcome := 'unusable';
        RETURN;
    END IF;
    IF k.remaining_credits < p_credits THEN
        outcome := 'insufficient_credits';
        RETURN;
    END IF;
    IF p_max_concurrency IS NOT NULL AND k.open_reservations >= p_max_concurrency THEN
        outcome := 'max_concurrency';
        retry_after_s := 1.0;
        RETURN;
    END IF;
    -- a window stored by a later clock stays current: the counter never moves back
    IF k.rpm_window IS NOT NULL AND k.rpm_window >= v_window THEN
        v_window := k.rpm_window;
        v_count := k.rpm_count;
    END IF;
    IF p_rate_limit_rpm IS NOT NULL AND v_count >= p_rate_limit_rpm THEN
        outcome := 'rate_limit_rpm';
        retry_after_s := v_window + 60 - p_now;
        RETURN;
    END IF;
    UPDATE keys SET remaining_credits = keys.remaining_credits - p_credits,
                    open_reservations = keys.open_reservations + 1,
                    rpm_window = v_window, rpm_count = v_count + 1
        WHERE key_id = p_key_id
        RETURNING keys.remaining_credits INTO remaining_credits;
    INSERT INTO reservations (reservation_id, key_id, credits_reserved, created_at, expires_at, state)
        VALUES (p_reservation_id, p_key_id, p_credits, p_now, p_expires_at, 'pending');
    INSERT INTO postings (key_id, kind, credits, at, reservation_id)
        VALUES (p_key_id, 'reserve', -p_credits, p_now, p_reservation_id);
    outcome := 'reserved';
END
$$;

-- Settle (p_charged given) or void (p_charged NULL): close the reservation if it is pending,
-- then give the unused part back. The conditional UPDATE takes the reservation's row lock; a
-- concurrent close waits for it, re-reads the row, finds it closed and matches nothing.
CREATE FUNCTION r1nest_close(
    p_reservation_id text, p_charged bigint, p_now double precision,
    p_prompt_tokens bigint, p_cached_tokens bigint, p_completion_tokens bigint,
    OUT outcome text, OUT remaining_credits bigint, OUT credits_reserved bigint, OUT state text
) LANGUAGE plpgsql AS $$
DECLARE
    v_key_id text;
    v_refund bigint;
BEGIN
    UPDATE reservations r
        SET state = CASE WHEN p_charged IS NULL THEN 'voided' ELSE 'settled' END,
            credits_charged = p_charged, closed_at = p_now
        WHERE r.reservation_id = p_reservation_id AND r.state = 'pending'
          AND (p_charged IS NULL OR r.credits_reserved >= p_charged)
        RETURNING r.key_id, r.credits_reserved INTO v_key_id, credits_reserved;
    IF NOT FOUND THEN
        SELECT r.credits_reserved, r.state INTO credits_reserved, state
            FROM reservations r WHERE r.reservation_id = p_reservation_id;
        IF NOT FOUND THEN
            outcome := 'unknown_reservation';
        ELSIF state <> 'pending' THEN
            outcome := 'closed';
        ELSE
            outcome := 'overcharge';
        END IF;
        RETURN;
    END IF;
    v_refund := credits_reserved - coalesce(p_charged, 0);
    UPDATE keys SET remaining_credits = keys.remaining_credits + v_refund,
                    open_reservations = keys.open_reservations - 1
        WHERE key_id = v_key_id
        RETURNING keys.remaining_credits INTO remaining_credits;
    IF p_charged IS NULL THEN
        INSERT INTO postings (key_id, kind, credits, at, reservation_id)
            VALUES (v_key_id, 'void', v_refund, p_now, p_reservation_id);
    ELSE
        INSERT INTO postings (key_id, kind, credits, at, reservation_id, note, credits_charged,
                              prompt_tokens, cached_tokens, completion_tokens)
            VALUES (v_key_id, 'settle', v_refund, p_now, p_reservation_id, 'charged ' || p_charged,
                    p_charged, p_prompt_tokens, p_cached_tokens, p_completion_tokens);
    END IF;
    state := CASE WHEN p_charged IS NULL THEN 'voided' ELSE 'settled' END;
    outcome := 'closed_now';
END
$$;

-- Top-up: lock the key row, so that two tries of one idempotency key queue here and the second
-- sees the first's top-up row; the primary key of topups refuses a second row regardless.
CREATE FUNCTION r1nest_topup(
    p_key_id text, p_credits bigint, p_idempotency_key text, p_now double precision,
    OUT outcome text, OUT remaining_credits bigint
) LANGUAGE plpgsql AS $$
BEGIN
    SELECT k.remaining_credits INTO remaining_credits FROM keys k WHERE k.key_id = p_key_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        outcome := 'unknown_key';
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM topups t WHERE t.key_id = p_key_id AND t.idempotency_key = p_idempotency_key) THEN
        outcome := 'seen';
        RETURN;
    END IF;
    IF remaining_credits + p_credits > 9007199254740991 THEN
        outcome := 'overflow';
        RETURN;
    END IF;
    INSERT INTO topups (key_id, idempotency_key, credits, at) VALUES (p_key_id, p_idempotency_key, p_credits, p_now);
    UPDATE keys SET remaining_credits = keys.remaining_credits + p_credits WHERE key_id = p_key_id
        RETURNING keys.remaining_credits INTO remaining_credits;
    INSERT INTO postings (key_id, kind, credits, at, note)
        VALUES (p_key_id, 'topup', p_credits, p_now, 'idempotency-key ' || p_idempotency_key);
    outcome := 'applied';
END
$$;

-- Sweep: void up to p_limit expired pending reservations. Rows locked by a concurrent close (or
-- another gateway's sweep) are skipped: they are being closed. Keys are locked in key_id order,
-- the same in every sweep, and a sweep never waits on a reservation row, so sweeps and closes
-- cannot deadlock.
CREATE FUNCTION r1nest_sweep(p_now double precision, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    voided integer := 0;
BEGIN
    FOR r IN
        SELECT reservation_id, key_id, credits_reserved FROM reservations
            WHERE state = 'pending' AND expires_at <= p_now
            ORDER BY key_id, expires_at, reservation_id
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
    LOOP
        UPDATE reservations SET state = 'voided', closed_at = p_now
            WHERE reservation_id = r.reservation_id AND state = 'pending';
        CONTINUE WHEN NOT FOUND;
        UPDATE keys SET remaining_credits = remaining_credits + r.credits_reserved,
                        open_reservations = open_reservations - 1
            WHERE key_id = r.key_id;
        INSERT INTO postings (key_id, kind, credits, at, reservation_id)
            VALUES (r.key_id, 'void', r.credits_reserved, p_now, r.reservation_id);
        voided := voided + 1;
    END LOOP;
    RETURN voided;
END
$$;
"""),
)

LATEST_VERSION = MIGRATIONS[-1][0]

_KEY_COLUMNS = (
    "key_id, name, key_hash, created_at, expires_at, revoked, remaining_credits, max_concurrency, rate_limit_rpm"
)


def describe_url(url: str) -> str:
    """The URL without its password (and without query parameters), for messages and logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "postgresql://<unparsable URL>"
    user = f"{unquote(parts.username)}@" if parts.username else ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def check_url(url: str) -> str:
    """A postgres:// or postgresql:// URL that names a database; ConfigError (with the password
    left out) otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("store = postgres needs database_url (R1NEST_DATABASE_URL)")
    url = url.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(f"the database URL is not a valid URL: {describe_url(url)}") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigError(
            f"the database URL must start with postgresql:// (got {parts.scheme or 'no'} scheme): {describe_url(url)}"
        )
    if not parts.path.strip("/"):
        raise ConfigError(f"the database URL names no database: {describe_url(url)} (add /DBNAME)")
    return url


class PostgresStore:
    def __init__(self, url: str, *, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        try:
            import asyncpg  # type: ignore[import-untyped]
        except ImportError:
            raise ConfigError("the PostgreSQL ledger needs asyncpg: pip install 'r1nest[postgres]'") from None
        self._asyncpg = asyncpg
        self._url = check_url(url)
        self.description = describe_url(self._url)
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigError(f"the database pool size must be at least 1, got {pool_size!r}")
        self.pool_size = pool_size
        self._pool: Any = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None
        self._migrated = False
        self._closed = False
        self._background: set[asyncio.Task[Any]] = set()
        self._unavailable: tuple[type[BaseException], ...] = (
            OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError,
            asyncpg.exceptions._base.InternalClientError,
        )

    def __repr__(self) -> str:
        return f"PostgresStore({self.description!r}, pool_size={self.pool_size})"

    # Store interface ----------------------------------------------------------------------

    async def create_key(
        self, *, key_id: str, key_hash: str, name: str, credits: int, expires_at: float | None, now: float,
        max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
    ) -> KeyRecord:
        expires_at = rules.check_new_key(
            credits=credits, name=name, expires_at=expires_at, max_concurrency=max_concurrency,
            rate_limit_rpm=rate_limit_rpm,
        )
        statement = (
            f"WITH k AS (INSERT INTO keys ({_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, false, $6, $7, $8)"
            " RETURNING key_id)"
            " INSERT INTO postings (key_id, kind, credits, at) SELECT key_id, 'grant', $6, $4 FROM k"
        )
        try:
            await self._run(
                "execute", statement, key_id, name, key_hash, float(now), expires_at, credits,
                max_concurrency, rate_limit_rpm,
            )
        except self._asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "keys_pkey":
                raise InvalidLedgerArgument(f"key id {key_id} already exists") from None
            raise StoreError(f"ledger error: {exc}") from None
        return KeyRecord(
            key_id, name, key_hash, float(now), expires_at, False, credits, max_concurrency, rate_limit_rpm
        )

    async def set_key_limits(
        self, key_id: str, *, max_concurrency: int | None, rate_limit_rpm: int | None
    ) -> KeyRecord:
        rules.check_limits(max_concurrency, rate_limit_rpm)
        row = await self._run(
            "fetchrow",
            f"UPDATE keys SET max_concurrency = $2, rate_limit_rpm = $3 WHERE key_id = $1 RETURNING {_KEY_COLUMNS}",
            key_id, max_concurrency, rate_limit_rpm,
        )
        if row is None:
            raise UnknownKey(f"no key with id {key_id}")
        return _key_record(row)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        row = await self._run("fetchrow", f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_id = $1", key_id)
        return _key_record(row) if row is not None else None

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._run("fetch", f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY created_at, key_id")
        return [_key_record(row) for row in rows]

    async def revoke_key(self, key_id: str) -> KeyRecord:
        row = await self._run(
            "fetchrow", f"UPDATE keys SET revoked = true WHERE key_id = $1 RETURNING {_KEY_COLUMNS}", key_id
        )
        if row is None:
            raise UnknownKey(f"no key with id {key_id}")
        return _key_record(row)

    async def topup(self, key_id: str, credits: int, *, idempotency_key: str, now: float) -> int:
        rules.check_credits(credits, what="top-up credits", minimum=1)
        rules.check_idempotency_key(idempotency_key)
        row = await self._run(
            "fetchrow", "SELECT * FROM r1nest_topup($1, $2, $3, $4)", key_id, credits, idempotency_key, float(now)
        )
        if row["outcome"] == "unknown_key":
            raise UnknownKey(f"no key with id {key_id}")
        if row["outcome"] == "overflow":
            rules.check_balance_after(row["remaining_credits"], credits)  # raises
            raise AssertionError("the database refused a top-up that fits")
        return int(row["remaining_credits"])

    async def balance(self, key_id: str) -> int:
        row = await self._run("fetchrow", "SELECT remaining_credits FROM keys WHERE key_id = $1", key_id)
        if row is None:
            raise UnknownKey(f"no key with id {key_id}")
        return int(row[0])

    async def reserve(
        self, key_id: str, credits: int, *, ttl_s: float, now: float,
        max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
    ) -> Reservation:
        rules.check_reservation(
            credits=credits, ttl_s=ttl_s, max_concurrency=max_concurrency, rate_limit_rpm=rate_limit_rpm
        )
        reservation_id = uuid.uuid4().hex
        expires_at = now + ttl_s
        running = asyncio.ensure_future(
            self._run(
                "fetchrow", "SELECT * FROM r1nest_reserve($1, $2, $3, $4, $5, $6, $7)",
                key_id, reservation_id, credits, float(now), float(expires_at), max_concurrency, rate_limit_rpm,
            )
        )
        try:
            # shielded: a caller that stops waiting must not cut the call in half; if the
            # reservation went through, it is voided at once rather than at the sweep
            row = await asyncio.shield(running)
        except asyncio.CancelledError:
            running.add_done_callback(lambda done: self._void_orphan(done, reservation_id, now))
            raise
        outcome = row["outcome"]
        if outcome == "reserved":
            return Reservation(reservation_id, key_id, credits, expires_at, int(row["remaining_credits"]))
        if outcome == "unknown_key":
            raise UnknownKey(f"no key with id {key_id}")
        if outcome == "unusable":
            raise UnknownKey(f"key {key_id} is revoked or expired")
        if outcome == "insufficient_credits":
            raise InsufficientCredits(int(row["remaining_credits"]), credits)
        if outcome in ("max_concurrency", "rate_limit_rpm"):
            raise KeyLimitReached(outcome, float(row["retry_after_s"]))
        raise StoreError(f"ledger error: reserve answered {outcome!r}")

    async def settle(
        self, reservation_id: str, credits_charged: int, *, now: float, usage: Usage | None = None
    ) -> int:
        rules.check_credits(credits_charged, what="charged credits")
        usage = rules.check_usage(usage) or Usage()
        return await self._close(reservation_id, credits_charged, now, usage)

    async def void(self, reservation_id: str, *, now: float) -> int:
        return await self._close(reservation_id, None, now, Usage())

    async def sweep_expired(self, *, now: float) -> int:
        voided = 0
        while True:
            swept = int(await self._run("fetchval", "SELECT r1nest_sweep($1, $2)", float(now), SWEEP_CHUNK))
            voided += swept
            if swept < SWEEP_CHUNK:
                return voided

    async def postings(self, key_id: str) -> list[Posting]:
        rows = await self._run(
            "fetch",
            "SELECT k.key_id, p.kind, p.credits, p.at, p.reservation_id, p.note"
            " FROM keys k LEFT JOIN postings p ON p.key_id = k.key_id WHERE k.key_id = $1 ORDER BY p.seq",
            key_id,
        )
        if not rows:
            raise UnknownKey(f"no key with id {key_id}")
        return [Posting(*row) for row in rows if row["kind"] is not None]

    async def usage(
        self, *, key_id: str | None, since: float, until: float, bucket_s: int
    ) -> list[UsageBucket]:
        since, until, bucket_s = rules.check_usage_range(since, until, bucket_s)
        sums = (
            "SELECT floor(at / $3::float8) * $3 AS start, count(*), sum(prompt_tokens)::bigint,"
            " sum(cached_tokens)::bigint, sum(completion_tokens)::bigint, sum(credits_charged)::bigint"
            " FROM postings WHERE kind = 'settle' AND at >= $1 AND at < $2"
        )
        if key_id is None:
            rows = await self._run("fetch", f"{sums} GROUP BY 1 ORDER BY 1", since, until, bucket_s)
        else:
            # the key's existence and its sums in one statement (one snapshot)
            rows = await self._run(
                "fetch",
                f"SELECT s.* FROM keys k LEFT JOIN ({sums} AND key_id = $4 GROUP BY 1) s ON true"
                " WHERE k.key_id = $4 ORDER BY s.start",
                since, until, bucket_s, key_id,
            )
            if not rows:
                raise UnknownKey(f"no key with id {key_id}")
            rows = [row for row in rows if row["start"] is not None]
        return [UsageBucket(float(row[0]), *(int(value) for value in row[1:])) for row in rows]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pool, pool_loop = self._pool, self._pool_loop
        self._pool = self._pool_loop = None
        if pool is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not pool_loop:  # the pool's loop is gone (or another one): drop the sockets
            with contextlib.suppress(Exception):
                pool.terminate()
            return
        if self._background:
            await asyncio.wait(set(self._background), timeout=CLOSE_TIMEOUT_S)
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
        except self._unavailable:  # TimeoutError included
            pool.terminate()

    # schema -------------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Apply the migrations this database lacks; returns the versions applied now (none when
        another process applied them first)."""
        pool = await self._get_pool()
        return await self._guarded(lambda: self._migrate_with(pool))

    async def schema_version(self) -> int:
        row = await self._run("fetchval", "SELECT max(version) FROM schema_migrations")
        return int(row or 0)

    async def _migrate_with(self, pool: Any) -> list[int]:
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            applied = await migrate(conn)
        self._migrated = True
        if applied:
            log.info("PostgreSQL ledger at %s: applied migration(s) %s", self.description, applied)
        return applied

    # plumbing -----------------------------------------------------------------------------

    async def _close(self, reservation_id: str, credits_charged: int | None, now: float, usage: Usage) -> int:
        row = await self._run(
            "fetchrow", "SELECT * FROM r1nest_close($1, $2, $3, $4, $5, $6)",
            reservation_id, credits_charged, float(now),
            usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens,
        )
        outcome = row["outcome"]
        if outcome == "closed_now":
            return int(row["remaining_credits"])
        if outcome == "unknown_reservation":
            raise InvalidLedgerArgument(f"no reservation with id {reservation_id}")
        if outcome == "closed":
            raise ReservationClosed(f"reservation {reservation_id} is already {row['state']}")
        if outcome == "overcharge" and credits_charged is not None:
            rules.check_charge(credits_charged, int(row["credits_reserved"]))  # raises
        raise StoreError(f"ledger error: close answered {outcome!r}")

    def _void_orphan(self, done: asyncio.Future[Any], reservation_id: str, now: float) -> None:
        """A reserve whose caller left: void the reservation now if it was made."""
        if done.cancelled() or done.exception() is not None or done.result()["outcome"] != "reserved":
            return
        if self._closed:
            return  # the sweeper voids it after its deadline
        task = asyncio.ensure_future(self.void(reservation_id, now=now))
        self._background.add(task)

        def finished(task: asyncio.Task[Any]) -> None:
            self._background.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.warning("could not void reservation %s of a departed caller (the sweeper will): %s",
                            reservation_id, task.exception())

        task.add_done_callback(finished)

    async def _run(self, method: str, statement: str, *args: Any) -> Any:
        """One statement on a pooled connection, in its own transaction; driver errors become
        store errors (`_translate`); deadlocks and serialization failures are retried."""
        pool = await self._get_pool()
        if not self._migrated:
            await self._guarded(lambda: self._migrate_once(pool))

        async def call() -> Any:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                return await getattr(conn, method)(statement, *args, timeout=STATEMENT_TIMEOUT_S)

        return await self._guarded(call)

    async def _guarded(self, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(MAX_DEADLOCK_RETRIES + 1):
            try:
                return await call()
            except self._asyncpg.PostgresError as exc:
                if _sqlstate(exc) in RETRIED_CODES and attempt < MAX_DEADLOCK_RETRIES:
                    await asyncio.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
                    continue
                if isinstance(exc, self._asyncpg.UniqueViolationError) and exc.constraint_name == "keys_pkey":
                    raise  # create_key answers it
                raise self._translate(exc, "PostgreSQL ledger error") from None
            except StoreError:
                raise
            except self._unavailable as exc:
                raise self._translate(exc, "PostgreSQL ledger error") from None
        raise AssertionError("unreachable")

    async def _migrate_once(self, pool: Any) -> None:
        assert self._opening is not None
        async with self._opening:
            if not self._migrated:
                await self._migrate_with(pool)

    async def _get_pool(self) -> Any:
        """This loop's pool (made now if there is none yet; made again after a loop change)."""
        if self._closed:
            raise StoreUnavailable("the ledger is closed")
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._pool_loop is loop:
            return self._pool
        if self._pool is not None:  # made on a loop that is gone: its connections are unusable
            with contextlib.suppress(Exception):
                self._pool.terminate()
        self._pool = self._asyncpg.create_pool(
            self._url, min_size=0, max_size=self.pool_size, timeout=CONNECT_TIMEOUT_S,
            command_timeout=STATEMENT_TIMEOUT_S, max_inactive_connection_lifetime=300.0,
            server_settings={
                "application_name": "r1nest",
                "statement_timeout": str(int(STATEMENT_TIMEOUT_S * 1000)),
                "idle_in_transaction_session_timeout": str(int(STATEMENT_TIMEOUT_S * 3000)),
            },
        )
        self._pool_loop = loop
        self._opening = asyncio.Lock()
        await self._pool  # min_size=0: connects nothing; connections are made on demand
        return self._pool

    def _translate(self, exc: BaseException, what: str) -> StoreError:
        """StoreUnavailable for a database that cannot answer now; a bare StoreError for a bug."""
        asyncpg = self._asyncpg
        where = f"{what} ({self.description})"
        if isinstance(exc, asyncpg.PostgresError):
            code = _sqlstate(exc)
            if code[:2] in UNAVAILABLE_CLASSES or code in UNAVAILABLE_CODES:
                return StoreUnavailable(f"{where}: {type(exc).__name__}: {exc}")
            return StoreError(f"{where}: {type(exc).__name__} [{code}]: {exc}")
        if isinstance(exc, asyncpg.InterfaceError):
            text = str(exc).lower()
            if "closed" in text or "closing" in text or "connection" in text:
                return StoreUnavailable(f"{where}: {exc}")
            return StoreError(f"{where}: {type(exc).__name__}: {exc}")  # e.g. a value the driver cannot encode
        if isinstance(exc, asyncio.TimeoutError):
            return StoreUnavailable(f"{where}: no answer or no free connection within the timeout")
        # OSError (refused, reset, unreachable, DNS), asyncpg's internal connection errors
        return StoreUnavailable(f"{where}: {type(exc).__name__}: {exc}")


async def migrate(conn: Any) -> list[int]:
    """Bring the schema on `conn` to LATEST_VERSION; returns the versions applied by this call.

    One transaction under a transaction-level advisory lock: processes that start together queue
    here, and each later one finds the versions recorded and applies nothing. A failing migration
    rolls back whole (PostgreSQL's DDL is transactional), leaving the previous version in place.
    """
    timeout = MIGRATION_TIMEOUT_S
    async with conn.transaction():
        await conn.execute(f"SET LOCAL statement_timeout = {int(timeout * 1000)}", timeout=timeout)
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID, timeout=timeout)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, description text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())", timeout=timeout,
        )
        present = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations", timeout=timeout)}
        applied = []
        for version, description, statements in MIGRATIONS:
            if version in present:
                continue
            await conn.execute(statements, timeout=timeout)
            await conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)", version, description,
                timeout=timeout,
            )
            applied.append(version)
        if present and max(present) > LATEST_VERSION:
            log.warning(
                "the ledger's schema is at version %d, newer than this r1nest knows (%d)", max(present), LATEST_VERSION
            )
        return applied


def _sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


def _key_record(row: Any) -> KeyRecord:
    return KeyRecord(
        row["key_id"], row["name"], row["key_hash"], row["created_at"], row["expires_at"], row["revoked"],
        int(row["remaining_credits"]), row["max_concurrency"], row["rate_limit_rpm"],
    )
