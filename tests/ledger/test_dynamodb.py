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

    def race() -> list[tuple[str, str]]:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, table, endpoint, KEY_ID, "100", str(T0), str(MOTO_SERVER_READ_TIMEOUT_S)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            )
            for _ in range(2)
        ]
        try:
            for child in children:
                assert child.stdout.readline().strip() == "ready", child.stderr.read()[-2000:]
            for child in children:
                child.stdin.write("go\n")
                child.stdin.flush()
            outputs = [child.communicate(timeout=600) for child in children]
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
        for child, (_, err) in zip(children, outputs):
            assert child.returncode == 0, err[-2000:]
        return outputs

    outputs = await asyncio.to_thread(race)
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
