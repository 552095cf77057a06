"""A real SQLite outage on demand: another process holding the ledger's write lock.

    with locked_by_another_process(ledger_path):
        ...   # writes wait for the busy timeout, then raise StoreUnavailable; reads still work

The child runs `BEGIN EXCLUSIVE` and holds it until the block ends (it rolls back and exits when
its stdin closes). Tests shorten `r1nest.ledger.sqlite.BUSY_TIMEOUT_MS` to keep outages quick.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


@contextmanager
def locked_by_another_process(path: Path) -> Iterator[None]:
    """Another process holds `BEGIN EXCLUSIVE` on the SQLite file at `path` until the block ends."""
    child = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        line = child.stdout.readline().strip()
        if line != "locked":
            raise RuntimeError(f"the lock holder did not take the lock: {line!r} {child.stderr.read() if child.stderr else ''}")
        yield
    finally:
        child.stdin.close()  # it rolls back and exits
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
