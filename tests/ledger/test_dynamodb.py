"""DynamoDB specifics: two gateway processes racing on one table, the table's shape (TTL, sparse
pending index), and what is stored about a key."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from r1nest.accounts import authenticate, create_api_key
from r1nest.errors import KeyLimitReached
from r1nest.ledger.base import Usage, UsageBucket
from r1nest.ledger.dynamodb import (
    PENDING_INDEX,
    TTL_ATTRIBUTE,
    DynamoStore,
    create_table,
    make_client,
    table_spec,
)
from r1nest.testing.dynamodb import FAKE_AWS_ENV, REGION

from .conftest import MOTO_SERVER_READ_TIMEOUT_S, new_table_name

T0 = 1_700_000_000.0
KEY_ID = "0123456789ab"

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from r1nest.errors import InsufficientCredits
    from r1nest.ledger import dynamodb
    from r1nest.ledger.dynamodb import DynamoStore

    table, endpoint, key_id, attempts, t0 = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    dynamodb.READ_TIMEOUT_S = float(sys.argv[6])  # moto's one-at-a-time queue (see conftest.py)

    async def main():
        store = DynamoStore(table, "us-east-1", endpoint_url=endpoint)
        print("ready", flush=True)
        sys.stdin.readline()  # both processes start together

        async def reserve():
            try:
                return await store.reserve(key_id, 25, ttl_s=600, now=t0)
            except InsufficientCredits:
                return None

        started = time.time()
        made = [r for r in await asyncio.gather(*[reserve() for _ in range(attempts)]) if r]
        finished = time.time()
        # Settles give credits back: none before both processes are done reserving, or a late
        # reservation of one could spend what the other gave back.
        print("reserved", flush=True)
        sys.stdin.readline()
        # settle each at a charge of its own: 0..25 credits
        charges = [i % 26 for i in range(len(made))]
        await asyncio.gather(*[store.settle(r.reservation_id, c, now=t0) for r, c in zip(made, charges)])
        await store.close()
        print(json.dumps({"made": len(made), "charged": sum(charges), "span": [started, finished],
                          "lowest_remaining": min((r.remaining_credits for r in made), default=0)}), flush=True)

    asyncio.run(main())
    """
)


@pytest.fixture
async def server_store(fake_aws, moto_endpoint):
    table = new_table_name()
    create_table(table, REGION, endpoint_url=moto_endpoint)
    store = DynamoStore(table, REGION, endpoint_url=moto_endpoint)
    yield store, table, moto_endpoint
    await store.close()


async def test_two_processes_racing_200_reservations_never_overspend(server_store) -> None:
    """Issue 7: two gateway processes share one table; 200 reservations at once, 60 affordable."""
    store, table, endpoint = server_store
    affordable = 60
    initial = affordable * 25 + 13
    await store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="t", credits=initial, expires_at=None, now=T0)

    env = {**os.environ, **FAKE_AWS_ENV}

    argv = [sys.executable, "-c", CHILD, table, endpoint, KEY_ID, "100", str(T0), str(MOTO_SERVER_READ_TIMEOUT_S)]
    outputs = await asyncio.to_thread(run_in_lockstep, [argv, argv], env, [("ready", "go"), ("reserved", "settle")])
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

    assert sum(r["made"] for r in results) == affordable  # not one more, not one less
    (first_start, first_end), (second_start, second_end) = (r["span"] for r in results)
    assert first_start < second_end and second_start < first_end  # the processes really raced
    assert all(r["lowest_remaining"] >= 0 for r in results)
    charged = sum(r["charged"] for r in results)
    balance = await store.balance(KEY_ID)
    assert balance == initial - charged
    postings = await store.postings(KEY_ID)
    assert sum(p.credits for p in postings) == balance
    assert sum(1 for p in postings if p.kind == "reserve") == affordable
    assert sum(1 for p in postings if p.kind == "settle") == affordable


async def test_table_has_ttl_and_a_sparse_pending_index(server_store) -> None:
    store, table, endpoint = server_store
    client = make_client(REGION, endpoint)
    ttl = client.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    assert (ttl["AttributeName"], ttl["TimeToLiveStatus"]) == (TTL_ATTRIBUTE, "ENABLED")

    await store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="t", credits=100, expires_at=None, now=T0)
    reservation = await store.reserve(KEY_ID, 10, ttl_s=60, now=T0)
    key = {"pk": {"S": f"res#{reservation.reservation_id}"}, "sk": {"S": "res"}}
    item = client.get_item(TableName=table, Key=key)["Item"]
    assert "pending_shard" in item
    # TTL must never delete a reservation before the sweeper can void it
    assert int(item[TTL_ATTRIBUTE]["N"]) >= reservation.expires_at + 86_400

    def pending_in_index() -> int:
        return sum(
            client.query(
                TableName=table, IndexName=PENDING_INDEX,
                KeyConditionExpression="pending_shard = :s",
                ExpressionAttributeValues={":s": {"S": str(shard)}},
            )["Count"]
            for shard in range(8)
        )

    assert pending_in_index() == 1
    await store.settle(reservation.reservation_id, 4, now=T0 + 1)
    item = client.get_item(TableName=table, Key=key)["Item"]
    assert "pending_shard" not in item and item["state"]["S"] == "settled"
    assert item["credits_charged"]["N"] == "4"
    assert pending_in_index() == 0


def test_table_spec_is_plain_data_for_infrastructure_code() -> None:
    spec = table_spec()
    json.dumps(spec)  # the Pulumi program and the Modal app read it
    assert {k["AttributeName"] for k in spec["KeySchema"]} == {"pk", "sk"}
    defined = {a["AttributeName"] for a in spec["AttributeDefinitions"]}
    keyed = {k["AttributeName"] for k in spec["KeySchema"]} | {
        k["AttributeName"] for index in spec["GlobalSecondaryIndexes"] for k in index["KeySchema"]
    }
    assert defined == keyed  # DynamoDB refuses definitions that no key uses
    assert spec["BillingMode"] == "PAY_PER_REQUEST"


async def test_only_the_key_hash_is_stored(server_store) -> None:
    store, table, endpoint = server_store
    record, plaintext = await create_api_key(store, name="alice", credits=10, now=T0)
    assert await authenticate(store, plaintext, now=T0) == record
    items = make_client(REGION, endpoint).scan(TableName=table)["Items"]
    dumped = json.dumps(items)
    secret = plaintext.split("-", 2)[2]
    assert secret not in dumped and plaintext not in dumped
    assert record.key_hash in dumped


async def test_open_store_builds_a_dynamodb_store(fake_aws, moto_endpoint) -> None:
    from r1nest.ledger import open_store
    from r1nest.settings import Settings

    table = new_table_name()
    create_table(table, REGION, endpoint_url=moto_endpoint)
    settings = Settings(store="dynamodb", dynamodb_table=table, aws_region=REGION, dynamodb_endpoint_url=moto_endpoint)
    store = open_store(settings)
    assert isinstance(store, DynamoStore)
    assert await store.list_keys() == []
    await store.close()


def test_open_store_without_a_table_is_a_config_error() -> None:
    from r1nest.errors import ConfigError
    from r1nest.ledger import open_store
    from r1nest.settings import Settings

    with pytest.raises(ConfigError, match="dynamodb_table"):
        open_store(Settings(store="dynamodb"))


async def test_an_unreachable_table_is_store_unavailable(fake_aws, moto_endpoint) -> None:
    from r1nest.errors import StoreUnavailable

    store = DynamoStore("no-such-table", REGION, endpoint_url=moto_endpoint)
    with pytest.raises(StoreUnavailable, match="ResourceNotFound"):
        await store.balance(KEY_ID)
    await store.close()


# outages: the table cannot answer -> StoreUnavailable (HTTP 503), never "bad request" ----------

MOTO_SERVER_CHILD = textwrap.dedent(
    """
    import sys
    from r1nest.testing.dynamodb import moto_dynamodb_server

    with moto_dynamodb_server() as endpoint:
        print(endpoint, flush=True)
        sys.stdin.readline()
    """
)


@pytest.fixture
def fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """One attempt per call and short timeouts: botocore's backoff over 8 attempts (tens of
    seconds on a dead endpoint) is not what these tests are about."""
    from r1nest.ledger import dynamodb

    monkeypatch.setattr(dynamodb, "MAX_ATTEMPTS", 1)
    monkeypatch.setattr(dynamodb, "CONNECT_TIMEOUT_S", 2.0)
    monkeypatch.setattr(dynamodb, "READ_TIMEOUT_S", 2.0)


def every_operation(store: DynamoStore) -> list:
    return [
        store.get_key(KEY_ID),
        store.list_keys(),
        store.balance(KEY_ID),
        store.create_key(key_id="ba0ba0ba0ba0", key_hash="f" * 64, name="", credits=1, expires_at=None, now=T0),
        store.revoke_key(KEY_ID),
        store.topup(KEY_ID, 5, idempotency_key="t", now=T0),
        store.reserve(KEY_ID, 5, ttl_s=60, now=T0),
        store.void("f" * 32, now=T0),
        store.sweep_expired(now=T0),
        store.postings(KEY_ID),
        store.set_key_limits(KEY_ID, max_concurrency=1, rate_limit_rpm=None),
        store.reserve(KEY_ID, 5, ttl_s=60, now=T0, max_concurrency=2, rate_limit_rpm=2),
        store.settle("f" * 32, 0, now=T0, usage=Usage(1, 0, 1)),
        store.usage(key_id=None, since=T0, until=T0 + 60, bucket_s=60),
        store.usage(key_id=KEY_ID, since=T0, until=T0 + 60, bucket_s=60),
    ]


async def assert_every_operation_is_unavailable(store: DynamoStore) -> None:
    from r1nest.errors import StoreUnavailable

    for call in every_operation(store):
        with pytest.raises(StoreUnavailable):
            await call


async def test_a_killed_server_is_store_unavailable(fake_aws, fail_fast) -> None:
    """moto's server in its own process, killed: nothing listens on its port any more."""
    child = subprocess.Popen(
        [sys.executable, "-c", MOTO_SERVER_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        endpoint = (await asyncio.to_thread(child.stdout.readline)).strip()
        assert endpoint.startswith("http://127.0.0.1:"), endpoint
        store = DynamoStore(new_table_name(), REGION, endpoint_url=endpoint)
        await asyncio.to_thread(store.create_table)
        await store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="t", credits=100, expires_at=None, now=T0)
        assert await store.balance(KEY_ID) == 100
    finally:
        child.kill()
        child.wait(30)
    await assert_every_operation_is_unavailable(store)
    await store.close()


async def test_a_server_that_stopped_answering_is_store_unavailable(fake_aws, fail_fast) -> None:
    """moto's server stopped in this process: its socket still accepts, nothing answers (a hung
    server): the read timeout ends each call."""
    from r1nest.testing.dynamodb import moto_dynamodb_server

    with moto_dynamodb_server() as endpoint:
        store = DynamoStore(new_table_name(), REGION, endpoint_url=endpoint)
        await asyncio.to_thread(store.create_table)
        await store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="t", credits=100, expires_at=None, now=T0)
    from r1nest.errors import StoreUnavailable

    for call in (store.balance(KEY_ID), store.reserve(KEY_ID, 5, ttl_s=60, now=T0)):
        with pytest.raises(StoreUnavailable):
            await call
    await store.close()


async def test_an_endpoint_nobody_listens_on_is_store_unavailable(fake_aws, fail_fast) -> None:
    import socket

    with socket.socket() as closed:  # a port that was free a moment ago: connection refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    store = DynamoStore(new_table_name(), REGION, endpoint_url=f"http://127.0.0.1:{port}")
    await assert_every_operation_is_unavailable(store)
    from r1nest.errors import StoreUnavailable

    with pytest.raises(StoreUnavailable, match="cannot create the DynamoDB table"):
        await asyncio.to_thread(store.create_table)
    await store.close()


def stubbed_error(code: str, status: int, **response: object) -> DynamoStore:
    """A store whose next GetItem (and TransactWriteItems) fails with `code` (botocore's
    Stubber: no network)."""
    from botocore.stub import Stubber

    store = DynamoStore("t", REGION, endpoint_url="http://127.0.0.1:9")
    stubber = Stubber(store._client)
    stubber.add_client_error("get_item", service_error_code=code, http_status_code=status, **response)
    stubber.activate()
    return store


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ProvisionedThroughputExceededException", 400),
        ("ThrottlingException", 400),
        ("RequestLimitExceeded", 400),
        ("InternalServerError", 500),
        ("ServiceUnavailable", 503),
        ("SomethingNewAndTransient", 503),  # any 5xx
        ("UnrecognizedClientException", 400),  # credentials refused: nothing this call can fix
    ],
)
async def test_throttling_and_server_faults_are_store_unavailable(fake_aws, code: str, status: int) -> None:
    from r1nest.errors import StoreUnavailable

    store = stubbed_error(code, status)
    with pytest.raises(StoreUnavailable, match=code):
        await store.get_key(KEY_ID)
    await store.close()


async def test_a_request_dynamodb_calls_invalid_is_a_bug_not_an_outage(fake_aws) -> None:
    """ValidationException: a request this module built wrong. Neither 503 nor the caller's
    fault (400): a bare StoreError, which the gateway answers 500 and logs."""
    from r1nest.errors import InvalidLedgerArgument, StoreError, StoreUnavailable

    store = stubbed_error("ValidationException", 400)
    with pytest.raises(StoreError) as caught:
        await store.get_key(KEY_ID)
    assert not isinstance(caught.value, (StoreUnavailable, InvalidLedgerArgument))
    await store.close()


async def test_a_transaction_cancelled_by_throttling_is_store_unavailable(fake_aws) -> None:
    from botocore.stub import Stubber
    from r1nest.errors import StoreUnavailable

    store = DynamoStore("t", REGION, endpoint_url="http://127.0.0.1:9")
    stubber = Stubber(store._client)
    stubber.add_client_error(
        "transact_write_items", service_error_code="TransactionCanceledException", http_status_code=400,
        response_meta={}, modeled_fields={"CancellationReasons": [{"Code": "ThrottlingError"}, {"Code": "None"}]},
    )
    stubber.activate()
    with pytest.raises(StoreUnavailable, match="TransactionCanceled"):
        await store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="", credits=1, expires_at=None, now=T0)
    await store.close()


def test_without_boto3_the_dynamodb_store_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from r1nest.errors import ConfigError

    monkeypatch.setitem(sys.modules, "botocore.exceptions", None)  # import fails
    with pytest.raises(ConfigError, match="needs boto3"):
        DynamoStore("t", REGION)


async def test_list_keys_reads_the_key_index_in_batches(server_store) -> None:
    """More keys than one BatchGetItem returns; postings in the table are not listed as keys."""
    store, _, _ = server_store
    for i in range(105):
        await store.create_key(key_id=f"{i:012x}", key_hash="f" * 64, name=f"k{i}", credits=1, expires_at=None, now=T0 + i)
    await store.reserve(f"{0:012x}", 1, ttl_s=60, now=T0)
    listed = await store.list_keys()
    assert [k.key_id for k in listed] == [f"{i:012x}" for i in range(105)]
    assert listed[0].remaining_credits == 0  # read from the table, not from the index


async def test_a_cancelled_reserve_gives_its_credits_back(server_store) -> None:
    store, _, _ = server_store
    await store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="t", credits=100, expires_at=None, now=T0)
    task = asyncio.create_task(store.reserve(KEY_ID, 60, ttl_s=3600, now=T0))
    await asyncio.sleep(0)  # handed to a worker thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 30  # the void runs on a worker thread after the cancel
    while (kinds := [p.kind for p in await store.postings(KEY_ID)]) != ["grant", "reserve", "void"]:
        assert time.monotonic() < deadline, kinds
        await asyncio.sleep(0.02)
    assert await store.balance(KEY_ID) == 100


def test_no_region_is_a_config_error(fake_aws, monkeypatch: pytest.MonkeyPatch) -> None:
    from r1nest.errors import ConfigError

    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    with pytest.raises(ConfigError, match="region"):
        DynamoStore("t")


# per-key limits and usage ---------------------------------------------------------------------

WINDOW = 1_699_999_980.0  # the rate-limit window holding T0

LIMITS_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from r1nest.errors import KeyLimitReached
    from r1nest.ledger import dynamodb
    from r1nest.ledger.dynamodb import DynamoStore

    table, endpoint, key_id, attempts, t0 = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    dynamodb.READ_TIMEOUT_S = float(sys.argv[6])
    limits = json.loads(sys.argv[7])

    async def main():
        store = DynamoStore(table, "us-east-1", endpoint_url=endpoint)
        print("ready", flush=True)
        sys.stdin.readline()

        async def reserve():
            try:
                return await store.reserve(key_id, 1, ttl_s=600, now=t0, **limits)
            except KeyLimitReached as exc:
                return exc.limit

        results = await asyncio.gather(*[reserve() for _ in range(attempts)])
        made = [r.reservation_id for r in results if not isinstance(r, str)]
        await store.close()
        print(json.dumps({"made": made, "refused": [r for r in results if isinstance(r, str)]}), flush=True)

    asyncio.run(main())
    """
)


def run_in_lockstep(argvs: list[list[str]], env: dict[str, str], steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Start one child per argv; at each step wait for every child to print `expected`, then send
    `reply` to all (so they act together); then the (stdout, stderr) of each, all exited 0."""
    children = [
        subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for argv in argvs
    ]
    try:
        for expected, reply in steps:
            for child in children:
                assert child.stdout.readline().strip() == expected, child.stderr.read()[-2000:]
            for child in children:
                child.stdin.write(reply + "\n")
                child.stdin.flush()
        outputs = [child.communicate(timeout=600) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for child, (_, err) in zip(children, outputs):
        assert child.returncode == 0, err[-2000:]
    return outputs


def race_two_processes(table: str, endpoint: str, attempts: int, limits: dict) -> list[dict]:
    argv = [sys.executable, "-c", LIMITS_CHILD, table, endpoint, KEY_ID, str(attempts), str(T0),
            str(MOTO_SERVER_READ_TIMEOUT_S), json.dumps(limits)]
    outputs = run_in_lockstep([argv, argv], {**os.environ, **FAKE_AWS_ENV}, [("ready", "go")])
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def key_item(table: str, endpoint: str) -> dict:
    return make_client(REGION, endpoint).get_item(
        TableName=table, Key={"pk": {"S": f"key#{KEY_ID}"}, "sk": {"S": "key"}}, ConsistentRead=True
    )["Item"]


@pytest.mark.parametrize("limits, allowed", [({"max_concurrency": 6}, 6), ({"rate_limit_rpm": 9}, 9)])
async def test_two_processes_share_one_key_limit(server_store, limits: dict, allowed: int) -> None:
    """Limits live in the table, so two gateways together get exactly the key's limit."""
    store, table, endpoint = server_store
    await store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="t", credits=1000, expires_at=None, now=T0)
    results = await asyncio.to_thread(race_two_processes, table, endpoint, 30, limits)
    made = [rid for r in results for rid in r["made"]]
    refused = [limit for r in results for limit in r["refused"]]
    assert len(made) == allowed and set(refused) == set(limits) and len(refused) == 60 - allowed
    item = key_item(table, endpoint)
    assert int(item["in_flight"]["N"]) == allowed and int(item["rpm_count"]["N"]) == allowed
    for reservation_id in made:
        await store.settle(reservation_id, 1, now=T0)
    assert int(key_item(table, endpoint)["in_flight"]["N"]) == 0
    assert await store.balance(KEY_ID) == 1000 - allowed


async def test_in_flight_comes_back_to_zero_after_every_kind_of_close(server_store) -> None:
    store, table, endpoint = server_store
    await store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="t", credits=100, expires_at=None, now=T0)
    settled, voided, swept = [await store.reserve(KEY_ID, 10, ttl_s=5, now=T0) for _ in range(3)]
    assert int(key_item(table, endpoint)["in_flight"]["N"]) == 3
    await store.settle(settled.reservation_id, 2, now=T0 + 1, usage=Usage(30, 10, 5))
    await store.void(voided.reservation_id, now=T0 + 1)
    assert await store.sweep_expired(now=T0 + 10) == 1
    item = key_item(table, endpoint)
    assert (int(item["in_flight"]["N"]), float(item["rpm_window"]["N"]), int(item["rpm_count"]["N"])) == (0, WINDOW, 3)
    posting = next(
        i for i in make_client(REGION, endpoint).scan(TableName=table)["Items"]
        if i.get("kind", {}).get("S") == "settle"
    )
    assert {name: posting[name]["N"] for name in ("credits_charged", "prompt_tokens", "cached_tokens", "completion_tokens")} == {
        "credits_charged": "2", "prompt_tokens": "30", "cached_tokens": "10", "completion_tokens": "5",
    }


async def test_a_window_opened_by_another_gateway_is_used_whatever_this_one_remembers(server_store) -> None:
    """Each process guesses the window form from the window it saw last; a guess made stale by
    another gateway is read back and retried, never counted wrong."""
    store, table, endpoint = server_store
    other = DynamoStore(table, REGION, endpoint_url=endpoint)
    try:
        await store.create_key(key_id=KEY_ID, key_hash="f" * 64, name="t", credits=100, expires_at=None, now=T0)
        await store.reserve(KEY_ID, 1, ttl_s=60, now=WINDOW + 1, rate_limit_rpm=3)  # remembers WINDOW
        await other.reserve(KEY_ID, 1, ttl_s=60, now=WINDOW + 61, rate_limit_rpm=3)  # opens the next
        await store.reserve(KEY_ID, 1, ttl_s=60, now=WINDOW + 62, rate_limit_rpm=3)  # guessed "new": retried
        assert int(key_item(table, endpoint)["rpm_count"]["N"]) == 2
        await other.reserve(KEY_ID, 1, ttl_s=60, now=WINDOW + 63, rate_limit_rpm=3)
        with pytest.raises(KeyLimitReached):
            await store.reserve(KEY_ID, 1, ttl_s=60, now=WINDOW + 64, rate_limit_rpm=3)
        # A gateway whose clock runs ahead opened a later window: this one counts in it too.
        await other.reserve(KEY_ID, 1, ttl_s=60, now=WINDOW + 181, rate_limit_rpm=2)
        await store.reserve(KEY_ID, 1, ttl_s=60, now=WINDOW + 170, rate_limit_rpm=2)
        with pytest.raises(KeyLimitReached) as caught:
            await store.reserve(KEY_ID, 1, ttl_s=60, now=WINDOW + 170, rate_limit_rpm=2)
        assert caught.value.retry_after_s == pytest.approx(70.0)
        item = key_item(table, endpoint)
        assert (float(item["rpm_window"]["N"]), int(item["rpm_count"]["N"])) == (WINDOW + 180, 2)
        assert await store.balance(KEY_ID) == 94
    finally:
        await other.close()


async def test_items_of_the_previous_release_work_with_limits_and_usage(server_store) -> None:
    """A key item without in_flight or window, a reservation that was never counted, a settle
    posting without credits_charged or tokens: what a table of the previous release holds."""
    store, table, endpoint = server_store
    client = make_client(REGION, endpoint)
    client.put_item(TableName=table, Item={
        "pk": {"S": f"key#{KEY_ID}"}, "sk": {"S": "key"}, "key_list": {"S": "key"}, "name": {"S": "old"},
        "key_hash": {"S": "f" * 64}, "created_at": {"N": str(T0)}, "revoked": {"BOOL": False},
        "balance": {"N": "910"},
    })
    client.put_item(TableName=table, Item={
        "pk": {"S": "res#" + "b" * 32}, "sk": {"S": "res"}, "key_id": {"S": KEY_ID}, "credits_reserved": {"N": "60"},
        "created_at": {"N": str(T0)}, "expires_at": {"N": str(T0 + 3600)}, "state": {"S": "pending"},
        "pending_shard": {"S": "0"},
    })
    for sk, kind, credits, note in (
        ("post#00001700000000000000#1#a", "grant", 1000, ""),
        ("post#00001700000000000000#2#b", "reserve", -100, ""),
        ("post#00001700000005000000#3#c", "settle", 70, "charged 30"),
        ("post#00001700000006000000#4#d", "reserve", -60, ""),
    ):
        client.put_item(TableName=table, Item={
            "pk": {"S": f"key#{KEY_ID}"}, "sk": {"S": sk}, "kind": {"S": kind}, "credits": {"N": str(credits)},
            "at": {"N": str(T0 + int(sk[5:25]) / 1e6 - T0)}, "note": {"S": note},
        })
    record = await store.get_key(KEY_ID)
    assert (record.max_concurrency, record.rate_limit_rpm, record.remaining_credits) == (None, None, 910)
    assert await store.usage(key_id=KEY_ID, since=T0, until=T0 + 60, bucket_s=60) == [
        UsageBucket(WINDOW, 1, 0, 0, 0, 30)
    ]
    reservation = await store.reserve(KEY_ID, 10, ttl_s=60, now=T0 + 10, max_concurrency=1, rate_limit_rpm=5)
    with pytest.raises(KeyLimitReached):
        await store.reserve(KEY_ID, 10, ttl_s=60, now=T0 + 10, max_concurrency=1)
    # The old reservation held no slot: closing it gives none back (and never goes below zero).
    assert await store.settle("b" * 32, 20, now=T0 + 11) == 940
    assert int(key_item(table, endpoint)["in_flight"]["N"]) == 1
    await store.void(reservation.reservation_id, now=T0 + 12)
    assert int(key_item(table, endpoint)["in_flight"]["N"]) == 0
    postings = await store.postings(KEY_ID)
    assert sum(p.credits for p in postings) == await store.balance(KEY_ID) == 950


async def test_usage_of_all_keys_reads_only_postings_of_the_range(server_store) -> None:
    """usage(key_id=None) queries each key's postings in the range: keys with nothing in it add
    one empty query each, and postings outside the range are not read."""
    store, table, endpoint = server_store
    for i in range(3):
        await store.create_key(key_id=f"{i:012x}", key_hash="f" * 64, name="", credits=100, expires_at=None, now=T0)
    for at in (T0 - 7200, T0, T0 + 7200):
        reservation = await store.reserve(f"{0:012x}", 10, ttl_s=60, now=at)
        await store.settle(reservation.reservation_id, 3, now=at, usage=Usage(1, 0, 1))
    calls, scanned = [], []
    events = store._client.meta.events
    events.register("provide-client-params.dynamodb.*", lambda params, **kw: calls.append(kw["event_name"]))
    events.register("after-call.dynamodb.Query", lambda parsed, **_: scanned.append(parsed["ScannedCount"]))
    buckets = await store.usage(key_id=None, since=T0 - 60, until=T0 + 60, bucket_s=3600)
    assert buckets == [UsageBucket(1_699_999_200.0, 1, 1, 0, 1, 3)]
    assert {name.rsplit(".", 1)[1] for name in calls} == {"Query"}  # no Scan
    assert len(calls) == 1 + 3  # the key index, then one query per key
    # Three index entries, then the postings at T0 (three grants, a reserve and a settle): the
    # four postings two hours away are not read.
    assert sum(scanned) == 3 + 5
