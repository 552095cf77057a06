#!/usr/bin/env python3
"""Ledger throughput: what one gateway worker's store does per request, as fast as it can.

    .venv/bin/python scripts/bench_ledger.py [--seconds 5] [--concurrency 64] [--store sqlite|memory]

Each simulated request does what the gateway does: get_key (authenticate), reserve, settle.
`--concurrency` requests are in flight at once on one asyncio loop. For SQLite the run is
repeated with group commit off (`max_batch=1`: one fsync per operation) to show what batching
buys. The ledger is a durable SQLite file (WAL; settle, top-up, key creation and revocation commit with synchronous=FULL, reserve and void with NORMAL: docs/ledger.md) in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path


async def run(store, seconds: float, concurrency: int) -> dict[str, float]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    args = parser.parse_args()
    results = {}
    if args.store == "memory":
        from r1nest.ledger.memory import MemoryStore

        results["memory"] = asyncio.run(run(MemoryStore(), args.seconds, args.concurrency))
    else:
        from r1nest.ledger.sqlite import SqliteStore

        with tempfile.TemporaryDirectory() as tmp:
            for label, max_batch in (("sqlite group commit", 256), ("sqlite one commit per op", 1)):
                path = Path(tmp) / f"{max_batch}.sqlite3"
                results[label] = asyncio.run(run(SqliteStore(path, max_batch=max_batch), args.seconds, args.concurrency))
    print(json.dumps({"concurrency": args.concurrency, "results": results}, indent=2))


if __name__ == "__main__":
    main()
