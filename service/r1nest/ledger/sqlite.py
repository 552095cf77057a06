"""The embedded ledger: one SQLite file (WAL journal) owned by one writer thread.

Why a thread: sqlite3 calls block, and the gateway runs on an asyncio loop. Every operation is
queued to a dedicated thread holding the only connection, so writes are serialized without
locks and the loop never waits on disk.

Why group commit: a durable commit costs an fsync. The thread takes every operation waiting in
the queue (up to `max_batch`) and runs them in one transaction, each inside its own SAVEPOINT:
an operation that fails (say, insufficient credits) rolls back only itself. Callers are answered
after COMMIT returns.

Durability where it carries money: a commit with synchronous=FULL is on disk when it returns
(one fsync of the WAL); with synchronous=NORMAL it survives a killed process (the WAL frames are
in the operating system's cache) but a power cut or OS crash may take it back. SQLite's WAL
recovers a prefix of the commits (checksummed frames, read in order), and a FULL commit fsyncs
the whole WAL, so a power cut can only take back a tail of NORMAL commits made after the last
FULL one. Settle, top-up, key creation and revocation commit FULL: they are money or security
facts the caller acts on. Reserve, void and sweep commit NORMAL: losing a reservation is
voiding it (its request died with the machine), and a lost void leaves the reservation pending
for the sweeper. A batch commits FULL if any operation in it needs FULL (`sync_level`). The
reasoning in full is in docs/ledger.md.

Crash behaviour: a reservation, the balance change and its posting are one transaction, so a
killed process leaves either all of them or none. A reservation left pending by a crash is
voided by `sweep_expired` once its deadline passes (callers sweep at startup).

Per-key limits are checked by the same conditional UPDATE that debits the balance, inside the
writer's transaction: open reservations are counted from the pending reservations of the key
(a partial index), the rate limit is a window counter on the key row (`rpm_window`,
`rpm_count`). A refused reservation matches no row and changes nothing, in its own SAVEPOINT.
Usage (token counts, the charge) is written on the settle posting; `usage()` is one GROUP BY over
the settle postings of a time range (partial indexes on `at`), read on a connection of its own
so that a long query never holds up the writer.

Files from the previous release are migrated when opened (`_migrate`): missing columns are
added with ALTER TABLE in one write transaction; old settle postings count as requests with
zero tokens, their charge read from their reservation.

Other processes (the `r1nest keys` command next to a running gateway) may open the same file:
WAL lets them read, and their writes wait on SQLite's lock (busy timeout) instead of failing.
A write that still finds the lock held when the busy timeout ends, a full disk, an I/O error or
a file that cannot be opened raise StoreUnavailable (`_translate`); refused arguments raise
InvalidLedgerArgument.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import queue
import sqlite3
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from r1nest.errors import (
    InsufficientCredits,
    InvalidLedgerArgument,
    KeyLimitReached,
    R1nestError,
    ReservationClosed,
    StoreError,
    StoreUnavailable,
    UnknownKey,
)
from r1nest.ledger import rules
from r1nest.ledger.base import KeyRecord, Posting, PostingKind, Reservation, Usage, UsageBucket

MAX_BATCH = 256  # operations per transaction
BUSY_TIMEOUT_MS = 10_000  # how long a write waits for another process's lock
STARTUP_TIMEOUT_S = 30.0
SWEEP_CHUNK = 1000

SYNC_NORMAL = 1  # PRAGMA synchronous values
SYNC_FULL = 2
# Operations a power cut may take back without losing or creating credits (docs/ledger.md);
# every other write, named or not, commits with synchronous=FULL.
RELAXED_OPERATIONS = frozenset({"reserve", "void", "sweep"})

# SQLite's primary result codes that mean "the database cannot answer now", not "this statement
# is wrong": BUSY (locked past the busy timeout), LOCKED, NOMEM, READONLY, INTERRUPT, IOERR,
# CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB. Anything else (CONSTRAINT, MISUSE, a SQL error...)
# is a bug in this module.
UNAVAILABLE_RESULT_CODES = frozenset({5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 26})

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id            TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    key_hash          TEXT NOT NULL,
    created_at        REAL NOT NULL,
    expires_at        REAL,
    revoked           INTEGER NOT NULL DEFAULT 0,
    remaining_credits INTEGER NOT NULL CHECK (remaining_credits >= 0),
    max_concurrency   INTEGER,
    rate_limit_rpm    INTEGER,
    rpm_window        REAL,
    rpm_count         INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS reservations (
    reservation_id   TEXT PRIMARY KEY,
    key_id           TEXT NOT NULL REFERENCES keys (key_id),
    credits_reserved INTEGER NOT NULL CHECK (credits_reserved >= 0),
    created_at       REAL NOT NULL,
    expires_at       REAL NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'settled', 'voided')),
    credits_charged  INTEGER CHECK (credits_charged BETWEEN 0 AND credits_reserved),
    closed_at        REAL
);
CREATE INDEX IF NOT EXISTS reservations_pending_by_deadline
    ON reservations (expires_at) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS postings (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id         TEXT NOT NULL REFERENCES keys (key_id),
    kind           TEXT NOT NULL CHECK (kind IN ('grant', 'topup', 'reserve', 'settle', 'void')),
    credits        INTEGER NOT NULL,
    at             REAL NOT NULL,
    reservation_id TEXT,
    note           TEXT NOT NULL DEFAULT '',
    credits_charged   INTEGER,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS postings_by_key ON postings (key_id, seq);
CREATE TABLE IF NOT EXISTS topups (
    key_id          TEXT NOT NULL REFERENCES keys (key_id),
    idempotency_key TEXT NOT NULL,
    credits         INTEGER NOT NULL,
    at              REAL NOT NULL,
    PRIMARY KEY (key_id, idempotency_key)
);
"""

# Columns added since the first release: `_migrate` adds those an older file lacks. Each is
# nullable or has a default, as ALTER TABLE ADD COLUMN requires.
ADDED_COLUMNS = (
    ("keys", "max_concurrency", "INTEGER"),
    ("keys", "rate_limit_rpm", "INTEGER"),
    ("keys", "rpm_window", "REAL"),  # start of the rate-limit window rpm_count counts
    ("keys", "rpm_count", "INTEGER NOT NULL DEFAULT 0"),
    ("postings", "credits_charged", "INTEGER"),  # settle postings; NULL on older ones
    ("postings", "prompt_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("postings", "cached_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("postings", "completion_tokens", "INTEGER NOT NULL DEFAULT 0"),
)

# Created after the migration (they may name added columns). Partial indexes: only pending
# reservations (counted for max_concurrency) and settle postings (summed by usage) are in them.
INDEXES = """
CREATE INDEX IF NOT EXISTS reservations_pending_by_key
    ON reservations (key_id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS postings_settled_by_time ON postings (at) WHERE kind = 'settle';
CREATE INDEX IF NOT EXISTS postings_settled_by_key ON postings (key_id, at) WHERE kind = 'settle';
"""

_KEY_COLUMNS = (
    "key_id, name, key_hash, created_at, expires_at, revoked, remaining_credits,"
    " max_concurrency, rate_limit_rpm"
)

Operation = Callable[[sqlite3.Connection], Any]
_T = TypeVar("_T")


def sync_level(operations: Iterable[str]) -> int:
    """The synchronous level a transaction holding these write operations commits with."""
    return SYNC_NORMAL if all(op in RELAXED_OPERATIONS for op in operations) else SYNC_FULL


@dataclasses.dataclass(slots=True)
class _Job:
    run: Operation
    operation: str  # what it is ("reserve", "settle", ...): decides the commit's durability
    writes: bool
    loop: asyncio.AbstractEventLoop | None  # None: nobody waits for the answer
    future: asyncio.Future[Any] | None
    # Called with the result when the caller stopped waiting (cancelled) after the operation
    # committed, so that nothing stays held for nobody (a reservation is voided).
    on_orphan: Callable[[Any], None] | None = None


class SqliteStore:
    def __init__(self, path: str | Path, *, max_batch: int = MAX_BATCH) -> None:
        self.path = Path(path)
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._ready = threading.Event()
        self._startup_error: sqlite3.Error | OSError | None = None
        self._synchronous = SYNC_FULL  # the connection's level; _connect sets FULL
        # For tests: called inside each write transaction just before COMMIT with the
        # connection and the names of the write operations in it.
        self.before_commit: Callable[[sqlite3.Connection, tuple[str, ...]], None] | None = None
        self._thread = threading.Thread(target=self._writer, name="r1nest-ledger", daemon=True)
        self._thread.start()
        if not self._ready.wait(STARTUP_TIMEOUT_S):
            raise StoreUnavailable(f"the ledger at {self.path} did not open within {STARTUP_TIMEOUT_S:.0f} s")
        if self._startup_error is not None:
            error = self._startup_error
            if isinstance(error, OSError):
                raise StoreUnavailable(f"cannot open the ledger at {self.path}: {error}")
            raise _translate(error, f"cannot open the ledger at {self.path}")

    # Store interface ----------------------------------------------------------------------

    async def create_key(
        self, *, key_id: str, key_hash: str, name: str, credits: int, expires_at: float | None, now: float,
        max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
    ) -> KeyRecord:
        expires_at = rules.check_new_key(
            credits=credits, name=name, expires_at=expires_at, max_concurrency=max_concurrency,
            rate_limit_rpm=rate_limit_rpm,
        )

        def run(conn: sqlite3.Connection) -> KeyRecord:
            try:
                conn.execute(
                    f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, 0, 0, ?, ?)",
                    (key_id, name, key_hash, now, expires_at, max_concurrency, rate_limit_rpm),
                )
            except sqlite3.IntegrityError:
                raise InvalidLedgerArgument(f"key id {key_id} already exists") from None
            _post(conn, key_id, "grant", credits, now)
            return KeyRecord(
                key_id, name, key_hash, now, expires_at, False, credits, max_concurrency, rate_limit_rpm
            )

        return await self._submit(run, "create_key")

    async def set_key_limits(
        self, key_id: str, *, max_concurrency: int | None, rate_limit_rpm: int | None
    ) -> KeyRecord:
        rules.check_limits(max_concurrency, rate_limit_rpm)

        def run(conn: sqlite3.Connection) -> KeyRecord:
            conn.execute(
                "UPDATE keys SET max_concurrency = ?, rate_limit_rpm = ? WHERE key_id = ?",
                (max_concurrency, rate_limit_rpm, key_id),
            )
            return _require_key(conn, key_id)

        return await self._submit(run, "set_key_limits")

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self._submit(lambda conn: _get_key(conn, key_id), "get_key", writes=False)

    async def list_keys(self) -> list[KeyRecord]:
        def run(conn: sqlite3.Connection) -> list[KeyRecord]:
            rows = conn.execute(f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY created_at, key_id")
            return [_key_record(row) for row in rows]

        return await self._submit(run, "list_keys", writes=False)

    async def revoke_key(self, key_id: str) -> KeyRecord:
        def run(conn: sqlite3.Connection) -> KeyRecord:
            conn.execute("UPDATE keys SET revoked = 1 WHERE key_id = ?", (key_id,))
            return _require_key(conn, key_id)

        return await self._submit(run, "revoke_key")

    async def topup(self, key_id: str, credits: int, *, idempotency_key: str, now: float) -> int:
        rules.check_credits(credits, what="top-up credits", minimum=1)
        rules.check_idempotency_key(idempotency_key)

        def run(conn: sqlite3.Connection) -> int:
            record = _require_key(conn, key_id)
            seen = conn.execute(
                "SELECT 1 FROM topups WHERE key_id = ? AND idempotency_key = ?",
                (key_id, idempotency_key),
            ).fetchone()
            if seen:
                return record.remaining_credits
            rules.check_balance_after(record.remaining_credits, credits)
            conn.execute(
                "INSERT INTO topups (key_id, idempotency_key, credits, at) VALUES (?, ?, ?, ?)",
                (key_id, idempotency_key, credits, now),
            )
            return _post(conn, key_id, "topup", credits, now, note=f"idempotency-key {idempotency_key}")

        return await self._submit(run, "topup")

    async def balance(self, key_id: str) -> int:
        return await self._submit(
            lambda conn: _require_key(conn, key_id).remaining_credits, "balance", writes=False
        )

    async def reserve(
        self, key_id: str, credits: int, *, ttl_s: float, now: float,
        max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
    ) -> Reservation:
        rules.check_reservation(
            credits=credits, ttl_s=ttl_s, max_concurrency=max_concurrency, rate_limit_rpm=rate_limit_rpm
        )
        reservation_id = uuid.uuid4().hex
        expires_at = now + ttl_s
        statement = _reserve_statement(max_concurrency is not None, rate_limit_rpm is not None)
        values = {
            "credits": credits, "key_id": key_id, "now": now, "window": rules.rpm_window(now),
            "max_concurrency": max_concurrency, "rate_limit_rpm": rate_limit_rpm,
        }

        def run(conn: sqlite3.Connection) -> Reservation:
            # One conditional UPDATE is the check (balance, key, limits) and the debit; a
            # SELECT only says why not.
            row = conn.execute(statement, values).fetchone()
            if row is None:
                _refuse_reservation(conn, key_id, credits, now, max_concurrency, rate_limit_rpm)
            conn.execute(
                "INSERT INTO reservations (reservation_id, key_id, credits_reserved, created_at,"
                " expires_at, state) VALUES (?, ?, ?, ?, ?, 'pending')",
                (reservation_id, key_id, credits, now, expires_at),
            )
            _record_posting(conn, key_id, "reserve", -credits, now, reservation_id, "")
            return Reservation(reservation_id, key_id, credits, expires_at, int(row[0]))

        def void_orphan(reservation: Reservation) -> None:
            if not self._closed:  # else the sweeper voids it after its deadline
                self._enqueue(lambda conn: _close(conn, reservation.reservation_id, None, now), "void", None)

        return await self._submit(run, "reserve", on_orphan=void_orphan)

    async def settle(
        self, reservation_id: str, credits_charged: int, *, now: float, usage: Usage | None = None
    ) -> int:
        rules.check_credits(credits_charged, what="charged credits")
        usage = rules.check_usage(usage) or Usage()
        return await self._submit(
            lambda conn: _close(conn, reservation_id, credits_charged, now, usage), "settle"
        )

    async def void(self, reservation_id: str, *, now: float) -> int:
        return await self._submit(lambda conn: _close(conn, reservation_id, None, now), "void")

    async def sweep_expired(self, *, now: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            voided = 0
            while True:
                expired = [
                    row[0]
                    for row in conn.execute(
                        "SELECT reservation_id FROM reservations WHERE state = 'pending'"
                        " AND expires_at <= ? ORDER BY expires_at LIMIT ?",
                        (now, SWEEP_CHUNK),
                    )
                ]
                for reservation_id in expired:
                    _close(conn, reservation_id, None, now)
                voided += len(expired)
                if len(expired) < SWEEP_CHUNK:
                    return voided

        return await self._submit(run, "sweep")

    async def postings(self, key_id: str) -> list[Posting]:
        def run(conn: sqlite3.Connection) -> list[Posting]:
            _require_key(conn, key_id)
            rows = conn.execute(
                "SELECT key_id, kind, credits, at, reservation_id, note FROM postings"
                " WHERE key_id = ? ORDER BY seq",
                (key_id,),
            )
            return [Posting(*row) for row in rows]

        return await self._submit(run, "postings", writes=False)

    async def usage(
        self, *, key_id: str | None, since: float, until: float, bucket_s: int
    ) -> list[UsageBucket]:
        since, until, bucket_s = rules.check_usage_range(since, until, bucket_s)
        if self._closed:
            raise StoreUnavailable("the ledger is closed")
        # A reader of its own (WAL: it sees every committed settle and never waits on the
        # writer), so that a query over months of postings does not stall reservations.
        return await asyncio.to_thread(self._read_usage, key_id, since, until, bucket_s)

    def _read_usage(self, key_id: str | None, since: float, until: float, bucket_s: int) -> list[UsageBucket]:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _translate(exc, f"cannot open the ledger at {self.path}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA query_only = ON")
            conn.execute("BEGIN")  # one snapshot for the key check and the sums
            if key_id is not None:
                _require_key(conn, key_id)
            return _usage(conn, key_id, since, until, bucket_s)
        except sqlite3.Error as exc:
            raise _translate(exc, "cannot read usage from the ledger") from None
        finally:
            conn.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, STARTUP_TIMEOUT_S)

    # the writer thread --------------------------------------------------------------------

    async def _submit(
        self, run: Callable[[sqlite3.Connection], _T], operation: str = "other", *, writes: bool = True,
        on_orphan: Callable[[_T], None] | None = None,
    ) -> _T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._enqueue(run, operation, loop, future, writes=writes, on_orphan=on_orphan)
        return await future

    def _enqueue(
        self,
        run: Operation,
        operation: str,
        loop: asyncio.AbstractEventLoop | None,
        future: asyncio.Future[Any] | None = None,
        *,
        writes: bool = True,
        on_orphan: Callable[[Any], None] | None = None,
    ) -> None:
        if self._closed:
            raise StoreUnavailable("the ledger is closed")
        self._queue.put(_Job(run, operation, writes, loop, future, on_orphan))

    def _writer(self) -> None:
        try:
            conn = _connect(self.path)
        except (sqlite3.Error, OSError) as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            stopping = False
            while not stopping:
                job = self._queue.get()
                if job is None:
                    break
                batch = [job]
                while len(batch) < self._max_batch:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stopping = True
                        break
                    batch.append(job)
                try:
                    outcomes = self._run_batch(conn, batch)
                except Exception as exc:  # noqa: BLE001 - keep serving; fail only this batch
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    error = (
                        _translate(exc, "ledger error") if isinstance(exc, sqlite3.Error)
                        else StoreError(f"ledger error: {type(exc).__name__}: {exc}")
                    )
                    outcomes = [(job, None, error) for job in batch]
                self._answer(outcomes)
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> list[tuple[_Job, Any, BaseException | None]]:
        """Run every job of the batch; one transaction when any of them writes, committed with
        the synchronous level its write operations need."""
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        operations = tuple(job.operation for job in batch if job.writes)
        if not operations:
            for job in batch:
                outcomes.append(_run_one(conn, job))
            return outcomes
        try:
            level = sync_level(operations)
            if level != self._synchronous:  # only between transactions: SQLite refuses it inside
                conn.execute(f"PRAGMA synchronous = {level}")
                self._synchronous = level
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            error = _translate(exc, "the ledger is unavailable")
            return [(job, None, error) for job in batch]
        try:
            for job in batch:
                if not job.writes:
                    outcomes.append(_run_one(conn, job))
                    continue
                conn.execute("SAVEPOINT op")
                outcome = _run_one(conn, job)
                if outcome[2] is not None:
                    conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                outcomes.append(outcome)
            if self.before_commit is not None:
                self.before_commit(conn, operations)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # answer with the first error, not this one
                    conn.execute("ROLLBACK")
            error = _translate(exc, "the ledger could not commit")
            return [(job, None, error) for job in batch]
        return outcomes

    def _answer(self, outcomes: list[tuple[_Job, Any, BaseException | None]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Any, BaseException | None]]] = defaultdict(list)
        for outcome in outcomes:
            if outcome[0].loop is not None:
                by_loop[outcome[0].loop].append(outcome)
        for loop, answers in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, answers)
            except RuntimeError:  # the caller's loop is gone: nobody will read these answers
                for job, result, error in answers:
                    if error is None and job.on_orphan is not None:
                        job.on_orphan(result)


def _deliver(answers: list[tuple[_Job, Any, BaseException | None]]) -> None:
    for job, result, error in answers:
        future = job.future
        assert future is not None
        if future.done():  # cancelled while the operation ran
            if error is None and job.on_orphan is not None:
                job.on_orphan(result)
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():  # private from the start; SQLite's -wal and -shm files copy its mode
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        conn.close()
        raise sqlite3.OperationalError(f"could not switch to WAL journal mode (got {mode})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.executescript(SCHEMA)
    _migrate(conn)
    conn.executescript(INDEXES)
    return conn


def _missing_columns(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    present = {
        (table, row[1]) for table in {t for t, _, _ in ADDED_COLUMNS}
        for row in conn.execute(f"PRAGMA table_info({table})")
    }
    return [column for column in ADDED_COLUMNS if column[:2] not in present]


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a ledger file of an earlier release up to SCHEMA: add the columns it lacks, all in
    one write transaction (checked again under the lock: another process may be migrating the
    same file). Adding a column rewrites no rows; a file that is up to date takes no lock."""
    if not _missing_columns(conn):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, column, declaration in _missing_columns(conn):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _run_one(conn: sqlite3.Connection, job: _Job) -> tuple[_Job, Any, BaseException | None]:
    try:
        return job, job.run(conn), None
    except R1nestError as exc:
        return job, None, exc
    except sqlite3.Error as exc:
        return job, None, _translate(exc, "ledger error")
    except Exception as exc:  # noqa: BLE001 - a bug fails its caller, never the writer thread
        return job, None, StoreError(f"ledger error: {type(exc).__name__}: {exc}")


def _translate(exc: sqlite3.Error, what: str) -> StoreError:
    """The store error for a driver error: StoreUnavailable when the database cannot answer now
    (locked past the busy timeout, disk full, I/O error...), a bare StoreError (a bug) otherwise."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in UNAVAILABLE_RESULT_CODES:
        return StoreUnavailable(f"{what}: {exc}")
    if code is None and isinstance(exc, sqlite3.OperationalError):  # no code: judge by the words
        if any(word in str(exc).lower() for word in ("locked", "busy", "disk", "unable to open")):
            return StoreUnavailable(f"{what}: {exc}")
    return StoreError(f"{what}: {type(exc).__name__}: {exc}")


# operations on the connection (run only on the writer thread) --------------------------------


def _key_record(row: tuple[Any, ...]) -> KeyRecord:
    key_id, name, key_hash, created_at, expires_at, revoked, remaining, *limits = row
    return KeyRecord(key_id, name, key_hash, created_at, expires_at, bool(revoked), remaining, *limits)


def _reserve_statement(limit_concurrency: bool, limit_rate: bool) -> str:
    """The conditional UPDATE of a reservation: debit the balance and count the reservation in
    the key's rate-limit window, only where the key is usable, the balance suffices and the
    limits given leave room. A window stored by a later clock stays current."""
    statement = (
        "UPDATE keys SET remaining_credits = remaining_credits - :credits,"
        " rpm_count = CASE WHEN rpm_window >= :window THEN rpm_count + 1 ELSE 1 END,"
        " rpm_window = CASE WHEN rpm_window >= :window THEN rpm_window ELSE :window END"
        " WHERE key_id = :key_id AND remaining_credits >= :credits AND revoked = 0"
        " AND (expires_at IS NULL OR expires_at > :now)"
    )
    if limit_concurrency:
        statement += f" AND ({_OPEN_RESERVATIONS}) < :max_concurrency"
    if limit_rate:
        statement += " AND (rpm_window IS NULL OR rpm_window < :window OR rpm_count < :rate_limit_rpm)"
    return statement + " RETURNING remaining_credits"


# The key's open reservations, counted up to the limit (reservations_pending_by_key).
_OPEN_RESERVATIONS = (
    "SELECT count(*) FROM (SELECT 1 FROM reservations"
    " WHERE key_id = :key_id AND state = 'pending' LIMIT :max_concurrency)"
)


def _refuse_reservation(
    conn: sqlite3.Connection, key_id: str, credits: int, now: float,
    max_concurrency: int | None, rate_limit_rpm: int | None,
) -> None:
    """Raise why the reservation's UPDATE matched no row (same transaction: the same state)."""
    record = _require_key(conn, key_id)
    if not record.usable(now):
        raise UnknownKey(f"key {key_id} is revoked or expired")
    if record.remaining_credits < credits:
        raise InsufficientCredits(record.remaining_credits, credits)
    if max_concurrency is not None:
        values = {"key_id": key_id, "max_concurrency": max_concurrency}
        if conn.execute(_OPEN_RESERVATIONS, values).fetchone()[0] >= max_concurrency:
            raise KeyLimitReached("max_concurrency", 1.0)
    window, count = conn.execute("SELECT rpm_window, rpm_count FROM keys WHERE key_id = ?", (key_id,)).fetchone()
    in_window = window is not None and window >= rules.rpm_window(now)
    if rate_limit_rpm is not None and in_window and count >= rate_limit_rpm:
        raise KeyLimitReached("rate_limit_rpm", window + rules.RPM_WINDOW_S - now)
    raise AssertionError("a reservation was refused for no reason")


def _get_key(conn: sqlite3.Connection, key_id: str) -> KeyRecord | None:
    row = conn.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_id = ?", (key_id,)).fetchone()
    return _key_record(row) if row else None


def _require_key(conn: sqlite3.Connection, key_id: str) -> KeyRecord:
    record = _get_key(conn, key_id)
    if record is None:
        raise UnknownKey(f"no key with id {key_id}")
    return record


def _post(
    conn: sqlite3.Connection, key_id: str, kind: PostingKind, credits: int, now: float, *,
    reservation_id: str | None = None, note: str = "", credits_charged: int | None = None,
    usage: Usage | None = None,
) -> int:
    """Change a balance and record the posting; returns the new balance."""
    row = conn.execute(
        "UPDATE keys SET remaining_credits = remaining_credits + ? WHERE key_id = ?"
        " RETURNING remaining_credits",
        (credits, key_id),
    ).fetchone()
    assert row is not None and 0 <= row[0] <= rules.MAX_CREDITS, "a balance left its bounds"
    _record_posting(
        conn, key_id, kind, credits, now, reservation_id, note, credits_charged=credits_charged, usage=usage
    )
    return int(row[0])


def _record_posting(
    conn: sqlite3.Connection, key_id: str, kind: PostingKind, credits: int, now: float,
    reservation_id: str | None, note: str, *, credits_charged: int | None = None, usage: Usage | None = None,
) -> None:
    usage = usage or Usage()
    conn.execute(
        "INSERT INTO postings (key_id, kind, credits, at, reservation_id, note, credits_charged,"
        " prompt_tokens, cached_tokens, completion_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key_id, kind, credits, now, reservation_id, note, credits_charged,
            usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens,
        ),
    )


def _usage(
    conn: sqlite3.Connection, key_id: str | None, since: float, until: float, bucket_s: int
) -> list[UsageBucket]:
    """One aggregation over the settle postings in [since, until) (postings_settled_by_time, or
    postings_settled_by_key for one key). Bucket index = floor(at / bucket_s), the same float
    division as `rules.bucket_start`. A settle posting of an earlier release has no
    credits_charged: its reservation has it."""
    rows = conn.execute(
        "SELECT bucket, count(*), sum(prompt_tokens), sum(cached_tokens), sum(completion_tokens), sum(charged)"
        " FROM (SELECT CAST(at / :bucket_s AS INTEGER) - (at / :bucket_s < CAST(at / :bucket_s AS INTEGER))"
        " AS bucket, prompt_tokens, cached_tokens, completion_tokens, coalesce(credits_charged,"
        " (SELECT r.credits_charged FROM reservations r WHERE r.reservation_id = p.reservation_id), 0)"
        " AS charged"
        " FROM postings p WHERE kind = 'settle' AND at >= :since AND at < :until"
        + (" AND key_id = :key_id" if key_id is not None else "")
        + ") GROUP BY bucket ORDER BY bucket",
        {"bucket_s": bucket_s, "since": since, "until": until, "key_id": key_id},
    )
    return [UsageBucket(float(bucket * bucket_s), *sums) for bucket, *sums in rows]


def _close(
    conn: sqlite3.Connection, reservation_id: str, credits_charged: int | None, now: float,
    usage: Usage | None = None,
) -> int:
    """Settle (`credits_charged` given, with the request's usage) or void a pending reservation;
    returns the new balance."""
    # One conditional UPDATE closes it (pending -> settled/voided, exactly once); a SELECT
    # only says why not.
    if credits_charged is None:
        row = conn.execute(
            "UPDATE reservations SET state = 'voided', closed_at = ?"
            " WHERE reservation_id = ? AND state = 'pending' RETURNING key_id, credits_reserved",
            (now, reservation_id),
        ).fetchone()
    else:
        rules.check_credits(credits_charged, what="charged credits")
        row = conn.execute(
            "UPDATE reservations SET state = 'settled', credits_charged = ?, closed_at = ?"
            " WHERE reservation_id = ? AND state = 'pending' AND credits_reserved >= ?"
            " RETURNING key_id, credits_reserved",
            (credits_charged, now, reservation_id, credits_charged),
        ).fetchone()
    if row is None:
        found = conn.execute(
            "SELECT credits_reserved, state FROM reservations WHERE reservation_id = ?", (reservation_id,)
        ).fetchone()
        if found is None:
            raise InvalidLedgerArgument(f"no reservation with id {reservation_id}")
        if found[1] != "pending":
            raise ReservationClosed(f"reservation {reservation_id} is already {found[1]}")
        rules.check_charge(credits_charged, found[0])  # type: ignore[arg-type]  # raises
        raise AssertionError("a pending reservation refused a valid close")
    key_id, credits_reserved = row
    if credits_charged is None:
        return _post(conn, key_id, "void", credits_reserved, now, reservation_id=reservation_id)
    return _post(
        conn, key_id, "settle", credits_reserved - credits_charged, now,
        reservation_id=reservation_id, note=f"charged {credits_charged}",
        credits_charged=credits_charged, usage=usage,
    )
