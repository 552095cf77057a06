"""`r1nest ledger`: operate on the ledger the settings name.

`r1nest ledger migrate` brings a PostgreSQL ledger's schema to this release's version. Gateways
do the same on first use, so running it is optional; it is for deployments that migrate before
rolling out, or that give gateways a database user without CREATE rights. SQLite migrates its
file when opened, and DynamoDB's table layout comes from `table_spec()`: for them there is
nothing to run.
"""

from __future__ import annotations

import asyncio

import click

from r1nest.errors import StoreUnavailable
from r1nest.settings import load_settings


@click.group()
def ledger() -> None:
    """The credit ledger: schema migrations."""


@ledger.command()
def migrate() -> None:
    """Apply the PostgreSQL ledger's schema migrations (R1NEST_STORE=postgres, R1NEST_DATABASE_URL).

    Safe to run while gateways are running and from several places at once: each migration is
    applied once, under a lock, in one transaction.
    """
    settings = load_settings()
    if settings.store != "postgres":
        why = {"sqlite": "it migrates its file when opened", "dynamodb": "its table's layout is table_spec()"}
        click.echo(f"nothing to run for the {settings.store} ledger: {why.get(settings.store, 'no migrations')}")
        return
    from r1nest.ledger import open_store
    from r1nest.ledger.postgres import LATEST_VERSION, PostgresStore

    store = open_store(settings)
    assert isinstance(store, PostgresStore)

    async def run() -> tuple[list[int], int]:
        try:
            applied = await store.migrate()
            return applied, await store.schema_version()
        finally:
            await store.close()

    try:
        applied, version = asyncio.run(run())
    except StoreUnavailable as exc:
        raise StoreUnavailable(f"cannot migrate the ledger now ({exc}); retry shortly") from None
    done = f"applied {', '.join(map(str, applied))}" if applied else "nothing to apply"
    click.echo(f"{store.description}: schema at version {version} of {LATEST_VERSION} ({done})")
