"""Settles the ledger could not take: retried until they commit, never left to become voids.

A delivered answer must be paid. When `settle` fails because the store is unavailable (SQLite
locked by another process past its busy timeout, DynamoDB unreachable or throttled), the charge
is retried for up to INLINE_RETRY_S with backoff while the request waits (a whole answer goes
out only after its settle commits or is recorded). If the store is still unavailable, the charge
is appended to a journal in the data dir (`pending_settles.jsonl`, fsynced: it survives a crash
of the gateway) and retried in the background every RETRY_INTERVAL_S until it commits. The
gateway replays the journal at startup and before every sweep of expired reservations, so the
sweeper cannot void a reservation whose answer was delivered while a settle for it is pending.

A reservation found closed on replay (settled by an earlier try whose answer was lost, or voided
by another gateway's sweeper) is dropped from the journal and logged; the ledger's exactly-once
rule makes a replay harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from r1nest.errors import InvalidLedgerArgument, ReservationClosed, StoreError, StoreUnavailable
from r1nest.ledger.base import Store, Usage

log = logging.getLogger("r1nest.gateway.settlements")

INLINE_RETRY_S = 15.0  # how long a request waits for its settle before it is journaled
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 2.0
RETRY_INTERVAL_S = 5.0  # background retries of journaled settles
JOURNAL_FILE = "pending_settles.jsonl"


@dataclass(frozen=True, slots=True)
class PendingSettle:
    reservation_id: str
    key_id: str
    credits: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.cached_tokens, self.completion_tokens)


class Settlements:
    """Settle with retries; journal what still fails; replay the journal."""

    def __init__(self, store: Store, journal_path: Path | None, *, clock: Callable[[], float]) -> None:
        self.store = store
        self.journal_path = journal_path  # None: memory only (a store that cannot outlive us)
        self.clock = clock
        self.pending: dict[str, PendingSettle] = {}
        self._lock = asyncio.Lock()
        if journal_path is not None:
            for entry in _read_journal(journal_path):
                self.pending[entry.reservation_id] = entry

    async def settle(self, reservation_id: str, key_id: str, credits: int, usage: Usage | None = None) -> int | None:
        """Settle now (retrying an unavailable store for INLINE_RETRY_S); the balance after, or
        None when the charge was journaled for later. ReservationClosed passes through."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INLINE_RETRY_S
        backoff = FIRST_BACKOFF_S
        usage = usage or Usage()
        while True:
            try:  # the caller shields
                return await self.store.settle(reservation_id, credits, now=self.clock(), usage=usage)
            except ReservationClosed:
                raise
            except StoreError as exc:
                if not isinstance(exc, StoreUnavailable) or loop.time() + backoff > deadline:
                    entry = PendingSettle(reservation_id, key_id, credits, usage.prompt_tokens,
                                          usage.cached_tokens, usage.completion_tokens)
                    await self._journal(entry, exc)
                    return None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _journal(self, entry: PendingSettle, exc: Exception) -> None:
        log.error("settlement deferred: the ledger did not take it (%s); it is journaled and retried "
                  "key_id=%s credits=%d", exc, entry.key_id, entry.credits)
        async with self._lock:
            self.pending[entry.reservation_id] = entry
            if self.journal_path is not None:
                await asyncio.to_thread(_append_journal, self.journal_path, entry)

    async def retry_pending(self) -> int:
        """Try every pending settle once; returns how many are still pending."""
        async with self._lock:
            if not self.pending:
                return 0
            for entry in list(self.pending.values()):
                try:
                    await self.store.settle(entry.reservation_id, entry.credits, now=self.clock(), usage=entry.usage)
                except ReservationClosed:
                    log.error("a journaled settlement found its reservation closed (settled before, "
                              "or voided) key_id=%s credits=%d", entry.key_id, entry.credits)
                except InvalidLedgerArgument as exc:
                    log.error("a journaled settlement was refused and dropped: %s key_id=%s credits=%d",
                              exc, entry.key_id, entry.credits)
                except StoreError as exc:
                    log.warning("journaled settlement still pending: %s key_id=%s", exc, entry.key_id)
                    continue
                else:
                    log.info("journaled settlement committed key_id=%s credits=%d", entry.key_id, entry.credits)
                del self.pending[entry.reservation_id]
            if self.journal_path is not None:
                await asyncio.to_thread(_rewrite_journal, self.journal_path, list(self.pending.values()))
            return len(self.pending)

    async def retry_forever(self) -> None:
        while True:
            await asyncio.sleep(RETRY_INTERVAL_S)
            if self.pending:
                await self.retry_pending()


def _read_journal(path: Path) -> list[PendingSettle]:
    entries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            data = json.loads(line)
            entries.append(PendingSettle(
                str(data["reservation_id"]), str(data["key_id"]), int(data["credits"]),
                # journals written before token counts were recorded have none
                int(data.get("prompt_tokens", 0)), int(data.get("cached_tokens", 0)),
                int(data.get("completion_tokens", 0)),
            ))
        except (ValueError, KeyError, TypeError):  # a torn last line from a crash mid-append
            log.error("skipping an unreadable line of %s", path)
    return entries


def _append_journal(path: Path, entry: PendingSettle) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (json.dumps(asdict(entry)) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _rewrite_journal(path: Path, entries: list[PendingSettle]) -> None:
    if not entries:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, "".join(json.dumps(asdict(e)) + "\n" for e in entries).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
