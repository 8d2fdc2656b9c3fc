"""Applying configuration to a running engine: plan, validate, store, then swap in memory.

Every stored configuration has a serial (one more per save). Each server records in the
servers table the serial it has loaded, and an apply answers once every live server has
confirmed its serial, or ``config_confirm_wait`` has passed (then it logs which servers had
not): see docs/operations.md "Replicas"."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from nextbest.bandit.decider import ArmView
from nextbest.bandit.errors import InvalidInput, NotFound
from nextbest.bandit.features import arm_line, features_from_mapping
from nextbest.bandit.model import CbModel, check_vw_arguments
from nextbest.bandit.spec import CampaignSpec, PlacementSpec
from nextbest.bandit.text import quote
from nextbest.config.plans import Change, plan, plan_campaigns
from nextbest.engine import model_groups
from nextbest.engine.budgets import BudgetKeeper, budget_specs
from nextbest.engine.chooser import placement_salt
from nextbest.engine.contacts import Contacts
from nextbest.engine.learner import PlacementModel, PlacementState
from nextbest.settings import Settings
from nextbest.storage.base import PlacementRecord, Store


def _is_new(old: PlacementState | None, s: PlacementModel) -> bool:
    """A model made for this change (not one the placement already had)."""
    return old is None or all(o.model is not s.model for o in old.models.values())


def _moved(old: PlacementState | None, name: str, s: PlacementModel) -> bool:
    """The named model is another than before (new or promoted): it needs a snapshot."""
    return old is None or name not in old.models or old.models[name].model is not s.model


log = logging.getLogger(__name__)


def placement_state(
    rec: PlacementRecord,
    models: dict[str, PlacementModel],
    features: dict[tuple[str, str, int], dict[str, float | str | bool]],
    seed: str,
) -> PlacementState:
    """A placement as the engine serves it: its record, models, active arms and their VW lines."""
    pid = rec.spec.id
    lines = {(arm, version): arm_line(arm, features_from_mapping(f)) for (p, arm, version), f in features.items() if p == pid}
    arms = [ArmView.of(a, rec.arm_versions[a.id]) for a in rec.spec.active_arms()]
    return PlacementState(rec, models, arms, lines, placement_salt(seed, pid))


class Configurator:
    """One configuration change at a time; each is all-or-nothing."""

    def __init__(
        self,
        states: dict[str, PlacementState],
        budgets: BudgetKeeper,
        contacts: Contacts,
        store: Store,
        reader_pool: ThreadPoolExecutor,
        writer_pool: ThreadPoolExecutor,
        seed: str,
        settings: Settings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._states = states
        self._budgets = budgets
        self._contacts = contacts
        self._store = store
        self._reader_pool = reader_pool
        self._writer_pool = writer_pool  # placements are stored on the writer's thread, in order with the log
        self._seed = seed
        self._settings = settings
        self._clock = clock
        self._lock = asyncio.Lock()
        self.serial = 0  # the configuration serial this server holds (confirmed in the servers table)
        self.request_reload: Callable[[], None] | None = None  # asks replication to reload now

    async def _rebind(self) -> None:
        await self._budgets.rebind(budget_specs((ps.record.spec for ps in self._states.values()), self._budgets.campaigns.values()))

    async def confirm(self, serial: int) -> None:
        """Record that this server holds the configuration up to ``serial``."""
        self.serial = max(self.serial, serial)
        await asyncio.get_running_loop().run_in_executor(self._reader_pool, self._store.confirm_config, serial)

    async def wait_confirmed(self, serial: int) -> list[str]:
        """Wait until every other live server has confirmed ``serial`` or ``config_confirm_wait``
        has passed; returns the servers that had not (logged)."""
        st = self._settings
        if st is None or not st.may_have_peers or st.config_confirm_wait <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + st.config_confirm_wait
        live_since = self._clock() - st.live_for
        while True:
            pending = await loop.run_in_executor(self._reader_pool, self._store.unconfirmed_servers, serial, live_since)
            if not pending:
                return []
            if time.monotonic() >= deadline:
                log.warning(
                    "configuration %d applied; %d live servers had not confirmed it after %.1fs (they hold their budgets until"
                    " they reload): %s",
                    serial,
                    len(pending),
                    st.config_confirm_wait,
                    ", ".join(pending),
                )
                return pending
            await asyncio.sleep(0.01)

    def _check(self, specs: Sequence[PlacementSpec], campaigns: Sequence[CampaignSpec]) -> None:
        for field, ids in (("placements", [s.id for s in specs]), ("campaigns", [c.id for c in campaigns])):
            dup = next((i for i in ids if ids.count(i) > 1), None)
            if dup is not None:
                raise InvalidInput(field, f"{dup!r} is listed twice")
        known = set(self._budgets.campaigns) | {c.id for c in campaigns}
        for i, s in enumerate(specs):
            for j, a in enumerate(s.arms):
                if a.campaign is not None and a.campaign not in known:
                    raise InvalidInput(f"placements[{i}].arms[{j}].campaign", f"unknown campaign {a.campaign!r}")
            if s.fallback_arm is not None:
                fb = next(a for a in s.arms if a.id == s.fallback_arm)
                if fb.budget is not None or fb.campaign is not None:
                    raise InvalidInput(f"placements[{i}].fallback_arm", "the fallback arm bypasses budgets, so it cannot have one")

    def _models(self, spec: PlacementSpec, old: PlacementState | None, since: int) -> dict[str, PlacementModel]:
        """The placement's models after the change: kept where their settings did not change,
        promoted from a variant on request, new (learning from ``since`` on) otherwise."""
        out: dict[str, PlacementModel] = {}
        for name, key in spec.model_keys().items():
            prev = old.models.get(name) if old is not None else None
            if name == "" and spec.promote is not None and old is not None and spec.promote in old.models:
                winner = old.models[spec.promote]
                if winner.key != key:
                    raise InvalidInput(
                        "promote", f"variant {spec.promote!r} was trained with other VW settings; give the placement its settings"
                    )
                out[name] = PlacementModel(name, key, winner.model, winner.cursor, scale=winner.scale)
            elif prev is not None and prev.key == key:
                out[name] = prev
            else:
                check_vw_arguments(spec.model_spec(name))
                out[name] = PlacementModel(name, key, CbModel(spec.model_spec(name)), since)
        return out

    def _close_new(self, models: dict[str, dict[str, PlacementModel]]) -> None:
        """Close the models made for a change that is not applied."""
        for pid, made in models.items():
            for s in made.values():
                if _is_new(self._states.get(pid), s) and s.group is None:
                    s.model.close()

    async def reload(self, serial: int | None = None) -> None:
        """Adopt what another server applied: placements, arms and campaigns as stored, models
        from their snapshots where the settings changed; then the budgets' limits (giving back
        unused lease of a lowered one) and, given the ``serial`` read before loading, confirm it."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            records = await loop.run_in_executor(self._reader_pool, self._store.load_placements)
            campaigns = await loop.run_in_executor(self._reader_pool, self._store.load_campaigns)
            features = await loop.run_in_executor(self._reader_pool, self._store.arm_features)
            self._budgets.campaigns = {c.id: c for c in campaigns}
            built: dict[str, dict[str, PlacementModel]] = {}
            changed = []
            for rec in records:
                pid = rec.spec.id
                old = self._states.get(pid)
                if old is not None and old.record == rec:
                    continue
                changed.append(rec)
                snaps = await loop.run_in_executor(self._reader_pool, self._store.load_snapshots, pid)
                models: dict[str, PlacementModel] = {}
                built[pid] = models
                for name, key in rec.spec.model_keys().items():
                    prev = old.models.get(name) if old is not None else None
                    snap = snaps.get(name)
                    if prev is not None and prev.key == key:
                        models[name] = prev
                    elif snap is not None and snap.key == key:
                        model = CbModel(rec.spec.model_spec(name), snap.model, learned=snap.learned)
                        models[name] = PlacementModel(name, key, model, snap.learn_seq)
                    else:
                        models[name] = PlacementModel(name, key, CbModel(rec.spec.model_spec(name)), rec.model_since_seq)
            since = {rec.spec.id: rec.model_since_seq for rec in records}
            before = [pm for ps in self._states.values() for pm in ps.models.values()]
            _, replaced = await model_groups.share(
                {rec.spec.id: rec.spec for rec in records},
                built,
                model_groups.current(self._states),
                load=lambda owner: loop.run_in_executor(self._reader_pool, self._store.load_snapshots, owner),
                since=lambda pids: max(since[p] for p in pids),
            )
            made_states = [placement_state(rec, built[rec.spec.id], features, self._seed) for rec in changed]
            for ps in made_states:
                own = self._states.get(ps.id)
                ps.own_learned, ps.own_scale = await model_groups.own_exploration(ps, own, store=self._store, pool=self._reader_pool)
            for ps in made_states:  # all at once: no Choose sees part of the change
                model_groups.carry_over(ps, self._states.get(ps.id))
                self._states[ps.id] = ps
            model_groups.close_unused([*before, *replaced], self._states)
            await self._contacts.rebuild()
            await self._rebind()
            if serial is not None:
                await self.confirm(serial)
            log.info("reloaded the configuration another server applied (serial %s)", serial)

    def exists(self, pid: str) -> bool:
        return pid in self._states

    def placement(self, pid: str) -> PlacementRecord:
        ps = self._states.get(pid)
        if ps is None:
            raise NotFound(f"placement {quote(pid)} does not exist")
        return ps.record

    def placements(self) -> list[PlacementRecord]:
        return [self._states[k].record for k in sorted(self._states)]

    def campaigns(self) -> list[CampaignSpec]:
        return sorted(self._budgets.campaigns.values(), key=lambda c: c.id)

    async def apply(self, specs: Sequence[PlacementSpec], campaigns: Sequence[CampaignSpec] = (), dry_run: bool = False) -> list[Change]:
        """Make the given placements and campaigns live, atomically; returns the changes."""
        self._check(specs, campaigns)
        async with self._lock:
            current = {pid: ps.record for pid, ps in self._states.items()}
            camp_changes = plan_campaigns(self._budgets.campaigns, campaigns)
            loop = asyncio.get_running_loop()
            since = self._store.max_learn_seq()
            p = plan(current, specs, since + 1)
            models = {rec.spec.id: self._models(rec.spec, self._states.get(rec.spec.id), since) for rec in p.records}
            after = {pid: ps.record.spec for pid, ps in self._states.items()} | {rec.spec.id: rec.spec for rec in p.records}
            try:
                model_groups.check(after, {s.id: f"placements[{i}]" for i, s in enumerate(specs)})
                made, replaced = await model_groups.share(
                    after,
                    models,
                    model_groups.current(self._states),
                    load=lambda owner: loop.run_in_executor(self._reader_pool, self._store.load_snapshots, owner),
                    since=lambda pids: since,
                )
            except BaseException:
                self._close_new(models)
                raise
            changes = camp_changes + p.changes
            if dry_run or not changes:
                self._close_new(models)
                model_groups.close_unused([*made, *replaced], self._states)
                return changes
            changed_campaigns = [c for c in campaigns if any(ch.campaign == c.id for ch in camp_changes)]
            # New and promoted models are saved with the configuration: a restart knows where each starts.
            fresh = list(
                {
                    (snap.placement, snap.name): snap
                    for pid, own in models.items()
                    for name, s in own.items()
                    if _moved(self._states.get(pid), name, s) and (snap := s.snapshot(pid))
                }.values()
            )
            features = {(pid, a, v): f for pid, a, v, f in p.new_arm_versions}
            made_states = [placement_state(rec, models[rec.spec.id], features, self._seed) for rec in p.records]
            for ps in made_states:  # read before the commit: from there the change is one step on the loop
                old = self._states.get(ps.id)
                ps.own_learned, ps.own_scale = await model_groups.own_exploration(ps, old, store=self._store, pool=self._reader_pool)
            self._budgets.hold()  # from the commit on, spend only under the new limits (rebind below)
            try:
                await loop.run_in_executor(
                    self._writer_pool, self._store.save_placements, p.records, p.new_arm_versions, changed_campaigns, fresh
                )
            except BaseException:
                self._close_new(models)
                model_groups.close_unused([*made, *replaced], self._states)
                await self._rebind()
                raise
            for c in changed_campaigns:
                self._budgets.campaigns[c.id] = c
            before = [pm for ps in self._states.values() for pm in ps.models.values()]
            for ps in made_states:
                old = self._states.get(ps.id)
                if old is not None:
                    ps.arm_lines = {**old.arm_lines, **ps.arm_lines}
                model_groups.carry_over(ps, old)
                self._states[ps.id] = ps
            model_groups.close_unused([*before, *replaced], self._states)
            await self._contacts.rebuild()
            await self._rebind()
            serial = await loop.run_in_executor(self._reader_pool, self._store.config_serial)
            if serial == self.serial + 1:  # nothing else was stored since this server's last load
                await self.confirm(serial)
            elif self.request_reload is not None:  # another server stored one meanwhile: load it too
                self.request_reload()
            log.info("applied %d changes (configuration %d)", len(changes), serial)
        await self.wait_confirmed(serial)
        return changes
