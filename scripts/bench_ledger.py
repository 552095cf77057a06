#!/usr/bin/env python3
"""Ledger throughput: what one gateway worker's store does per request, as fast as it can.

    .venv/bin/python scripts/bench_ledger.py [--seconds 5] [--concurrency 1,64] [--runs 3]
        [--store sqlite|memory|postgres|all] [--pool-size 10]

Each simulated request does what the gateway does: get_key (authenticate), reserve, settle.
`--concurrency` requests are in flight at once on one asyncio loop (a comma-separated list runs
each). For SQLite the run is repeated with group commit off (`max_batch=1`: one fsync per
operation) to show what batching buys. The SQLite ledger is a durable file (WAL; settle, top-up,
key creation and revocation commit with synchronous=FULL, reserve and void with NORMAL:
docs/ledger.md) in a temporary directory. PostgreSQL is a throwaway local server started for the
run (`r1nest.testing.postgres`, durable: fsync and synchronous_commit on, PostgreSQL's defaults)
reached over TCP on loopback through the store's pool (`--pool-size`, the gateway's default 10);
each run gets a fresh database. With `--runs N` each figure is the median of N runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any


async def run(store: Any, seconds: float, concurrency: int) -> dict[str, float]:
    key_id = "0123456789ab"
    await store.create_key(key_id=key_id, key_hash="f" * 64, name="bench", credits=10**15, expires_at=None, now=time.time())
    done = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            now = time.time()
            await store.get_key(key_id)
            reservation = await store.reserve(key_id, 1000, ttl_s=3600, now=now)
            await store.settle(reservation.reservation_id, 250, now=now)
            latencies.append(time.perf_counter() - started)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    postings = await store.postings(key_id)
    assert sum(p.credits for p in postings) == await store.balance(key_id)
    await store.close()
    latencies.sort()
    return {
        "requests_per_s": round(done / elapsed, 1),
        "ops_per_s": round(3 * done / elapsed, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2),
    }


def stores(which: str, stack: ExitStack, pool_size: int) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(label, a factory of a fresh store) for each store to measure."""
    if which in ("memory", "all"):
        from r1nest.ledger.memory import MemoryStore

        yield "memory", MemoryStore
    if which in ("sqlite", "all"):
        from r1nest.ledger.sqlite import SqliteStore

        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for label, max_batch in (("sqlite group commit", 256), ("sqlite one commit per op", 1)):
            yield label, lambda max_batch=max_batch: SqliteStore(tmp / f"{uuid.uuid4().hex}.sqlite3", max_batch=max_batch)
    if which in ("postgres", "all"):
        from r1nest.ledger.postgres import PostgresStore
        from r1nest.testing.postgres import postgres_server

        server = stack.enter_context(postgres_server(durable=True))
        yield (
            f"postgres (pool {pool_size})",
            lambda: PostgresStore(server.create_database(f"bench_{uuid.uuid4().hex[:12]}"), pool_size=pool_size),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="64", help="requests in flight; a comma-separated list runs each")
    parser.add_argument("--runs", type=int, default=1, help="repeat each measurement; figures are medians")
    parser.add_argument("--store", choices=["sqlite", "memory", "postgres", "all"], default="sqlite")
    parser.add_argument("--pool-size", type=int, default=10, help="PostgreSQL connections (the gateway's default)")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {}
    with ExitStack() as stack:
        for label, make in stores(args.store, stack, args.pool_size):
            for level in levels:
                runs = [asyncio.run(run(make(), args.seconds, level)) for _ in range(args.runs)]
                results.setdefault(label, {})[level] = {
                    field: round(statistics.median(r[field] for r in runs), 2) for field in runs[0]
                }
    print(json.dumps({"seconds": args.seconds, "runs": args.runs, "results": results}, indent=2))


if __name__ == "__main__":
    main()
