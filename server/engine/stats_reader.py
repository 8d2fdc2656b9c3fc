"""Reading a placement's live statistics: tallies and budgets from the database, models from memory."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from nextbest.bandit.budget import Account
from nextbest.bandit.errors import InvalidInput, NotFound
from nextbest.bandit.offline.uplift import uplift
from nextbest.bandit.text import quote
from nextbest.engine.budgets import BudgetKeeper
from nextbest.engine.learner import PlacementState
from nextbest.engine.placement_stats import BudgetView, ModelView, Stats
from nextbest.engine.writer import BatchWriter
from nextbest.storage.base import ArmTally, Store, VariantConversions

UPLIFT_DAYS = 30  # the default period of the conversion figures: the last 30 days


class StatsReader:
    """Reads a placement's statistics: tallies from the log and budgets from the accounts (after
    this server's queued writes are flushed, so a caller sees its own decisions, and every server
    reports the same figures), models from memory."""

    def __init__(
        self,
        states: dict[str, PlacementState],
        writer: BatchWriter,
        budgets: BudgetKeeper,
        store: Store,
        reader_pool: ThreadPoolExecutor,
        clock: Callable[[], float],
    ) -> None:
        self._states = states
        self._writer = writer
        self._budgets = budgets
        self._store = store
        self._reader_pool = reader_pool
        self._clock = clock

    async def stats(self, pid: str, since: float | None = None, until: float | None = None) -> Stats:
        """The conversion figures cover [since, until): by default the last UPLIFT_DAYS days."""
        ps = self._states.get(pid)
        if ps is None:
            raise NotFound(f"placement {quote(pid)} does not exist")
        until = self._clock() if until is None else until
        since = until - UPLIFT_DAYS * 86400.0 if since is None else since
        if not since < until:
            raise InvalidInput("start_time", "must be before end_time")
        await asyncio.wait_for(self._writer.flush(), timeout=10)
        loop = asyncio.get_running_loop()
        tallies, total, no_arm = await loop.run_in_executor(self._reader_pool, self._store.tally, pid)
        by_arm = {t.arm_id: t for t in tallies}
        rows = [(by_arm.pop(a.id, ArmTally(a.id)), a.active) for a in ps.record.spec.arms]
        rows += [(t, False) for t in by_arm.values()]
        pending = sum(t.pending for t, _ in rows)
        variants = await loop.run_in_executor(self._reader_pool, self._store.tally_variants, pid)
        now = self._clock()
        accounts: dict[tuple[str, str], Account] = {}
        for a in ps.record.spec.arms:
            for acc in self._budgets.accounts(pid, a, now):
                accounts.setdefault((acc.key, acc.period), acc)
        # The database's figures (every server's, after this one's flush), so that each server
        # reports the same spent and remaining; reading them also refreshes this one's pacers.
        shared = await self._budgets.share(now, list(accounts))
        budgets = [BudgetView.of(acc, now, shared.get(k)) for k, acc in accounts.items()]
        ineligible: dict[str, list[tuple[str, int]]] = {}
        for t in await loop.run_in_executor(self._reader_pool, self._store.tally_ineligible, pid):
            ineligible.setdefault(t.arm_id, []).append((t.reason, t.decisions))
        # Uplift on real purchases: one statement per placement, one for the unattributed, and
        # neither without a conversion in the period (one index probe: GetStats stays as cheap
        # as before where no billing feed reports conversions).
        tally: list[VariantConversions] = []
        unattributed: dict[str, tuple[int, float]] = {}
        if await loop.run_in_executor(self._reader_pool, self._store.any_conversion, since, until):
            tally = await loop.run_in_executor(self._reader_pool, self._store.conversion_tally, pid, since, until)
            unattributed = await loop.run_in_executor(self._reader_pool, self._store.unattributed_by_product, since, until)
        # The models last, after every await, together: the learner runs between awaits, and a
        # version read apart from the models' counts disagreed with them by one.
        models = [ModelView.of(s) for s in ps.models.values()]
        return Stats(
            pid,
            rows,
            total,
            ps.model.learned,
            pending,
            budgets,
            no_arm,
            variants,
            models,
            ineligible,
            uplift(tally),
            unattributed,
        )
