"""Credit ledger and key store: one interface (`base.Store`), one file per backend.

`open_store(settings)` picks the backend the settings name. Backends import their heavy
dependencies (boto3, asyncpg) only when chosen, so the gateway starts without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from r1nest.errors import ConfigError
from r1nest.ledger.base import KeyRecord, Posting, Reservation, Store, Usage, UsageBucket

if TYPE_CHECKING:
    from r1nest.settings import Settings

__all__ = ["KeyRecord", "Posting", "Reservation", "Store", "Usage", "UsageBucket", "open_store"]


def open_store(settings: Settings) -> Store:
    """The store the settings name: SQLite in `data_dir` (default), a DynamoDB table or a
    PostgreSQL database."""
    if settings.store == "sqlite":
        from r1nest.ledger.sqlite import SqliteStore

        return SqliteStore(settings.ledger_path)
    if settings.store == "dynamodb":
        if not settings.dynamodb_table:
            raise ConfigError("store = dynamodb needs dynamodb_table (R1NEST_DYNAMODB_TABLE)")
        from r1nest.ledger.dynamodb import DynamoStore

        return DynamoStore(
            settings.dynamodb_table, settings.aws_region, endpoint_url=settings.dynamodb_endpoint_url
        )
    if settings.store == "postgres":
        if settings.database_url is None:
            raise ConfigError("store = postgres needs database_url (R1NEST_DATABASE_URL)")
        from r1nest.ledger.postgres import PostgresStore

        return PostgresStore(settings.database_url.get_secret_value(), pool_size=settings.database_pool_size)
    raise ConfigError(f"unknown store {settings.store!r}")

