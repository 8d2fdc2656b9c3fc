"""Taking over the open windows of servers that stopped (and, at start, this server's own from
before a restart), so that every decision's window closes and is learned once.

The rewards those windows gathered stay on their rows (a first reward, "agg" reward events) and
are folded in by the close (storage: Store.write); what is read here only fills the memory
cache that answers retries (DUPLICATE) without a database read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from nextbest.engine.learner import PlacementState
from nextbest.engine.open_windows import OpenDecision
from nextbest.engine.windows import RewardWindows
from nextbest.settings import Settings
from nextbest.storage.base import Store


class Takeover:
    """Adopts windows no live server holds; a part of the Engine, on its event loop."""

    def __init__(
        self,
        *,
        windows: RewardWindows,
        states: dict[str, PlacementState],
        store: Store,
        reader_pool: ThreadPoolExecutor,
        settings: Settings,
        clock: Callable[[], float],
    ) -> None:
        self._windows = windows
        self._states = states
        self._store = store
        self._reader_pool = reader_pool
        self._settings = settings
        self._clock = clock

    async def adopt(self, starting: bool = False, alone: bool = False) -> int:
        """Take over the open windows of servers that stopped (at start: also this server's own
        before a restart), with the rewards they had gathered; a live server's stay with it.
        ``alone``: no other server can be running on the database (this one holds the lock file
        beside its SQLite file): every other server's windows. Returns how many were taken."""
        loop = asyncio.get_running_loop()
        # Servers sharing the database (PostgreSQL, --workers, or two servers on one SQLite
        # file) are live while they beat: a server never takes a live one's windows.
        live_since = None if alone else self._clock() - self._settings.live_for
        taken = sorted(  # opened in decision order, so that they close (and are learned) in it
            (
                d
                for d in await loop.run_in_executor(self._reader_pool, self._store.adopt_open, live_since, starting)
                if (d.event_id, d.slot) not in self._windows.open
            ),
            key=lambda d: (d.timestamp, d.slot),
        )
        if not taken:
            return 0
        # Their gathered rewards are read before any of them opens here, so that from the moment
        # a window is open on this server (no await in between) it holds them: a Reward or a
        # sweep never sees it half taken over.
        keys = {(d.event_id, d.slot) for d in taken}
        events = await loop.run_in_executor(self._reader_pool, self._store.open_reward_events)
        for d in taken:
            if (d.event_id, d.slot) in self._windows.open:  # decided here meanwhile: keep ours
                keys.discard((d.event_id, d.slot))
                continue
            ps = self._states.get(d.placement)
            campaign = ps.arm_campaigns.get(d.arm_id or "") if ps else None
            entry = OpenDecision(
                d.placement, d.deadline, d.arm_id or "", d.customer_id, campaign, d.cost, d.reward_cost, d.budgets, d.activated
            )
            if d.reward is not None:  # a first reward on the row (learn_at: window_close)
                entry.add_reward(d.reward)
            self._windows.add(d.event_id, d.slot, entry)
        for ev in events:
            held = self._windows.open.get((ev.event_id, ev.slot))
            if held is not None and (ev.event_id, ev.slot) in keys:
                held.add_reward(ev.reward, ev.reward_id or "")
        return len(taken)
