"""Ledger fixtures: every backend behind one `store` fixture, AWS made local and fake, and a real
PostgreSQL server for the session (a fresh database per test)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from r1nest.ledger.base import Store
from r1nest.testing.dynamodb import (
    FAKE_AWS_ENV,
    REGION,
    moto_dynamodb_server,
    serialized_mock_aws,
)
from r1nest.testing.postgres import PostgresServer, PostgresUnavailable, server_bindir
from r1nest.testing.postgres import postgres_server as postgres_server_running

BACKENDS = ["memory", "sqlite", "dynamodb-moto", "dynamodb-server", "postgres"]


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """boto3 sees only fake credentials, never a developer's real profile."""
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(scope="module")
def moto_in_process() -> Iterator[None]:
    """moto in this process, for one test module (each test uses its own table)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in FAKE_AWS_ENV.items():
            patch.setenv(name, value)
        with serialized_mock_aws():
            yield


# moto's server answers one request at a time (r1nest.testing.dynamodb), so a client's request
# waits behind every other one in flight (two processes x 32 threads in the race test): on a
# loaded machine that queue outlasts the ledger's 10 s read timeout, botocore retries on top of
# the queue, and the run collapses into "Read timeout" or, for a retried PutItem that had gone
# through, "key id ... already exists". Real DynamoDB has no such queue; clients of the fake get
# a read timeout that only a hung server reaches.
MOTO_SERVER_READ_TIMEOUT_S = 300.0


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's DynamoDB server on loopback, shared by the session (each test uses its own table)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("r1nest.ledger.dynamodb.READ_TIMEOUT_S", MOTO_SERVER_READ_TIMEOUT_S)
        with moto_dynamodb_server() as endpoint:
            yield endpoint


def new_table_name() -> str:
    return f"r1nest-ledger-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster on loopback for the session (r1nest.testing.postgres)."""
    try:
        server_bindir()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    with postgres_server_running() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A new, empty database on the session's server; the store migrates it on first use."""
    return postgres_server.create_database(f"ledger_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[Store]:
    backend = request.param
    if backend == "memory":
        from r1nest.ledger.memory import MemoryStore

        memory = MemoryStore()
        yield memory
        await memory.close()
    elif backend == "sqlite":
        from r1nest.ledger.sqlite import SqliteStore

        sqlite = SqliteStore(tmp_path / "ledger.sqlite3")
        yield sqlite
        await sqlite.close()
    elif backend == "dynamodb-moto":
        request.getfixturevalue("fake_aws")
        request.getfixturevalue("moto_in_process")
        from r1nest.ledger.dynamodb import DynamoStore

        dynamo = DynamoStore(new_table_name(), REGION)
        dynamo.create_table()
        yield dynamo
        await dynamo.close()
    elif backend == "postgres":
        from r1nest.ledger.postgres import PostgresStore

        postgres = PostgresStore(request.getfixturevalue("postgres_url"))
        yield postgres
        await postgres.close()
    else:
        request.getfixturevalue("fake_aws")
        endpoint = request.getfixturevalue("moto_endpoint")
        from r1nest.ledger.dynamodb import DynamoStore

        dynamo = DynamoStore(new_table_name(), REGION, endpoint_url=endpoint)
        dynamo.create_table()
        yield dynamo
        await dynamo.close()
