"""Group commit: decisions, activations, reward events and window closes are written in
batches, one transaction each.

A Choose with a server-made event id never waits for the database: its decision joins the
next batch (written at least every ``flush_interval``). One with a caller-chosen id waits for
its insert while the database answers, since only the store knows whether the id is new
(ALREADY_EXISTS otherwise); a decision the store does not take is undone, never logged.
Reward waits for the batch holding its write, so an acknowledged reward is durable; since a
batch writes decisions first, a decision is durable no later than any reward acknowledged for
it. A crash loses at most the decisions of the last flush interval.

A batch that fails because the database is away is kept and retried (its callers hear
UNAVAILABLE). A batch the database refuses (a row it will never take: a NUL byte in text on
PostgreSQL, a constraint, a trigger) is split in halves, each its own transaction, in order,
until the refused records are found: everything else is stored and acknowledged; a refused
decision is logged and dropped, a refused reward, close or activation fails its caller with
RecordRefused (server/storage/refusal.py). One refused record costs O(log n) transactions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeAlias

from nextbest.bandit.decision_log import LoggedDecision
from nextbest.bandit.errors import Unavailable
from nextbest.engine.tasks import cancel_and_wait, wait_event
from nextbest.storage.base import Activation, Close, Recorded, RewardEvent, Store, WriteResult
from nextbest.storage.refusal import RecordRefused, is_refusal, refusal_reason

log = logging.getLogger(__name__)

# Refused records found in one batch before the writer stops splitting it and keeps the rest
# for a retry (a database refusing everything would otherwise cost ~2 log n commits a record).
MAX_REFUSED = 64

# (kind, record, its caller's future): kind is decision|activation|reward|close, and a batch's
# items are in that order, the order Store.write writes them in.
_Item: TypeAlias = tuple[str, Any, "asyncio.Future[Any] | None"]


class BatchWriter:
    """One background task owns all writes to the decision log, in order."""

    def __init__(
        self,
        store: Store,
        executor: ThreadPoolExecutor,
        flush_interval: float,
        max_batch: int = 5000,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._on_refused = on_refused  # called with the kind of each record the database refused
        self._executor = executor
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        # Decisions, each with the future of a Choose that waits to hear it was inserted (a
        # caller-chosen event id: the store's uniqueness decides whether it is new), and what
        # undoes its window and reservations if it is never logged.
        self._decisions: list[tuple[LoggedDecision, asyncio.Future[bool] | None, Callable[[], None] | None]] = []
        self.healthy = True  # the last write reached the database (a Choose then waits for its insert)
        self._closes: list[tuple[Close, asyncio.Future[Close | None]]] = []
        self._activations: list[tuple[Activation, asyncio.Future[bool]]] = []
        self._events: list[tuple[RewardEvent, asyncio.Future[Recorded]]] = []
        self._barriers: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._retry_delay = 0.0
        self._writing = 0  # records in the batch being written
        # The learner's own closes get their learn positions in the commit that closes them
        # (one commit per reward instead of two); other servers' are claimed by the learner.
        self.assign_learn_positions: Callable[[], bool] = lambda: False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="nextbest-writer")

    @property
    def running(self) -> bool:
        return self._task is not None

    async def stop(self, timeout: float = 10.0) -> None:
        """Write everything pending (within timeout: the database may be away), then stop."""
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            log.error("stopping with %d unwritten decisions and rewards: the database did not answer", self.depth)
        await cancel_and_wait(self._task)

    @property
    def depth(self) -> int:
        return len(self._decisions) + len(self._closes) + len(self._activations) + len(self._events)

    @property
    def pending(self) -> int:
        """Records not yet durable: queued, or in the batch being written (``depth`` counts only
        the queued ones: a reader that found nothing while a batch is in flight must flush too)."""
        return self.depth + self._writing

    def add_decision(
        self, decision: LoggedDecision, *, on_dropped: Callable[[], None] | None = None, wait: bool = False
    ) -> asyncio.Future[bool] | None:
        """Queue a decision. ``on_dropped`` is called if it is never logged: the store did not
        take it (its (event_id, slot) is another decision's) or refused it. ``wait``: returns a
        future that tells, once its first write is done, whether it was inserted (a Choose with a
        caller-chosen event id waits for it); if that write fails the decision is kept and
        retried like any other, and the future fails."""
        fut: asyncio.Future[bool] | None = None
        if wait:
            fut = self._future()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # a caller may stop waiting
        self._decisions.append((decision, fut, on_dropped))
        if len(self._decisions) >= self._max_batch:
            self._wake.set()
        return fut

    def withdraw(self, decision: LoggedDecision) -> bool:
        """Take a decision out of the queue if it is not being written yet (its Choose gave up);
        whether it was. Its waiter hears nothing more; its undo is the caller's."""
        for i, (d, fut, _) in enumerate(self._decisions):
            if d is decision:
                del self._decisions[i]
                if fut is not None and not fut.done():
                    fut.cancel()
                return True
        return False

    def _future(self) -> asyncio.Future[Any]:
        self._wake.set()
        return asyncio.get_running_loop().create_future()

    def close_window(self, close: Close) -> asyncio.Future[Close | None]:
        """Queue a close; the future gives, once durable, the close as stored (a DEFAULT one of a
        window holding a first reward is that REWARD), or None if it closed no open window."""
        fut: asyncio.Future[Close | None] = self._future()
        self._closes.append((close, fut))
        return fut

    def activate(self, activation: Activation) -> asyncio.Future[bool]:
        """Queue an activation; the future tells, once durable, whether it activated a decision."""
        fut: asyncio.Future[bool] = self._future()
        self._activations.append((activation, fut))
        return fut

    def record(self, event: RewardEvent) -> asyncio.Future[Recorded]:
        """Queue a reward event; the future tells, once durable, what became of it (a FIRST
        one is STORED if it became the window's first reward)."""
        fut: asyncio.Future[Recorded] = self._future()
        self._events.append((event, fut))
        return fut

    async def flush(self) -> None:
        """Return once everything queued before the call is durable, a batch in flight included."""
        barrier: asyncio.Future[None] = self._future()
        self._barriers.append(barrier)
        await barrier

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await wait_event(self._wake, self._flush_interval)
            self._wake.clear()
            if self._retry_delay:
                await asyncio.sleep(self._retry_delay)
            decisions, self._decisions = self._decisions, []
            closes, self._closes = self._closes, []
            acts, self._activations = self._activations, []
            events, self._events = self._events, []
            barriers, self._barriers = self._barriers, []
            if not (decisions or closes or acts or events):
                for b in barriers:
                    if not b.done():  # a caller that gave up (deadline, cancel) cancelled its barrier
                        b.set_result(None)
                continue
            assign = self.assign_learn_positions()
            self._writing = len(decisions) + len(closes) + len(acts) + len(events)
            try:
                result = await loop.run_in_executor(
                    self._executor,
                    self._store.write,
                    [d for d, _, _ in decisions],
                    [c for c, _ in closes],
                    [a for a, _ in acts],
                    [e for e, _ in events],
                    assign,
                )
            except Exception as e:
                items: list[_Item] = [("decision", (d, u), f) for d, f, u in decisions]
                items += [("activation", a, f) for a, f in acts]
                items += [("reward", ev, f) for ev, f in events]
                items += [("close", c, f) for c, f in closes]
                if is_refusal(e):
                    log.warning("the database refused a batch of %d records (%s): splitting it", len(items), refusal_reason(e))
                    rest, away = await self._bisect(items, e, assign)  # still counted as being written
                    if away is None:
                        self._writing = 0
                        self._retry_delay = 0.0
                        for b in barriers:
                            if not b.done():
                                b.set_result(None)
                        continue
                    items, e = rest, away
                self._writing = 0
                self._keep(items, barriers, e)
                continue
            self._writing = 0
            self._retry_delay = 0.0
            self.healthy = True
            for (_, df, undo), ok in zip(decisions, result.inserted, strict=True):
                if not ok and undo is not None:
                    undo()
                if df is not None and not df.done():
                    df.set_result(ok)
            for (_, cf), as_stored in zip(closes, result.stored, strict=True):
                if not cf.done():
                    cf.set_result(as_stored)
            for (_, af), ok in zip(acts, result.activated, strict=True):
                if not af.done():
                    af.set_result(ok)
            for (_, ef), what in zip(events, result.recorded, strict=True):
                if not ef.done():
                    ef.set_result(what)
            for b in barriers:
                if not b.done():
                    b.set_result(None)

    def _keep(self, items: list[_Item], barriers: list[asyncio.Future[None]], e: Exception) -> None:
        """The database is away: decisions are kept and retried; everything a caller waits for
        fails now, so that its caller hears UNAVAILABLE and may retry."""
        kept = [(r[0], None, r[1]) for kind, r, _ in items if kind == "decision"]
        self.healthy = False
        log.warning("write of %d decisions and %d other records failed: %s", len(kept), len(items) - len(kept), e)
        self._decisions[:0] = kept
        self._barriers[:0] = barriers
        err = e if isinstance(e, Unavailable) else Unavailable("cannot store now")
        for _, _, fut in items:
            if fut is not None and not fut.done():
                fut.set_exception(err)
        self._retry_delay = min(max(self._retry_delay * 2, 0.05), 2.0)
        self._wake.set()

    async def _bisect(self, items: list[_Item], error: Exception, assign: bool) -> tuple[list[_Item], Exception | None]:
        """Write a refused batch in halves, in order, each half its own transaction, until the
        refused records are found; store and settle everything else. Returns the items left
        unwritten and why (the database went away, or refused too many) or ([], None)."""
        refused = 0
        todo: list[list[_Item]] = []  # chunks to write, the next on top
        bad: tuple[list[_Item], Exception] | None = (items, error)
        while True:
            if bad is not None:
                chunk, e = bad
                bad = None
                if len(chunk) > 1:
                    mid = len(chunk) // 2
                    todo += [chunk[mid:], chunk[:mid]]
                elif refused < MAX_REFUSED:
                    refused += 1
                    self._refuse(chunk[0], e)
                else:
                    log.error("the database refused more than %d records of one batch: keeping the rest for a retry", MAX_REFUSED)
                    return chunk + [x for c in reversed(todo) for x in c], e
            if not todo:
                return [], None
            chunk = todo.pop()
            try:
                result = await self._write(chunk, assign)
            except Exception as e:
                if not is_refusal(e):
                    return chunk + [x for c in reversed(todo) for x in c], e
                bad = (chunk, e)
                continue
            self._settle(chunk, result)

    async def _write(self, chunk: list[_Item], assign: bool) -> WriteResult:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor,
            self._store.write,
            [r[0] for kind, r, _ in chunk if kind == "decision"],
            [r for kind, r, _ in chunk if kind == "close"],
            [r for kind, r, _ in chunk if kind == "activation"],
            [r for kind, r, _ in chunk if kind == "reward"],
            assign,
        )

    @staticmethod
    def _settle(chunk: list[_Item], result: WriteResult) -> None:
        """A chunk is durable: its closes and activations hear what they did, in order."""
        decisions = [(r[1], f) for kind, r, f in chunk if kind == "decision"]
        closes = [f for kind, _, f in chunk if kind == "close"]
        acts = [f for kind, _, f in chunk if kind == "activation"]
        events = [f for kind, _, f in chunk if kind == "reward"]
        for (undo, df), inserted in zip(decisions, result.inserted, strict=True):
            if not inserted and undo is not None:
                undo()
            if df is not None and not df.done():
                df.set_result(inserted)
        for cf, as_stored in zip(closes, result.stored, strict=True):
            if cf is not None and not cf.done():
                cf.set_result(as_stored)
        for af, ok in zip(acts, result.activated, strict=True):
            if af is not None and not af.done():
                af.set_result(ok)
        for ef, recorded in zip(events, result.recorded, strict=True):
            if ef is not None and not ef.done():
                ef.set_result(recorded)

    def _refuse(self, item: _Item, e: Exception) -> None:
        kind, rec, fut = item
        reason = refusal_reason(e)
        if kind == "decision":
            rec, undo = rec
            if undo is not None:
                undo()
            log.error(
                "the database refused decision %r of placement %r; it is dropped: %s",
                rec.event_id[:100],
                rec.placement[:100],
                reason,
            )
        else:
            log.error("the database refused a %s of event %r slot %d: %s", kind, rec.event_id[:100], rec.slot, reason)
        if self._on_refused is not None:
            self._on_refused(kind)
        if fut is not None and not fut.done():
            fut.set_exception(RecordRefused(reason))
