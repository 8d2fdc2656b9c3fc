"""Group commit: decisions, activations, reward events and window closes are written in
batches, one transaction each.

Choose never waits for the database: its decision joins the next batch (written at least every
``flush_interval``). Reward waits for the batch holding its write, so an acknowledged reward is
durable; since a batch writes decisions first, a decision is durable no later than any reward
acknowledged for it. A crash loses at most the decisions of the last flush interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bandit.errors import Unavailable
from bandit.log import LoggedDecision
from server.storage.base import Activation, Close, RewardEvent, Store
from server.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class BatchWriter:
    """One background task owns all writes to the decision log, in order."""

    def __init__(self, store: Store, executor: ThreadPoolExecutor, flush_interval: float, max_batch: int = 5000) -> None:
        self._store = store
        self._executor = executor
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._decisions: list[LoggedDecision] = []
        self._closes: list[tuple[Close, asyncio.Future[bool]]] = []
        self._activations: list[tuple[Activation, asyncio.Future[bool]]] = []
        self._events: list[tuple[RewardEvent, asyncio.Future[None]]] = []
        self._barriers: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._retry_delay = 0.0
        # The learner's own closes get their learn positions in the commit that closes them
        # (one commit per reward instead of two); other servers' are claimed by the learner.
        self.assign_learn_positions: Callable[[], bool] = lambda: False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="nextbest-writer")

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

    def add_decision(self, decision: LoggedDecision) -> None:
        self._decisions.append(decision)
        if len(self._decisions) >= self._max_batch:
            self._wake.set()

    def _future(self) -> asyncio.Future[Any]:
        self._wake.set()
        return asyncio.get_running_loop().create_future()

    def close_window(self, close: Close) -> asyncio.Future[bool]:
        """Queue a close; the future tells, once durable, whether it closed an open window."""
        fut: asyncio.Future[bool] = self._future()
        self._closes.append((close, fut))
        return fut

    def activate(self, activation: Activation) -> asyncio.Future[bool]:
        """Queue an activation; the future tells, once durable, whether it activated a decision."""
        fut: asyncio.Future[bool] = self._future()
        self._activations.append((activation, fut))
        return fut

    def record(self, event: RewardEvent) -> asyncio.Future[None]:
        """Queue a reward event; the future resolves once it is durable."""
        fut: asyncio.Future[None] = self._future()
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
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._flush_interval)
            except TimeoutError:
                pass
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
                    b.set_result(None)
                continue
            try:
                result = await loop.run_in_executor(
                    self._executor,
                    self._store.write,
                    decisions,
                    [c for c, _ in closes],
                    [a for a, _ in acts],
                    [e for e, _ in events],
                    self.assign_learn_positions(),
                )
            except Exception as e:
                # Decisions are kept and retried; everything a caller waits for fails now, so
                # that its caller hears UNAVAILABLE and may retry.
                log.warning("write of %d decisions and %d other records failed: %s", len(decisions), len(closes) + len(acts) + len(events), e)
                self._decisions[:0] = decisions
                self._barriers[:0] = barriers
                err = e if isinstance(e, Unavailable) else Unavailable("cannot store now")
                waiting: list[asyncio.Future[Any]] = [f for _, f in closes] + [f for _, f in acts] + [f for _, f in events]
                for fut in waiting:
                    if not fut.done():
                        fut.set_exception(err)
                self._retry_delay = min(max(self._retry_delay * 2, 0.05), 2.0)
                self._wake.set()
                continue
            self._retry_delay = 0.0
            for (_, cf), ok in zip(closes, result.closed, strict=True):
                if not cf.done():
                    cf.set_result(ok)
            for (_, af), ok in zip(acts, result.activated, strict=True):
                if not af.done():
                    af.set_result(ok)
            for _, ef in events:
                if not ef.done():
                    ef.set_result(None)
            for b in barriers:
                if not b.done():
                    b.set_result(None)
