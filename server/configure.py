"""Applying configuration to a running engine: plan, validate, store, then swap in memory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bandit.errors import InvalidInput
from bandit.model import CbModel, check_vw_arguments
from bandit.spec import CampaignSpec, PlacementSpec
from server.placements import Change, plan, plan_campaigns

if TYPE_CHECKING:
    from server.engine import Engine

log = logging.getLogger(__name__)


class Configurator:
    """One configuration change at a time; each is all-or-nothing."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = asyncio.Lock()

    def _check(self, specs: Sequence[PlacementSpec], campaigns: Sequence[CampaignSpec]) -> None:
        for field, ids in (("placements", [s.id for s in specs]), ("campaigns", [c.id for c in campaigns])):
            dup = next((i for i in ids if ids.count(i) > 1), None)
            if dup is not None:
                raise InvalidInput(field, f"{dup!r} is listed twice")
        known = set(self._engine.budgets.campaigns) | {c.id for c in campaigns}
        for i, s in enumerate(specs):
            for j, a in enumerate(s.arms):
                if a.campaign is not None and a.campaign not in known:
                    raise InvalidInput(f"placements[{i}].arms[{j}].campaign", f"unknown campaign {a.campaign!r}")
            if s.fallback_arm is not None:
                fb = next(a for a in s.arms if a.id == s.fallback_arm)
                if fb.budget is not None or fb.campaign is not None:
                    raise InvalidInput(
                        f"placements[{i}].fallback_arm", "the fallback arm bypasses budgets, so it cannot have one"
                    )

    async def apply(
        self, specs: Sequence[PlacementSpec], campaigns: Sequence[CampaignSpec], dry_run: bool
    ) -> list[Change]:
        e = self._engine
        self._check(specs, campaigns)
        async with self._lock:
            current = {pid: ps.record for pid, ps in e.states.items()}
            camp_changes = plan_campaigns(e.budgets.campaigns, campaigns)
            p = plan(current, specs, e.store.max_learn_seq() + 1)
            for rec in p.records:
                if rec.spec.id in p.new_models:
                    check_vw_arguments(rec.spec)
            changes = camp_changes + p.changes
            if dry_run or not changes:
                return changes
            changed_campaigns = [c for c in campaigns if any(ch.campaign == c.id for ch in camp_changes)]
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                e._writer_pool, e.store.save_placements, p.records, p.new_arm_versions, changed_campaigns
            )
            for c in changed_campaigns:
                e.budgets.campaigns[c.id] = c
            features = {(pid, a, v): f for pid, a, v, f in p.new_arm_versions}
            for rec in p.records:
                old = e.states.get(rec.spec.id)
                lines = old.arm_lines if old is not None else {}
                if old is None or rec.spec.id in p.new_models:
                    if old is not None:
                        old.model.close()
                    model, cursor = CbModel(rec.spec), rec.model_since_seq
                else:
                    model, cursor = old.model, old.cursor
                ps = e.make_state(rec, model, cursor, features)
                ps.arm_lines = {**lines, **ps.arm_lines}
                if old is not None and old.model is model:
                    ps.since_snapshot, ps.last_snapshot = old.since_snapshot, old.last_snapshot
                e.states[rec.spec.id] = ps
            await e.rebuild_history()
            log.info("applied %d changes", len(changes))
            return changes
