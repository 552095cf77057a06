"""Register an ApiKey generated outside the box (by Pulumi) with this deployment's ledger.

Run at boot on the head node, before the gateway starts; it also keeps the key in the data dir
(`api_key`, mode 0600, inside the service's own volume) so that the gateway's overview page, behind
the admin login, can show it:

    python -m r1nest.cloud.bootstrap --name default --credits 1000000 < /etc/r1nest/secrets/api_key

The key arrives on stdin (never argv, never the environment); only its SHA-256 is stored. Running
it again, or on several replicas sharing one DynamoDB ledger, changes nothing once the key exists:
the key's credits are granted exactly once.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from r1nest.errors import ConfigError, R1nestError, StoreError
from r1nest.files import API_KEY_FILE, write_key_file
from r1nest.keys import ADMIN_PREFIX, hash_key, parse_key_id
from r1nest.ledger.base import Store

MAX_KEY_CHARS = 256


def read_key(stream: TextIO) -> str:
    plaintext = stream.read(MAX_KEY_CHARS + 1).strip()
    if len(plaintext) > MAX_KEY_CHARS or parse_key_id(plaintext) is None or plaintext.startswith(ADMIN_PREFIX + "-"):
        raise ConfigError("stdin does not hold an r1nest API key (r1n-<12 hex>-<43 chars>)")
    return plaintext


async def register_key(store: Store, plaintext: str, *, name: str, credits: int, now: float) -> bool:
    """True when the key was created now, False when it was already there (same hash)."""
    key_id = parse_key_id(plaintext)
    if key_id is None:
        raise ConfigError("not an r1nest API key")
    digest = hash_key(plaintext)
    existing = await store.get_key(key_id)
    if existing is None:
        try:
            await store.create_key(key_id=key_id, key_hash=digest, name=name, credits=credits,
                                   expires_at=None, now=now)
            return True
        except StoreError:
            existing = await store.get_key(key_id)  # another replica won the race
            if existing is None:
                raise
    if existing.key_hash != digest:
        raise StoreError(f"key id {key_id} already exists in the ledger with another secret")
    return False


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m r1nest.cloud.bootstrap", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="default")
    parser.add_argument("--credits", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        if args.credits < 0:
            raise ConfigError("--credits must be >= 0")
        from r1nest.ledger import open_store
        from r1nest.settings import load_settings

        plaintext = read_key(sys.stdin)

        async def run() -> bool:
            store = open_store(load_settings())
            try:
                return await register_key(store, plaintext, name=args.name, credits=args.credits, now=time.time())
            finally:
                await store.close()

        created = asyncio.run(run())
        # The gateway's overview page (behind the admin login) shows the key from the data dir.
        write_key_file(load_settings().data_dir / API_KEY_FILE, plaintext)
    except R1nestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print("registered the deployment's API key" if created else "the deployment's API key is already registered")


if __name__ == "__main__":
    main()
