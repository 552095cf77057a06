"""The shared ledger: one DynamoDB table that several gateways (replicas, Modal containers) use.

Every balance change is one TransactWriteItems: the key item's balance update carries the
condition that makes the rule hold (`balance >= :credits` for a reservation, `state = pending`
for a close, `attribute_not_exists` on the idempotency item for a top-up), together with the
reservation and posting items. DynamoDB applies all of a transaction or none of it, and checks
the conditions against the committed state, so concurrent gateways never overspend.

Table (`table_spec()`; docs/ledger.md draws it):

    pk               sk                      what
    key#<id>         key                     key_list, name, key_hash (sha256 only),
                                             created_at, expires_at?, revoked, balance,
                                             max_concurrency?, rate_limit_rpm?, in_flight,
                                             rpm_window?, rpm_count?
    key#<id>         post#<at_us>#<ns>#<id>  one posting: kind, credits (signed), at, ...;
                                             a settle also credits_charged and token counts
    key#<id>         topup#<idempotency>     a top-up already applied (never applied twice)
    res#<id>         res                     a reservation: key_id, credits_reserved,
                                             expires_at, state, pending_shard?, purge_at,
                                             counted (it holds one in_flight of its key)

`pending_shard` exists only while a reservation is pending, so the sparse index
`pending_by_deadline` (pending_shard, expires_at) lists exactly what `sweep_expired` must void;
`key_list` exists only on key items, so `keys_by_creation` lists keys without a table scan.
`purge_at` (the TTL attribute) lets DynamoDB delete reservation items RETENTION_S after they close (or after their
deadline, for one nobody swept). TTL deletes late and never refunds anything, so the sweeper,
not TTL, is what returns a crashed gateway's credits.

Per-key limits live on the key item, so the reserve transaction's one conditional update checks
them with the balance: `in_flight` (open reservations) goes up with the condition
`in_flight < :max` and down in the transaction that closes the reservation (settle, void,
sweep: the close is conditional on `state = pending`, so exactly once); the rate limit is a
fixed-window counter (`rpm_window`, `rpm_count`), updated in one of two forms: the same window
(`rpm_count + 1`, condition `rpm_window = :w AND rpm_count < :max`) or a new one (set both,
condition `rpm_window < :w` or none yet). The form is guessed from the window this process last
saw for the key (the first reservation of a window this process has not seen opens it while its
others wait); a refused update returns the key item as its condition saw it (ALL_OLD), which
says why, or that the other form is needed (the transaction runs again in it).

Errors: what DynamoDB or botocore raise becomes StoreUnavailable when the table cannot answer
now (no connection, timeouts, throttling, a 5xx, a missing table, refused credentials:
`_translate`), a bare StoreError otherwise (a request this module built wrong: a bug). Refused
arguments raise InvalidLedgerArgument before any request is made.

boto3 is imported when a store is built: the gateway starts without it when it uses SQLite.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

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
from r1nest.ledger.base import KeyRecord, Posting, PostingKind, Reservation, Usage, UsageBucket

TTL_ATTRIBUTE = "purge_at"
PENDING_INDEX = "pending_by_deadline"
KEYS_INDEX = "keys_by_creation"
PENDING_SHARDS = 8  # spreads the sparse index's writes over partitions
RETENTION_S = 30 * 86_400  # how long closed reservation items stay before TTL removes them
MAX_CONFLICT_RETRIES = 12  # TransactionConflict: another transaction held the same item
MAX_WORKERS = 32  # threads running blocking boto3 calls
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 8  # botocore's attempts per call (retries of throttling, 5xx, lost connections)
MAX_REMEMBERED_WINDOWS = 10_000  # keys whose rate-limit window this process remembers
WINDOW_OPENING_WAIT_S = 2.0  # how long a reservation waits for this process's opener of a window
USAGE_WORKERS = 8  # concurrent per-key queries of one usage() over all keys
MAX_SORT_US = 10**20 - 1  # posting sort keys hold times as 20 digits of microseconds

# Error codes (ClientError) that mean "the table cannot answer now": throttling, DynamoDB's own
# faults, a table that is not there (yet), credentials it refuses. Anything else is a request
# this module built wrong.
UNAVAILABLE_CODES = frozenset({
    "ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded",
    "LimitExceededException", "InternalServerError", "ServiceUnavailable",
    "ServiceUnavailableException", "TransactionInProgressException", "ResourceNotFoundException",
    "UnrecognizedClientException", "AccessDeniedException", "ExpiredTokenException",
    "ExpiredToken", "InvalidSignatureException", "MissingAuthenticationTokenException",
})
# TransactionCanceledException reasons that are contention or throttling, not a condition.
UNAVAILABLE_CANCELLATIONS = frozenset({"ThrottlingError", "ProvisionedThroughputExceeded", "TransactionConflict"})

T = TypeVar("T")


def table_spec() -> dict[str, Any]:
    """`create_table` arguments (less TableName) for the ledger table; also read by the Pulumi
    program and the Modal app so that every deployment builds the same table. Enable TTL on
    TTL_ATTRIBUTE as well (`create_table` below does)."""
    return {
        "AttributeDefinitions": [
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
            {"AttributeName": "pending_shard", "AttributeType": "S"},
            {"AttributeName": "expires_at", "AttributeType": "N"},
            {"AttributeName": "key_list", "AttributeType": "S"},
            {"AttributeName": "created_at", "AttributeType": "N"},
        ],
        "KeySchema": [
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        "GlobalSecondaryIndexes": [
            {
                "IndexName": PENDING_INDEX,
                "KeySchema": [
                    {"AttributeName": "pending_shard", "KeyType": "HASH"},
                    {"AttributeName": "expires_at", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "KEYS_ONLY"},
            },
            {
                # Only key items carry key_list, and balance changes touch no indexed
                # attribute, so this index costs one write per key created.
                "IndexName": KEYS_INDEX,
                "KeySchema": [
                    {"AttributeName": "key_list", "KeyType": "HASH"},
                    {"AttributeName": "created_at", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "KEYS_ONLY"},
            },
        ],
        "BillingMode": "PAY_PER_REQUEST",
    }


_shared_loader: list[Any] = []  # botocore's model loader, parsed once per process
_loader_lock = threading.Lock()


def make_client(region: str | None = None, endpoint_url: str | None = None) -> Any:
    """A DynamoDB client with bounded timeouts and retries; credentials come from boto3's
    usual chain (environment, profile, instance or task role)."""
    import boto3
    import botocore.loaders
    import botocore.session
    from botocore.config import Config

    with _loader_lock:
        if not _shared_loader:
            _shared_loader.append(botocore.loaders.create_loader())
        core = botocore.session.get_session()
        core.register_component("data_loader", _shared_loader[0])

    config = Config(
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        max_pool_connections=MAX_WORKERS,
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
    )
    return boto3.session.Session(botocore_session=core).client(
        "dynamodb", region_name=region, endpoint_url=endpoint_url, config=config
    )


def create_table(
    table: str, region: str | None = None, *, endpoint_url: str | None = None, client: Any = None
) -> None:
    """Create the ledger table (with TTL) and wait until it is active. For tests and local
    setups; deployments create it from `table_spec()` in their infrastructure code."""
    client = client or make_client(region, endpoint_url)
    created = client.create_table(TableName=table, **table_spec())
    if created["TableDescription"].get("TableStatus") != "ACTIVE":
        client.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 2, "MaxAttempts": 90})
    client.update_time_to_live(
        TableName=table, TimeToLiveSpecification={"AttributeName": TTL_ATTRIBUTE, "Enabled": True}
    )


class DynamoStore:
    def __init__(self, table: str, region: str | None = None, *, endpoint_url: str | None = None) -> None:
        try:
            import botocore.exceptions
        except ImportError:
            raise ConfigError("the DynamoDB ledger needs boto3: pip install 'r1nest[aws]'") from None
        self.table = table
        try:
            self._client = make_client(region, endpoint_url)
        except botocore.exceptions.BotoCoreError as exc:  # e.g. no region configured
            raise ConfigError(f"cannot set up the DynamoDB ledger client: {exc}") from None
        self._client_error = botocore.exceptions.ClientError
        self._boto_errors: tuple[type[Exception], ...] = (
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
        )
        self._bug_errors: tuple[type[Exception], ...] = (botocore.exceptions.ParamValidationError,)
        self._pool = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="r1nest-dynamodb")
        self._rpm_windows: dict[str, float] = {}  # key id -> the rate-limit window last seen
        self._window_openers: dict[str, threading.Lock] = {}  # key id -> held while opening one

    def create_table(self) -> None:
        """Create this store's table (see the module-level `create_table`)."""
        try:
            create_table(self.table, client=self._client)
        except self._boto_errors as exc:
            raise self._translate(exc, f"cannot create the DynamoDB table {self.table}") from None

    # Store interface ----------------------------------------------------------------------

    async def create_key(
        self, *, key_id: str, key_hash: str, name: str, credits: int, expires_at: float | None, now: float,
        max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
    ) -> KeyRecord:
        expires_at = rules.check_new_key(
            credits=credits, name=name, expires_at=expires_at, max_concurrency=max_concurrency,
            rate_limit_rpm=rate_limit_rpm,
        )
        return await self._call(
            lambda: self._create_key(key_id, key_hash, name, credits, expires_at, now, max_concurrency, rate_limit_rpm)
        )

    async def set_key_limits(
        self, key_id: str, *, max_concurrency: int | None, rate_limit_rpm: int | None
    ) -> KeyRecord:
        rules.check_limits(max_concurrency, rate_limit_rpm)
        return await self._call(lambda: self._set_key_limits(key_id, max_concurrency, rate_limit_rpm))

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self._call(lambda: self._get_key(key_id))

    async def list_keys(self) -> list[KeyRecord]:
        return await self._call(self._list_keys)

    async def revoke_key(self, key_id: str) -> KeyRecord:
        return await self._call(lambda: self._revoke_key(key_id))

    async def topup(self, key_id: str, credits: int, *, idempotency_key: str, now: float) -> int:
        rules.check_credits(credits, what="top-up credits", minimum=1)
        rules.check_idempotency_key(idempotency_key)
        return await self._call(lambda: self._topup(key_id, credits, idempotency_key, now))

    async def balance(self, key_id: str) -> int:
        return await self._call(lambda: self._require_key(key_id).remaining_credits)

    async def reserve(
        self, key_id: str, credits: int, *, ttl_s: float, now: float,
        max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
    ) -> Reservation:
        rules.check_reservation(
            credits=credits, ttl_s=ttl_s, max_concurrency=max_concurrency, rate_limit_rpm=rate_limit_rpm
        )
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(
            self._pool, self._guard(lambda: self._reserve(key_id, credits, ttl_s, now, max_concurrency, rate_limit_rpm))
        )
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            # The caller stopped waiting; if the reservation went through, give it back now
            # rather than at the sweep after its deadline.
            def void_if_made(done: asyncio.Future[Reservation]) -> None:
                if not done.cancelled() and done.exception() is None:
                    try:
                        self._pool.submit(self._guard(lambda: self._close(done.result().reservation_id, None, now)))
                    except RuntimeError:
                        pass  # the store closed: the sweeper voids it after its deadline

            running.add_done_callback(void_if_made)
            raise

    async def settle(
        self, reservation_id: str, credits_charged: int, *, now: float, usage: Usage | None = None
    ) -> int:
        rules.check_credits(credits_charged, what="charged credits")
        usage = rules.check_usage(usage) or Usage()
        return await self._call(lambda: self._close(reservation_id, credits_charged, now, usage))

    async def void(self, reservation_id: str, *, now: float) -> int:
        return await self._call(lambda: self._close(reservation_id, None, now))

    async def sweep_expired(self, *, now: float) -> int:
        return await self._call(lambda: self._sweep_expired(now))

    async def postings(self, key_id: str) -> list[Posting]:
        return await self._call(lambda: self._postings(key_id))

    async def usage(
        self, *, key_id: str | None, since: float, until: float, bucket_s: int
    ) -> list[UsageBucket]:
        since, until, bucket_s = rules.check_usage_range(since, until, bucket_s)
        return await self._call(lambda: self._usage(key_id, since, until, bucket_s))

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        self._client.close()

    # blocking operations (run on the pool) ------------------------------------------------

    async def _call(self, operation: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._guard(operation))

    def _guard(self, operation: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            try:
                return operation()
            except self._boto_errors as exc:
                raise self._translate(exc, "DynamoDB ledger error") from None

        return run

    def _translate(self, exc: Exception, what: str) -> StoreError:
        """StoreUnavailable for a table that cannot answer now; a bare StoreError for a bug."""
        if isinstance(exc, self._client_error):
            code = _code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            reasons = {r.get("Code") for r in exc.response.get("CancellationReasons", [])}
            if code in UNAVAILABLE_CODES or status >= 500 or reasons & UNAVAILABLE_CANCELLATIONS:
                return StoreUnavailable(f"{what}: {_describe(exc)}")
            return StoreError(f"{what}: {_describe(exc)}")
        if isinstance(exc, self._bug_errors):
            return StoreError(f"{what}: {_describe(exc)}")
        # BotoCoreError: no connection, timeouts, closed connections, no credentials...
        return StoreUnavailable(f"{what}: {type(exc).__name__}: {_describe(exc)}")

    def _create_key(
        self, key_id: str, key_hash: str, name: str, credits: int, expires_at: float | None, now: float,
        max_concurrency: int | None, rate_limit_rpm: int | None,
    ) -> KeyRecord:
        item: dict[str, Any] = {
            "pk": _s(f"key#{key_id}"), "sk": _s("key"), "key_list": _s("key"),
            "name": _s(name), "key_hash": _s(key_hash),
            "created_at": _n(now), "revoked": {"BOOL": False}, "balance": _n(credits), "in_flight": _n(0),
        }
        if expires_at is not None:
            item["expires_at"] = _n(expires_at)
        if max_concurrency is not None:
            item["max_concurrency"] = _n(max_concurrency)
        if rate_limit_rpm is not None:
            item["rate_limit_rpm"] = _n(rate_limit_rpm)
        reasons = self._transact([
            {"Put": {"TableName": self.table, "Item": item, "ConditionExpression": "attribute_not_exists(pk)"}},
            self._posting_put(key_id, "grant", credits, now),
        ])
        if reasons is not None:
            raise InvalidLedgerArgument(f"key id {key_id} already exists")
        return KeyRecord(
            key_id, name, key_hash, now, expires_at, False, credits, max_concurrency, rate_limit_rpm
        )

    def _set_key_limits(
        self, key_id: str, max_concurrency: int | None, rate_limit_rpm: int | None
    ) -> KeyRecord:
        # Both replaced: a limit given is SET, a None is REMOVEd (the item has no attribute then).
        limits = {"max_concurrency": max_concurrency, "rate_limit_rpm": rate_limit_rpm}
        given = {name: value for name, value in limits.items() if value is not None}
        removed = [name for name in limits if name not in given]
        clauses = []
        request: dict[str, Any] = {}
        if given:
            clauses.append("SET " + ", ".join(f"{name} = :{name}" for name in given))
            request["ExpressionAttributeValues"] = {f":{name}": _n(value) for name, value in given.items()}
        if removed:
            clauses.append("REMOVE " + ", ".join(removed))
        return self._update_key(key_id, UpdateExpression=" ".join(clauses), **request)

    def _update_key(self, key_id: str, **request: Any) -> KeyRecord:
        """Update an existing key's item (UnknownKey when there is none); the record after."""
        try:
            item = self._client.update_item(
                TableName=self.table, Key=_key_pk(key_id), ConditionExpression="attribute_exists(pk)",
                ReturnValues="ALL_NEW", **request,
            )["Attributes"]
        except self._client_error as exc:
            if _code(exc) == "ConditionalCheckFailedException":
                raise UnknownKey(f"no key with id {key_id}") from None
            raise
        return _key_record(item)

    def _get_key(self, key_id: str) -> KeyRecord | None:
        item = self._client.get_item(
            TableName=self.table, Key=_key_pk(key_id), ConsistentRead=True
        ).get("Item")
        return _key_record(item) if item else None

    def _require_key(self, key_id: str) -> KeyRecord:
        record = self._get_key(key_id)
        if record is None:
            raise UnknownKey(f"no key with id {key_id}")
        return record

    def _list_keys(self) -> list[KeyRecord]:
        # The sparse index names every key without reading postings; the items come in
        # consistent batches of 100 (BatchGetItem's limit).
        names: list[dict[str, Any]] = []
        for page in self._client.get_paginator("query").paginate(
            TableName=self.table, IndexName=KEYS_INDEX,
            KeyConditionExpression="key_list = :key",
            ExpressionAttributeValues={":key": _s("key")},
        ):
            names.extend({"pk": item["pk"], "sk": item["sk"]} for item in page["Items"])
        records: list[KeyRecord] = []
        for start in range(0, len(names), 100):
            wanted: dict[str, Any] = {self.table: {"Keys": names[start:start + 100], "ConsistentRead": True}}
            for attempt in range(MAX_CONFLICT_RETRIES):
                answer = self._client.batch_get_item(RequestItems=wanted)
                records.extend(_key_record(item) for item in answer["Responses"].get(self.table, []))
                wanted = answer.get("UnprocessedKeys") or {}
                if not wanted:
                    break
                time.sleep(min(0.5, 0.01 * 2**attempt))
            else:
                raise StoreUnavailable("DynamoDB kept deferring the key listing; try again")
        return sorted(records, key=lambda k: (k.created_at, k.key_id))

    def _revoke_key(self, key_id: str) -> KeyRecord:
        return self._update_key(
            key_id, UpdateExpression="SET revoked = :true", ExpressionAttributeValues={":true": {"BOOL": True}}
        )

    def _topup(self, key_id: str, credits: int, idempotency_key: str, now: float) -> int:
        reasons = self._transact([
            {"Put": {
                "TableName": self.table,
                "Item": {"pk": _s(f"key#{key_id}"), "sk": _s(f"topup#{idempotency_key}"),
                         "credits": _n(credits), "at": _n(now)},
                "ConditionExpression": "attribute_not_exists(pk)",
            }},
            {"Update": {
                "TableName": self.table, "Key": _key_pk(key_id),
                "UpdateExpression": "SET balance = balance + :credits",
                "ConditionExpression": "attribute_exists(pk) AND balance <= :most",
                "ExpressionAttributeValues": {":credits": _n(credits), ":most": _n(rules.MAX_CREDITS - credits)},
            }},
            self._posting_put(key_id, "topup", credits, now, note=f"idempotency-key {idempotency_key}"),
        ])
        record = self._require_key(key_id)
        if reasons is not None and reasons[0] != "ConditionalCheckFailed":
            # the key does not exist (raised above) or the balance would leave its bounds
            rules.check_balance_after(record.remaining_credits, credits)
            # the balance was too high when the transaction ran and has come down since
            raise InvalidLedgerArgument(f"top-up refused: the balance would exceed {rules.MAX_CREDITS} credits")
        return record.remaining_credits

    def _reserve(
        self, key_id: str, credits: int, ttl_s: float, now: float,
        max_concurrency: int | None, rate_limit_rpm: int | None,
    ) -> Reservation:
        if self._knows_window(key_id, now):
            return self._reserve_in_window(key_id, credits, ttl_s, now, max_concurrency, rate_limit_rpm)
        # A window this process has not seen yet: the first reservation opens it and this
        # process's others wait for it (about one round trip), instead of all guessing "new"
        # and all but one failing and retrying. Only a matter of cost: the conditions decide.
        if len(self._window_openers) >= MAX_REMEMBERED_WINDOWS:
            self._window_openers.clear()
        opener = self._window_openers.setdefault(key_id, threading.Lock())
        acquired = opener.acquire(timeout=WINDOW_OPENING_WAIT_S)
        try:
            if not self._knows_window(key_id, now):
                return self._reserve_in_window(key_id, credits, ttl_s, now, max_concurrency, rate_limit_rpm)
        finally:
            if acquired:
                opener.release()
        return self._reserve_in_window(key_id, credits, ttl_s, now, max_concurrency, rate_limit_rpm)

    def _knows_window(self, key_id: str, now: float) -> bool:
        """Whether the key's window holding `now` (or a later one) is the last this process saw."""
        return self._rpm_windows.get(key_id, -math.inf) >= rules.rpm_window(now)

    def _reserve_in_window(
        self, key_id: str, credits: int, ttl_s: float, now: float,
        max_concurrency: int | None, rate_limit_rpm: int | None,
    ) -> Reservation:
        reservation_id = uuid.uuid4().hex
        expires_at = now + ttl_s
        # The guess of the window's form, from what this process saw last (no read first).
        window = rules.rpm_window(now)
        same_window = self._knows_window(key_id, now)
        if same_window:
            window = self._rpm_windows.get(key_id, window)
        for _ in range(MAX_CONFLICT_RETRIES):
            reasons = self._transact_detailed([
                {"Update": _reserve_update(
                    self.table, key_id, credits, now, window, same_window, max_concurrency, rate_limit_rpm
                )},
                {"Put": {
                    "TableName": self.table,
                    "Item": {
                        "pk": _s(f"res#{reservation_id}"), "sk": _s("res"), "key_id": _s(key_id),
                        "credits_reserved": _n(credits), "created_at": _n(now),
                        "expires_at": _n(expires_at), "state": _s("pending"),
                        "pending_shard": _s(_shard(reservation_id)), "counted": {"BOOL": True},
                        TTL_ATTRIBUTE: _n(int(expires_at) + RETENTION_S),
                    },
                    "ConditionExpression": "attribute_not_exists(pk)",
                }},
                self._posting_put(key_id, "reserve", -credits, now, reservation_id=reservation_id),
            ])
            if reasons is None:
                self._remember_window(key_id, window)
                # The balance read after the commit: other gateways' changes may already be in it.
                record = self._require_key(key_id)
                return Reservation(reservation_id, key_id, credits, expires_at, record.remaining_credits)
            # Refused: the key item as the condition saw it says why, or which window form it
            # needs (then the transaction runs again in that form).
            refused = reasons[0]
            item = refused.get("Item") if refused.get("Code") == "ConditionalCheckFailed" else None
            if item is None:  # no such key, or the reservation's own put refused: read the key
                item = self._client.get_item(
                    TableName=self.table, Key=_key_pk(key_id), ConsistentRead=True
                ).get("Item")
            window, same_window = self._why_refused(
                item, key_id, credits, now, window, max_concurrency, rate_limit_rpm
            )
        raise StoreUnavailable("the DynamoDB ledger is too contended; try again")

    def _why_refused(
        self, item: dict[str, Any] | None, key_id: str, credits: int, now: float, window: float,
        max_concurrency: int | None, rate_limit_rpm: int | None,
    ) -> tuple[float, bool]:
        """Raise the reason a reservation's condition failed, judged on the key item (the same
        order as every store: key, balance, max_concurrency, rate_limit_rpm); or, when nothing in
        it refuses the reservation, the window and form to try again with."""
        if item is None:
            raise UnknownKey(f"no key with id {key_id}")
        record = _key_record(item)
        if not record.usable(now):
            raise UnknownKey(f"key {key_id} is revoked or expired")
        if record.remaining_credits < credits:
            raise InsufficientCredits(record.remaining_credits, credits)
        if max_concurrency is not None and int(item.get("in_flight", _n(0))["N"]) >= max_concurrency:
            raise KeyLimitReached("max_concurrency", 1.0)
        if "rpm_window" not in item or float(item["rpm_window"]["N"]) < window:
            self._rpm_windows.pop(key_id, None)
            return window, False
        # The key's window is this one, or a later one another gateway's clock opened (a counter
        # never moves back): count in it.
        window = float(item["rpm_window"]["N"])
        self._remember_window(key_id, window)
        if rate_limit_rpm is not None and int(item["rpm_count"]["N"]) >= rate_limit_rpm:
            raise KeyLimitReached("rate_limit_rpm", window + rules.RPM_WINDOW_S - now)
        return window, True

    def _remember_window(self, key_id: str, window: float) -> None:
        if len(self._rpm_windows) >= MAX_REMEMBERED_WINDOWS:
            self._rpm_windows.clear()  # a bound, not a cache policy: a miss costs one retry
        self._rpm_windows[key_id] = window

    def _close(
        self, reservation_id: str, credits_charged: int | None, now: float, usage: Usage | None = None
    ) -> int:
        item = self._client.get_item(
            TableName=self.table, Key={"pk": _s(f"res#{reservation_id}"), "sk": _s("res")},
            ConsistentRead=True,
        ).get("Item")
        if item is None:
            raise InvalidLedgerArgument(f"no reservation with id {reservation_id}")
        state = item["state"]["S"]
        if state != "pending":
            raise ReservationClosed(f"reservation {reservation_id} is already {state}")
        key_id = item["key_id"]["S"]
        credits_reserved = int(item["credits_reserved"]["N"])
        # Reservations made before per-key limits hold no in_flight: only counted ones give one back.
        counted = item.get("counted", {}).get("BOOL", False)
        kind: PostingKind
        if credits_charged is None:
            new_state, refund, note, kind = "voided", credits_reserved, "", "void"
        else:
            rules.check_charge(credits_charged, credits_reserved)
            new_state, refund, note, kind = (
                "settled", credits_reserved - credits_charged, f"charged {credits_charged}", "settle",
            )
        values: dict[str, Any] = {
            ":pending": _s("pending"), ":state": _s(new_state), ":now": _n(now),
            ":ttl": _n(int(now) + RETENTION_S),
        }
        update = f"SET #state = :state, closed_at = :now, {TTL_ATTRIBUTE} = :ttl"
        if credits_charged is not None:
            update += ", credits_charged = :charged"
            values[":charged"] = _n(credits_charged)
        reasons = self._transact([
            {"Update": {
                "TableName": self.table, "Key": {"pk": _s(f"res#{reservation_id}"), "sk": _s("res")},
                "UpdateExpression": update + " REMOVE pending_shard",
                "ConditionExpression": "#state = :pending",
                "ExpressionAttributeNames": {"#state": "state"},
                "ExpressionAttributeValues": values,
            }},
            {"Update": {
                "TableName": self.table, "Key": _key_pk(key_id),
                "UpdateExpression": "SET balance = balance + :refund"
                + (", in_flight = in_flight - :one" if counted else ""),
                "ConditionExpression": "attribute_exists(pk)",
                "ExpressionAttributeValues": {":refund": _n(refund), **({":one": _n(1)} if counted else {})},
            }},
            self._posting_put(
                key_id, kind, refund, now, reservation_id=reservation_id, note=note,
                settled=None if credits_charged is None else (credits_charged, usage or Usage()),
            ),
        ])
        if reasons is not None:
            raise ReservationClosed(f"reservation {reservation_id} was closed by someone else")
        return self._require_key(key_id).remaining_credits

    def _sweep_expired(self, now: float) -> int:
        voided = 0
        paginator = self._client.get_paginator("query")
        for shard in range(PENDING_SHARDS):
            for page in paginator.paginate(
                TableName=self.table, IndexName=PENDING_INDEX,
                KeyConditionExpression="pending_shard = :shard AND expires_at <= :now",
                ExpressionAttributeValues={":shard": _s(str(shard)), ":now": _n(now)},
            ):
                for item in page["Items"]:
                    try:
                        self._close(item["pk"]["S"].removeprefix("res#"), None, now)
                    except ReservationClosed:
                        continue  # closed since the index was read (it lags the table)
                    voided += 1
        return voided

    def _postings(self, key_id: str) -> list[Posting]:
        self._require_key(key_id)
        postings = []
        for page in self._client.get_paginator("query").paginate(
            TableName=self.table,
            KeyConditionExpression="pk = :pk AND begins_with(sk, :post)",
            ExpressionAttributeValues={":pk": _s(f"key#{key_id}"), ":post": _s("post#")},
            ConsistentRead=True,
        ):
            for item in page["Items"]:
                postings.append(Posting(
                    key_id=key_id,
                    kind=item["kind"]["S"],
                    credits=int(item["credits"]["N"]),
                    at=float(item["at"]["N"]),
                    reservation_id=item["reservation_id"]["S"] if "reservation_id" in item else None,
                    note=item["note"]["S"],
                ))
        return postings

    def _usage(self, key_id: str | None, since: float, until: float, bucket_s: int) -> list[UsageBucket]:
        """Sum the settle postings of [since, until) by bucket, in Python: DynamoDB has no
        aggregation. One key: one Query of its postings in the range (sort keys start with the
        time). All keys: the key ids from the keys_by_creation index, then one such Query per key,
        USAGE_WORKERS at a time. That reads only postings of the range (plus one request per key),
        where a Scan would read every item of the table, whose postings are never deleted; admin
        usage over all keys is the expensive call (docs/ledger.md, cost)."""
        if key_id is not None:
            self._require_key(key_id)
            key_ids = [key_id]
        else:
            key_ids = self._key_ids()
        sums: dict[float, list[int]] = {}
        with ThreadPoolExecutor(max_workers=USAGE_WORKERS, thread_name_prefix="r1nest-dynamodb-usage") as pool:
            for settles in pool.map(lambda k: self._settles(k, since, until), key_ids):
                for at, charged, prompt, cached, completion in settles:
                    row = sums.setdefault(rules.bucket_start(at, bucket_s), [0, 0, 0, 0, 0])
                    row[0] += 1
                    row[1] += prompt
                    row[2] += cached
                    row[3] += completion
                    row[4] += charged
        return [UsageBucket(start, *row) for start, row in sorted(sums.items())]

    def _key_ids(self) -> list[str]:
        key_ids: list[str] = []
        for page in self._client.get_paginator("query").paginate(
            TableName=self.table, IndexName=KEYS_INDEX,
            KeyConditionExpression="key_list = :key",
            ExpressionAttributeValues={":key": _s("key")},
        ):
            key_ids.extend(item["pk"]["S"].removeprefix("key#") for item in page["Items"])
        return key_ids

    def _settles(self, key_id: str, since: float, until: float) -> list[tuple[float, int, int, int, int]]:
        """(at, charged, prompt, cached, completion) of the key's settles in [since, until)."""
        # The sort key range is widened by 1 us on each side (sort keys hold rounded
        # microseconds); the exact bounds are applied to `at` below.
        low = min(MAX_SORT_US, max(0, math.floor(since * 1_000_000) - 1))
        high = min(MAX_SORT_US, max(0, math.ceil(until * 1_000_000) + 1))
        settles = []
        for page in self._client.get_paginator("query").paginate(
            TableName=self.table,
            KeyConditionExpression="pk = :pk AND sk BETWEEN :low AND :high",
            FilterExpression="#kind = :settle",
            ExpressionAttributeNames={"#kind": "kind"},
            ExpressionAttributeValues={
                ":pk": _s(f"key#{key_id}"), ":low": _s(f"post#{low:020d}"), ":high": _s(f"post#{high:020d}"),
                ":settle": _s("settle"),
            },
            ConsistentRead=True,
        ):
            for item in page["Items"]:
                at = float(item["at"]["N"])
                if since <= at < until:
                    settles.append((
                        at, _charged(item), _count(item, "prompt_tokens"), _count(item, "cached_tokens"),
                        _count(item, "completion_tokens"),
                    ))
        return settles

    # helpers ------------------------------------------------------------------------------

    def _posting_put(
        self, key_id: str, kind: PostingKind, credits: int, now: float, *,
        reservation_id: str | None = None, note: str = "", settled: tuple[int, Usage] | None = None,
    ) -> dict[str, Any]:
        # Sort key: the posting's time (microseconds), then the wall clock when it was written
        # (orders postings with equal times as they happened), then a unique suffix.
        at_us, written_ns = round(now * 1_000_000), time.time_ns()
        item: dict[str, Any] = {
            "pk": _s(f"key#{key_id}"),
            "sk": _s(f"post#{at_us:020d}#{written_ns:020d}#{uuid.uuid4().hex[:8]}"),
            "kind": _s(kind), "credits": _n(credits), "at": _n(now), "note": _s(note),
        }
        if reservation_id is not None:
            item["reservation_id"] = _s(reservation_id)
        if settled is not None:  # what usage() sums
            credits_charged, usage = settled
            item.update({
                "credits_charged": _n(credits_charged), "prompt_tokens": _n(usage.prompt_tokens),
                "cached_tokens": _n(usage.cached_tokens), "completion_tokens": _n(usage.completion_tokens),
            })
        return {"Put": {"TableName": self.table, "Item": item}}

    def _transact(self, items: list[dict[str, Any]]) -> list[str] | None:
        """Run one transaction. None when it committed; the per-item cancellation codes when a
        condition failed. Conflicts with concurrent transactions are retried with backoff."""
        reasons = self._transact_detailed(items)
        return None if reasons is None else [r.get("Code", "None") for r in reasons]

    def _transact_detailed(self, items: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """`_transact` with the whole cancellation reasons (an item's `Item` when it asked for
        ReturnValuesOnConditionCheckFailure = ALL_OLD and its condition failed)."""
        token = str(uuid.uuid4())  # the same on botocore's retries: a lost answer never applies twice
        for attempt in range(MAX_CONFLICT_RETRIES):
            try:
                self._client.transact_write_items(TransactItems=items, ClientRequestToken=token)
                return None
            except self._client_error as exc:
                if _code(exc) != "TransactionCanceledException":
                    raise
                reasons: list[dict[str, Any]] = exc.response.get("CancellationReasons", [])
                codes = [r.get("Code", "None") for r in reasons]
                if "ConditionalCheckFailed" in codes:
                    return reasons
                if "TransactionConflict" not in codes:
                    raise
            time.sleep(min(0.5, 0.005 * 2**attempt) * random.random())
            token = str(uuid.uuid4())  # cancelled, nothing applied: a new attempt
        raise StoreUnavailable("the DynamoDB ledger is too contended; try again")


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _n(value: float) -> dict[str, str]:
    # Times keep microseconds, in fixed notation (str() of a float may use an exponent).
    return {"N": str(value) if isinstance(value, int) else f"{value:.6f}"}


def _key_pk(key_id: str) -> dict[str, Any]:
    return {"pk": _s(f"key#{key_id}"), "sk": _s("key")}


def _shard(reservation_id: str) -> str:
    return str(zlib.crc32(reservation_id.encode("ascii")) % PENDING_SHARDS)


def _reserve_update(
    table: str, key_id: str, credits: int, now: float, window: float, same_window: bool,
    max_concurrency: int | None, rate_limit_rpm: int | None,
) -> dict[str, Any]:
    """The key item's update in a reservation: debit, one more in flight, one more in the
    window, on the condition that the key is usable, the balance suffices and the limits given
    leave room. `same_window`: the key's counter is already in `window` (add one), else it is in
    an earlier one or none (start `window` at one)."""
    update = "SET balance = balance - :credits, in_flight = if_not_exists(in_flight, :zero) + :one"
    condition = (
        "attribute_exists(pk) AND balance >= :credits AND revoked = :false"
        " AND (attribute_not_exists(expires_at) OR expires_at > :now)"
    )
    values: dict[str, Any] = {
        ":credits": _n(credits), ":false": {"BOOL": False}, ":now": _n(now), ":zero": _n(0), ":one": _n(1),
        ":window": _n(window),
    }
    if max_concurrency is not None:
        condition += " AND (attribute_not_exists(in_flight) OR in_flight < :max_concurrency)"
        values[":max_concurrency"] = _n(max_concurrency)
    if same_window:
        update += ", rpm_count = rpm_count + :one"
        condition += " AND rpm_window = :window"
        if rate_limit_rpm is not None:
            condition += " AND rpm_count < :rate_limit_rpm"
            values[":rate_limit_rpm"] = _n(rate_limit_rpm)
    else:
        update += ", rpm_window = :window, rpm_count = :one"
        condition += " AND (attribute_not_exists(rpm_window) OR rpm_window < :window)"
    return {
        "TableName": table, "Key": _key_pk(key_id), "UpdateExpression": update,
        "ConditionExpression": condition, "ExpressionAttributeValues": values,
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",  # why it was refused, without a read
    }


def _charged(item: dict[str, Any]) -> int:
    """A settle posting's charge; one written before usage was recorded has it in its note only."""
    if "credits_charged" in item:
        return int(item["credits_charged"]["N"])
    note = item.get("note", {}).get("S", "")
    return int(note.removeprefix("charged ")) if note.startswith("charged ") else 0


def _count(item: dict[str, Any], name: str) -> int:
    return int(item[name]["N"]) if name in item else 0


def _key_record(item: dict[str, Any]) -> KeyRecord:
    return KeyRecord(
        key_id=item["pk"]["S"].removeprefix("key#"),
        name=item["name"]["S"],
        key_hash=item["key_hash"]["S"],
        created_at=float(item["created_at"]["N"]),
        expires_at=float(item["expires_at"]["N"]) if "expires_at" in item else None,
        revoked=item["revoked"]["BOOL"],
        remaining_credits=int(item["balance"]["N"]),
        max_concurrency=int(item["max_concurrency"]["N"]) if "max_concurrency" in item else None,
        rate_limit_rpm=int(item["rate_limit_rpm"]["N"]) if "rate_limit_rpm" in item else None,
    )


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _describe(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}".strip()
    return str(exc)
