"""Contact history shared by every server on one database (contact_store "database").

Each Choose for a tracked customer runs inside that customer's lock: read their impressions,
decide, record the new ones, commit. In one process, a customer's Chooses queue on an asyncio
lock first, so that at most one thread per customer waits on the database's lock, and the
number of open transactions is bounded (each holds a pooled connection until it commits).
Taking a lock (which may wait) and releasing one (commit, abort: never waits on a lock) run on
separate threads, so releases always make progress and a waiting taker is always let in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nextbest.bandit.errors import Unavailable
from nextbest.storage.base import ContactRow, RecentImpression, Store

log = logging.getLogger(__name__)


@dataclass
class ContactTx:
    """What a Choose sees and adds inside the customer's lock."""

    history: list[RecentImpression]
    new: list[ContactRow] = field(default_factory=list)


class SharedContacts:
    def __init__(self, store: Store, concurrency: int) -> None:
        self._store = store
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="nextbest-contacts")  # takes locks
        self._release = ThreadPoolExecutor(2, thread_name_prefix="nextbest-contacts-release")  # never waits on one
        self._open = asyncio.Semaphore(concurrency)  # transactions (connections) open at once
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # customer -> (lock, users)

    @contextlib.asynccontextmanager
    async def _held(self, customer_id: str) -> AsyncIterator[None]:
        """This process's hold on a customer (and on one of the transactions it may open)."""
        lock, users = self._locks.get(customer_id) or (asyncio.Lock(), 0)
        self._locks[customer_id] = (lock, users + 1)
        try:
            async with lock, self._open:
                yield
        finally:
            lock, users = self._locks[customer_id]
            if users <= 1:
                del self._locks[customer_id]
            else:
                self._locks[customer_id] = (lock, users - 1)

    @contextlib.asynccontextmanager
    async def customer(self, customer_id: str, since: float) -> AsyncIterator[ContactTx]:
        """Hold the customer across all servers; commit what was added on a clean exit."""
        async with self._held(customer_id):
            handle, history = await self._run_abortable(customer_id, since)
            tx = ContactTx(history)
            try:
                yield tx
            except BaseException:
                self._release.submit(self._store.contacts_abort, handle)
                raise
            # Shielded: a caller that gives up now must not leave the lock held; the
            # commit finishes (or fails, releasing the lock) in its thread either way.
            try:
                await asyncio.shield(asyncio.get_running_loop().run_in_executor(self._release, self._store.contacts_commit, handle, tx.new))
            except Unavailable as e:
                # What was decided inside the lock is made and logged by now: failing the
                # call would leave an offer logged that the customer never sees (and learned
                # as ignored). Answer it, recording its impressions once more under a fresh
                # database lock while this process still holds the customer.
                log.warning("recording the impressions of customer %s failed (%s): retrying", customer_id, e)
                await asyncio.shield(self._insert_locked(customer_id, tx.new))  # done even if the caller goes

    async def _run_abortable(self, customer_id: str, since: float) -> tuple[Any, list[RecentImpression]]:
        """Open the locked transaction; if the caller is cancelled meanwhile, release it once open."""
        fut = asyncio.get_running_loop().run_in_executor(self._pool, self._store.contacts_open, customer_id, since)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:

            def release(f: asyncio.Future[tuple[Any, list[RecentImpression]]]) -> None:
                if not f.cancelled() and f.exception() is None:
                    self._release.submit(self._store.contacts_abort, f.result()[0])

            fut.add_done_callback(release)
            raise

    async def record_now(self, customer_id: str, rows: list[ContactRow]) -> None:
        """Record impressions under the customer's lock, so that a Choose anywhere that starts
        after this returns sees them."""
        if rows:
            async with self._held(customer_id):
                await self._insert_locked(customer_id, rows)

    async def _insert_locked(self, customer_id: str, rows: list[ContactRow]) -> None:
        """Insert under the customer's database lock (the caller holds its asyncio lock); if the
        database cannot take it now, insert later without it, and say so: the customer's caps
        may then miss these impressions for a moment, or for good if that write fails too."""
        if not rows:
            return
        loop = asyncio.get_running_loop()
        try:
            handle, _ = await self._run_abortable(customer_id, rows[0].at)
            await asyncio.shield(loop.run_in_executor(self._release, self._store.contacts_commit, handle, rows))
        except Unavailable as e:
            log.warning("locking customer %s failed (%s): recording %d impressions later", customer_id, e, len(rows))
            self.record_later(rows)

    def record_later(self, rows: list[ContactRow]) -> None:
        """Record impressions without the customer's lock and without waiting (placements with
        no rule of their own, or when the lock cannot be had)."""
        if rows:
            self._release.submit(self._record, rows)

    def _record(self, rows: list[ContactRow]) -> None:
        try:
            self._store.contacts_insert(rows)  # no lock: no decision here waits on it
        except Exception as e:  # the policies of other placements miss one impression
            log.warning("recording %d impressions of customer %s failed: %s", len(rows), rows[0].customer_id, e)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._release.shutdown(wait=True)
