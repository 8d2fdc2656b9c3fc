"""The customers' contact history, as contact rules read it.

Either this server's memory (rebuilt from the decision log at start and after a change, as far
back as any placement's rules look), or, with ``shares_contacts``, the database every server
shares (``SharedContacts``), read inside the customer's lock at each Choose.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from nextbest.bandit.contact import ContactHistory, Impression
from nextbest.bandit.decision_log import Outcome
from nextbest.engine.learner import PlacementState
from nextbest.engine.shared_contacts import SharedContacts
from nextbest.storage.base import RecentImpression, Store

log = logging.getLogger(__name__)


class Contacts:
    """The contact history of one server: ``history`` in memory, ``shared`` when the servers share it."""

    def __init__(
        self,
        store: Store,
        reader_pool: ThreadPoolExecutor,
        states: dict[str, PlacementState],
        clock: Callable[[], float],
        shared: SharedContacts | None,
    ) -> None:
        self._store = store
        self._reader_pool = reader_pool
        self._states = states
        self._clock = clock
        self.shared = shared
        self.history = ContactHistory(0.0) if shared is None else _SharedResponses(shared)
        self._backfill: asyncio.Task[None] | None = None  # the last copy of older impressions (shared history)

    def impression(self, r: RecentImpression) -> Impression:
        """A stored impression as contact rules and history features read it. responded: None while
        its window is open without a reward; a first reward recorded on the open row already
        answers it (reward > 0), as this server's memory does at the Reward (windows.py), so
        that the two agree before the window closes."""
        ps = self._states.get(r.placement)
        campaign = ps.arm_campaigns.get(r.arm_id) if ps else None
        if r.outcome == Outcome.OPEN:
            responded = None if r.reward is None else r.reward > 0
        else:
            responded = r.outcome == Outcome.REWARD and (r.reward or 0) > 0
        return Impression(r.at, r.arm_id, campaign, r.placement, r.event_id, responded)

    async def rebuild(self) -> None:
        """As far back as any placement's rules look (after start or a change). Shared history
        is read per Choose, so only its horizon changes."""
        horizon = max((ps.record.spec.history_horizon for ps in self._states.values()), default=0.0)
        if self.shared is not None:
            if horizon > self.history.horizon:
                # Impressions are recorded only while some rule reads them: a longer horizon
                # (a history window added) copies the log's older ones first, in the background.
                self._backfill = asyncio.get_running_loop().create_task(self._backfill_shared(self._clock() - horizon))
            self.history.horizon = horizon
            return
        if horizon <= self.history.horizon:
            self.history.horizon = horizon
            return
        rows = await asyncio.get_running_loop().run_in_executor(self._reader_pool, self._store.recent_impressions, self._clock() - horizon)
        history = ContactHistory(horizon)
        for r in rows:
            history.record(r.customer_id, self.impression(r))
        self.history = history

    async def _backfill_shared(self, since: float) -> None:
        started = time.perf_counter()
        try:
            n = await asyncio.get_running_loop().run_in_executor(self._reader_pool, self._store.backfill_contacts, since)
        except Exception as e:  # rules read what was recorded; the next change or start tries again
            log.warning("copying older impressions into the shared contact history failed: %s", e)
            return
        if n:
            log.info("copied %d impressions from the log into the shared contact history in %.1f s", n, time.perf_counter() - started)

    def close(self) -> None:
        if self._backfill is not None:
            self._backfill.cancel()
        if self.shared is not None:
            self.shared.close()


class _SharedResponses(ContactHistory):
    """A shared history's in-memory part: holds nothing itself (its horizon says how far back
    the shared one is read), and passes each response this server hears (a Reward, a close) on
    to the impressions it recorded and has not committed yet, which only it knows of."""

    def __init__(self, shared: SharedContacts) -> None:
        super().__init__(0.0)
        self._shared = shared

    def respond(self, event_id: str, responded: bool) -> None:
        self._shared.respond(event_id, responded)
