"""Contact history shared by every server on one database (contact_store "database").

A Choose on a placement with contact policies, a cool-down or fatigue runs inside the
customer's lock: read their impressions, decide, record the new ones, commit, so that a cap
holds exactly across servers. A placement whose only use of the history is its features (issue
#30) takes no lock and waits for no transaction of its own: its read joins every other read of
the same moment (one query, ``read``), and its impressions join a group commit (``record``)
that this server's own reads see at once, before it commits.

In the lock, In one process, a customer's Chooses queue on an asyncio
lock first, so that at most one thread per customer waits on the database's lock, and the
number of open transactions is bounded (each holds a pooled connection until it commits).
Taking a lock (which may wait) and releasing one (commit, abort: never waits on a lock) run on
separate threads, so releases always make progress and a waiting taker is always let in.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nextbest.bandit.decision_log import Outcome
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
        self._reads = ThreadPoolExecutor(2, thread_name_prefix="nextbest-contacts-read")  # never waits on a lock
        self._waiting: dict[str, list[asyncio.Future[list[RecentImpression]]]] = {}  # (customer, since) asked
        self._since: dict[str, float] = {}  # the earliest since asked of each waiting customer
        self._read_scheduled = False
        self._reads_in_flight = 0  # while one is out, reads asked meanwhile wait for the next, together
        self._queued: list[ContactRow] = []  # recorded, not yet in a commit
        self._committing = False
        self._idle: asyncio.Future[None] | None = None  # done when the group commits catch up (flush)
        # This server's impressions that a read may not see yet: customer -> [(row, epoch)], the
        # epoch of its commit (None while not committed). Dropped once every read in flight began
        # after their commit.
        self._local: dict[str, dict[ContactRow, int | None]] = {}
        self._committed: collections.deque[tuple[int, list[ContactRow]]] = collections.deque()  # (epoch, rows), oldest first
        self._unanswered: dict[str, ContactRow] = {}  # own impressions held in _local, by event key
        self._responses: dict[str, bool] = {}  # event key -> responded, of those heard here
        self._epoch = 0  # commits done
        self._reading: dict[int, int] = {}  # read id -> epoch at its start
        self._read_ids = itertools.count()
        self.reads = 0  # queries made by read() (tests)
        self.commits = 0  # group commits made by record() (tests)

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

    # -- without a lock: history features ---------------------------------------------------------

    def read(self, customer_id: str, since: float) -> asyncio.Future[list[RecentImpression]]:
        """The customer's impressions since ``since``, oldest first: the database's (read with
        every other read asked before the loop's next turn, in one query) and this server's own
        not committed yet. Raises Unavailable when the database cannot be read."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[RecentImpression]] = loop.create_future()
        self._waiting.setdefault(customer_id, []).append(fut)
        self._since[customer_id] = min(since, self._since.get(customer_id, since))
        if not self._read_scheduled and not self._reads_in_flight:
            self._read_scheduled = True
            loop.call_soon(self._read_waiting)
        return fut

    def _read_waiting(self) -> None:
        self._read_scheduled = False
        waiting, self._waiting = self._waiting, {}
        since, self._since = self._since, {}
        ids = list(waiting)
        for i in range(0, len(ids), _MAX_READ):
            part = ids[i : i + _MAX_READ]
            self._reads_in_flight += 1
            asyncio.get_running_loop().create_task(self._read_then_next({c: waiting[c] for c in part}, min(since[c] for c in part)))

    async def _read_then_next(self, waiting: dict[str, list[asyncio.Future[list[RecentImpression]]]], since: float) -> None:
        try:
            await self._read(waiting, since)
        finally:
            self._reads_in_flight -= 1
            if not self._reads_in_flight and self._waiting and not self._read_scheduled:
                self._read_scheduled = True
                asyncio.get_running_loop().call_soon(self._read_waiting)

    async def _read(self, waiting: dict[str, list[asyncio.Future[list[RecentImpression]]]], since: float) -> None:
        rid = next(self._read_ids)
        self._reading[rid] = self._epoch  # commits done before it starts are in what it reads
        self.reads += 1
        try:
            found = await asyncio.get_running_loop().run_in_executor(self._reads, self._store.contacts_read, list(waiting), since)
        except Exception as e:  # their Chooses fail UNAVAILABLE, as a locked read's did
            del self._reading[rid]
            err = e if isinstance(e, Unavailable) else Unavailable(f"contact history: {e.__class__.__name__}")
            for fut in (f for futs in waiting.values() for f in futs):
                if not fut.done():
                    fut.set_exception(err)
            return
        except BaseException:
            del self._reading[rid]
            for fut in (f for futs in waiting.values() for f in futs):
                fut.cancel()
            raise
        del self._reading[rid]
        for c, futs in waiting.items():
            rows = found.get(c, [])
            mine = self._local.get(c)
            if mine:
                seen = {r.event_id for r in rows}
                rows = rows + [_recent(r, self._responses.get(_event(r))) for r in mine if _event(r) not in seen and r.at >= since]
                rows.sort(key=_at)
            for fut in futs:
                if not fut.done():
                    fut.set_result(list(rows))
        self._prune()

    def record(self, rows: list[ContactRow]) -> None:
        """Record impressions in the next group commit (one transaction for every impression
        recorded meanwhile), without a lock and without waiting: this server's reads see them at
        once, other servers' once committed (a few ms)."""
        if not rows:
            return
        for r in rows:
            self._local.setdefault(r.customer_id, {})[r] = None
            self._unanswered[_event(r)] = r
        self._queued.extend(rows)
        if not self._committing:
            self._committing = True
            asyncio.get_running_loop().call_soon(self._commit_queued)

    def _commit_queued(self) -> None:
        asyncio.get_running_loop().create_task(self._commit_loop())

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queued:
                rows, self._queued = self._queued, []
                try:
                    await loop.run_in_executor(self._release, self._store.contacts_insert, rows)
                except Exception as err:  # other servers' history misses them; this one's for a while
                    log.warning("recording %d impressions failed: %s", len(rows), err)
                self.commits += 1
                self._epoch += 1
                for r in rows:
                    mine = self._local.get(r.customer_id)
                    if mine is not None:
                        mine[r] = self._epoch
                self._committed.append((self._epoch, rows))
                self._prune()
        finally:
            self._committing = False
            if self._idle is not None and not self._idle.done():
                self._idle.set_result(None)
            self._idle = None

    async def flush(self) -> None:
        """Return once every impression recorded before the call is committed (or failed)."""
        if self._committing:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._idle)

    def _prune(self) -> None:
        """Forget own impressions that every read in flight, and every later one, finds in the database."""
        floor = min(self._reading.values(), default=self._epoch)
        while self._committed and self._committed[0][0] <= floor:
            for r in self._committed.popleft()[1]:
                mine = self._local.get(r.customer_id)
                if mine is not None:
                    mine.pop(r, None)
                    if not mine:
                        del self._local[r.customer_id]
                key = _event(r)
                self._unanswered.pop(key, None)
                self._responses.pop(key, None)

    def respond(self, event_key: str, responded: bool) -> None:
        """This server heard the response to one of its impressions (a first reward, a close):
        while that impression is only in this server's memory, its reads say so, as the
        database's join with the decision's row will once it is committed."""
        if event_key in self._unanswered:
            self._responses[event_key] = responded

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._release.shutdown(wait=True)
        self._reads.shutdown(wait=True)
        rows, self._queued = self._queued, []
        if rows:  # recorded since the last group commit began: written now, at the stop
            try:
                self._store.contacts_insert(rows)
            except Exception as e:
                log.warning("recording %d impressions at the stop failed: %s", len(rows), e)


_MAX_READ = 500  # customers in one read


def _at(r: RecentImpression) -> float:
    return r.at


def _event(r: ContactRow) -> str:
    return r.event_id if not r.slot else f"{r.event_id}#{r.slot}"


def _recent(r: ContactRow, responded: bool | None) -> RecentImpression:
    """An impression of this server not committed yet, as the database would give it: open, with
    a reward of 1 or 0 when this server heard it was responded to or not."""
    reward = None if responded is None else float(responded)
    return RecentImpression(r.customer_id, r.arm_id, r.placement, _event(r), r.at, Outcome.OPEN, reward)
