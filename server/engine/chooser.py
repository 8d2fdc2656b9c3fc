"""Choose: one decision per slot, made on the event loop, with its budget reserved, its
impression counted and its reward window opened before anything else runs.

Before its decisions a Choose may await the customer's stored profile and, when contact history
is shared between servers, the customer's lock (a placement with caps) or a read of their
history (a placement with history features only; batched with the other Chooses' reads, as
profile misses are). From there to its last decision nothing awaits but a budget lease (rarely):
a decision and its reservations are atomic on the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from nextbest.bandit.budget import Account, Ledger
from nextbest.bandit.contact import Impression
from nextbest.bandit.decider import (
    NO_ARM_CONTEXT,
    NO_CONTEXT,
    NOTHING_EXCLUDED,
    ArmContexts,
    ArmView,
    Candidate,
    Choice,
    context_of,
    decide,
    ruled_out,
    serve_holdout,
)
from nextbest.bandit.decision_log import Explanation, LoggedDecision, Outcome
from nextbest.bandit.eligibility import Value
from nextbest.bandit.errors import AlreadyExists, InvalidInput, NotFound, Unavailable
from nextbest.bandit.features import Feature, feature, shared_line
from nextbest.bandit.spec import PlacementSpec
from nextbest.bandit.text import quote
from nextbest.engine.budgets import BudgetKeeper
from nextbest.engine.choose_checks import ChooseChecks
from nextbest.engine.choose_context import (
    NO_ADDITIONS,
    ChooseContext,
    arm_history,
    caps,
    impressions_made,
    logged_context,
    merged,
    retrieved,
)
from nextbest.engine.contacts import Contacts
from nextbest.engine.learner import Learner, PlacementState
from nextbest.engine.model_groups import with_placement
from nextbest.engine.profiles import ProfileCache
from nextbest.engine.windows import OpenDecision, RewardWindows
from nextbest.engine.writer import BatchWriter
from nextbest.storage.base import RecentImpression
from nextbest.storage.refusal import RecordRefused
from nextbest.telemetry.metrics import Metrics


def placement_salt(seed: str, placement: str) -> bytes:
    return hashlib.blake2b(f"{seed}/{placement}".encode(), digest_size=32).digest()


def uniform_for(salt: bytes, event_id: str) -> float:
    """A uniform draw in [0, 1) fixed by the event id: a decision can be replayed exactly."""
    h = hashlib.blake2b(event_id.encode(), key=salt, digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def variant_of(spec: PlacementSpec, customer_id: str, event_id: str) -> str:
    """Sticky per customer (a salted hash of customer_id); per event for anonymous requests."""
    exp = spec.experiment
    if exp is None:
        return ""
    salt = hashlib.blake2b(f"experiment/{spec.id}/{exp.salt}".encode(), digest_size=32).digest()
    u = uniform_for(salt, customer_id or event_id)
    edge = exp.holdout.share if exp.holdout is not None else 0.0
    if u < edge:
        return "holdout"
    for v in exp.variants:
        edge += v.share
        if u < edge:
            return v.id
    return exp.variants[-1].id if exp.variants else "holdout"


_BASELINE = Explanation("baseline")  # the caller's own choice (apprentice, logging-only modes)
MAX_EXCLUDED = 1000  # ids in one ChooseRequest.exclude_arms


def _exclusions(spec: PlacementSpec, ids: Sequence[str]) -> frozenset[str]:
    """The caller's exclusions, each an arm of the placement (INVALID_ARGUMENT naming the entry)."""
    if not ids:
        return NOTHING_EXCLUDED
    if len(ids) > MAX_EXCLUDED:
        raise InvalidInput("exclude_arms", f"at most {MAX_EXCLUDED} arms, got {len(ids)}")
    known = {a.id for a in spec.arms}
    for i, arm in enumerate(ids):
        if arm not in known:
            raise InvalidInput(f"exclude_arms[{i}]", f"unknown arm {quote(arm)}")
    return frozenset(ids)


# How long a Choose with a caller-chosen event id waits for the store to take its decision
# (one group commit, a few ms) before it answers without knowing; the decision is then undone
# when the store refuses it (its id is taken), and meanwhile answered as new.
_INSERT_WAIT = 0.5


@dataclass(slots=True)
class _Made:
    """A decision of this Choose and what it holds, undone if the store does not take it."""

    windows: RewardWindows
    learner: Learner
    decision: LoggedDecision
    entry: OpenDecision | None
    accounts: list[Account]
    spent: float
    reserved: float

    def undo(self) -> None:
        """The decision is not logged (its id is another decision's, or the database refused it):
        its window, budget reservation and cached text go; nothing stays reserved for it."""
        d = self.decision
        if self.entry is not None:
            self.windows.forget((d.event_id, d.slot), self.entry)
        if self.accounts:
            Ledger.unreserve(self.accounts, self.spent, self.reserved)
        self.learner.forget(d.event_id, d.slot)


class Chooser:
    """The Choose path of an engine."""

    def __init__(
        self,
        checks: ChooseChecks,
        states: dict[str, PlacementState],
        contacts: Contacts,
        budgets: BudgetKeeper,
        windows: RewardWindows,
        writer: BatchWriter,
        learner: Learner,
        metrics: Metrics,
        acceptance: dict[tuple[str, str], list[int]],
        clock: Callable[[], float],
        profiles: ProfileCache | None = None,
    ) -> None:
        self._checks = checks
        self._profiles = profiles
        self._states = states
        self._contacts = contacts
        self._budgets = budgets
        self._windows = windows
        self._writer = writer
        self._learner = learner
        self._metrics = metrics
        self._acceptance = acceptance  # (placement, arm) -> [accepted, closed], kept by the windows
        self._clock = clock

    async def choose(
        self,
        placement: str,
        customer_id: str,
        event_id: str,
        features: Sequence[Feature],
        baseline_arm: str = "",
        defer: bool = False,
        slot_features: Sequence[Sequence[Feature]] = (),
        exclude_arms: Sequence[str] = (),
    ) -> list[LoggedDecision]:
        """Decide on the loop: one decision per slot; they join the next log batch.
        ``exclude_arms``: arms the caller knows are wrong now (owned, out of stock)."""
        self._checks.validate(placement, customer_id, event_id, features)
        for k, sf in enumerate(slot_features):
            self._checks.validate(placement, customer_id, event_id, sf, f"slot_features[{k}].features")
        ps = self._states.get(placement)
        if ps is None:
            raise NotFound(f"placement {quote(placement)} does not exist")
        spec = ps.record.spec
        if baseline_arm and baseline_arm not in {a.id for a in ps.arms}:
            raise InvalidInput("baseline_arm", f"{quote(baseline_arm)} is not an active arm of {quote(placement)}")
        if spec.mode == "apprentice" and not baseline_arm:
            raise InvalidInput("baseline_arm", "required: the placement is in apprentice mode")
        excluded = _exclusions(spec, exclude_arms)
        shared = self._contacts.shared
        tracked = bool(customer_id) and self._contacts.history.horizon > 0
        locked = (reads := tracked and shared is not None and spec.history_horizon > 0) and caps(spec)  # reads: shared history
        reading: asyncio.Future[list[RecentImpression]] | None = None
        if reads and not locked and shared is not None:
            # History features only: read with every other Choose of the moment (one query),
            # no lock; alongside the profile's read.
            reading = shared.read(customer_id, self._clock() - self._contacts.history.horizon)
            reading.add_done_callback(retrieved)
        added = NO_ADDITIONS
        if spec.context.profile and customer_id and self._profiles is not None:
            profile = await self._profiles.get(customer_id)  # cached, else read with others' misses
            if self._states.get(placement) is not ps:
                raise InvalidInput("placement", "the placement changed during the decision; retry")
            features, added = merged(spec, features, profile)
        if spec.model_group:  # one model for the group: it must know which placement decides
            features = with_placement(features, spec)
            added = replace(added, shared=None)  # the profile's cached line lacks the placement
        if shared is not None and tracked and not locked:
            # No cap of this placement reads the history: its impressions join the next group
            # commit of the shared history (other placements' caps count them), after the decision.
            history = None
            if reading is not None:
                rows = await reading
                if self._states.get(placement) is not ps:
                    raise InvalidInput("placement", "the placement changed during the decision; retry")
                history = [self._contacts.impression(r) for r in rows]
            out = await self._choose(
                ps, customer_id, event_id, features, baseline_arm, defer, slot_features, history or [], excluded, added
            )
            shared.record(impressions_made(customer_id, out))
            return out
        if locked:
            assert shared is not None
            since = self._clock() - self._contacts.history.horizon
            async with shared.customer(customer_id, since) as tx:
                if self._states.get(placement) is not ps:
                    raise InvalidInput("placement", "the placement changed during the decision; retry")
                history = [self._contacts.impression(r) for r in tx.history]
                out = await self._choose(ps, customer_id, event_id, features, baseline_arm, defer, slot_features, history, excluded, added)
                tx.new.extend(impressions_made(customer_id, out))
                return out
        return await self._choose(ps, customer_id, event_id, features, baseline_arm, defer, slot_features, None, excluded, added)

    async def _choose(
        self,
        ps: PlacementState,
        customer_id: str,
        event_id: str,
        features: Sequence[Feature],
        baseline_arm: str,
        defer: bool,
        slot_features: Sequence[Sequence[Feature]],
        shared_history: list[Impression] | None,
        excluded: frozenset[str] = NOTHING_EXCLUDED,
        added: ChooseContext = NO_ADDITIONS,
    ) -> list[LoggedDecision]:
        """The decisions of one Choose; ``shared_history`` is the customer's impressions from
        the database when contact history is shared, else None (this server's memory)."""
        spec = ps.record.spec
        placement = spec.id
        now = self._clock()
        closed = spec.closed(now)
        if closed:
            candidates: list[Candidate] = []
        elif ps.budgeted:
            candidates = [Candidate(a, self._accounts(placement, a, now), self._accepts(placement, a.id)) for a in ps.arms]
        else:
            candidates = ps.candidates  # shared between requests: nothing changes a Candidate
        if ps.budgeted and any(c.accounts for c in candidates):
            await self._budgets.ensure(candidates, now)  # the only await: a lease, rarely
            if self._states.get(placement) is not ps:
                raise InvalidInput("placement", "the placement changed during the decision; retry")
        # From here to the last decision nothing awaits: the decisions and their reservations
        # are atomic. A caller-chosen event id is new only if the store takes its decision (the
        # id may be any server's, from any time): the Choose waits for that insert, below.
        chosen_id = bool(event_id)
        if not event_id:
            event_id = self._new_id()
        elif self._windows.slots_of(event_id):
            raise AlreadyExists(f"event_id {quote(event_id)} is already used by a decision")
        waits: list[tuple[asyncio.Future[bool], _Made]] = []
        shown: list[Impression] = []
        tracked = bool(customer_id) and self._contacts.history.horizon > 0
        if shared_history is not None:
            history = shared_history
        else:
            history = self._contacts.history.impressions(customer_id, now) if tracked else []
        variant = variant_of(spec, customer_id, event_id)
        out: list[LoggedDecision] = []
        taken: set[str] = set()
        for k in range(spec.slots):
            feats = tuple(features)
            if spec.slots > 1:
                feats += (feature("slot", "position", str(k)), *(slot_features[k] if k < len(slot_features) else ()))
            d = self._decide_slot(
                ps,
                variant,
                [c for c in candidates if c.arm.id not in taken] if taken else candidates,
                feats,
                customer_id,
                event_id,
                k,
                now,
                history,
                baseline_arm,
                defer,
                closed,
                excluded,
                waits if chosen_id else None,
                added,
            )
            if d.arm_id is None and k > 0:
                break  # fewer arms than slots: the response is shorter
            out.append(d)
            if d.arm_id is None:
                break
            taken.add(d.arm_id)
            if tracked and not defer:
                campaign = ps.arm_campaigns.get(d.arm_id)
                ev = event_id if k == 0 else f"{event_id}#{k}"
                imp = Impression(now, d.arm_id, campaign, placement, ev)
                if shared_history is None:  # else the caller records it in the database
                    shown.append(imp)
                history.append(imp)
        await self._inserted(event_id, waits)
        for imp in shown:  # counted once the decision is sure to be logged
            self._contacts.history.record(customer_id, imp)
        return out

    def _new_id(self) -> str:
        """A server-made event id names the server that made it: a Reward sent to another server
        before this one's group commit (or while it stalls) hears UNAVAILABLE, not NOT_FOUND,
        while this server is alive (RewardWindows.find)."""
        return f"{self._windows.server_id or ''}-{uuid.uuid4().hex}"

    async def _inserted(self, event_id: str, waits: list[tuple[asyncio.Future[bool], _Made]]) -> None:
        """Wait until the store took this Choose's decisions: ALREADY_EXISTS where it did not
        (the id is another decision's, made by any server at any time; the writer undid them).
        While the database is away (or slower than _INSERT_WAIT) the Choose is answered as new
        and the store decides later: a refused decision is then undone, never logged."""
        if not waits or not self._writer.healthy:
            return
        try:
            together = asyncio.gather(*(f for f, _ in waits))
            together.add_done_callback(lambda f: f.cancelled() or f.exception())  # read even when no one waits any more
            results = await asyncio.wait_for(asyncio.shield(together), _INSERT_WAIT)
        except asyncio.CancelledError:
            # The caller gave up (its deadline): decisions not written yet are withdrawn and
            # undone, so nothing is logged for an unanswered Choose (one being written stays).
            for _, made in waits:
                if self._writer.withdraw(made.decision):
                    made.undo()
            raise
        except RecordRefused:
            raise  # the database will never take this decision (a NUL byte on PostgreSQL, ...)
        except (Unavailable, TimeoutError):
            return
        if not all(results):
            raise AlreadyExists(f"event_id {quote(event_id)} is already used by a decision")

    def _decide_slot(
        self,
        ps: PlacementState,
        variant: str,
        candidates: list[Candidate],
        features: tuple[Feature, ...],
        customer_id: str,
        event_id: str,
        slot: int,
        now: float,
        history: list[Impression],
        baseline_arm: str,
        defer: bool,
        closed: str = "",
        excluded: frozenset[str] = NOTHING_EXCLUDED,
        waits: list[tuple[asyncio.Future[bool], _Made]] | None = None,
        added: ChooseContext = NO_ADDITIONS,
    ) -> LoggedDecision:
        spec = ps.record.spec
        salt = ps.salt
        draw_id = event_id if slot == 0 else f"{event_id}#{slot}"
        draw = lambda: uniform_for(salt, draw_id)  # noqa: E731
        shared = added.shared if added.shared is not None else shared_line(features)
        context = context_of(features) if spec.has_rules else NO_CONTEXT  # slot features included
        by_arm: dict[str, tuple[Feature, ...]] = {}
        arm_rules: ArmContexts = NO_ARM_CONTEXT
        if spec.context.history and customer_id and candidates:
            candidates, by_arm, arm_rules = arm_history(spec, history, candidates, now)
        model_version = 0
        if closed:
            choice = Choice(None, 0.0, (), reason=closed)
        elif baseline_arm and spec.mode in ("apprentice", "logging_only") and slot == 0:
            choice = self._baseline(ps, candidates, shared, baseline_arm, context, excluded, arm_rules)
            model_version = ps.model.learned
        elif variant == "holdout":
            assert spec.experiment is not None and spec.experiment.holdout is not None
            choice = serve_holdout(spec.experiment.holdout, spec, candidates, features, draw, now, history, context, excluded, arm_rules)
        else:
            serving = ps.models[variant]
            learned, scale = ps.exploration(serving)
            choice = decide(
                serving.model,
                spec.variant(variant),
                candidates,
                shared,
                draw,
                now,
                history,
                scale,
                budgeted=ps.budgeted,
                context=context,
                excluded=excluded,
                arms=arm_rules,
                learned=learned,
            )
            model_version = serving.model.learned
        chosen = candidates[choice.eligible[choice.arm_index]] if choice.arm_index is not None else None
        cost = reward_cost = 0.0
        keys: tuple[tuple[str, str], ...] = ()
        reserved: tuple[list[Account], float, float] = ([], 0.0, 0.0)
        if chosen is not None and chosen.accounts and Ledger.can_reserve(chosen.accounts, chosen.reservation, now) == "":
            cost, reward_cost = chosen.spec.cost_per_impression, chosen.spec.cost_per_reward
            # Deferred: nothing is spent before the customer sees it: hold the impression cost too.
            reserved = (chosen.accounts, 0.0, cost + reward_cost) if defer else (chosen.accounts, cost, reward_cost)
            self._budgets.reserve(*reserved)
            keys = tuple((a.key, a.period) for a in chosen.accounts)
        deadline = now + (spec.activation_window if defer else spec.reward_window)
        decision = LoggedDecision(
            event_id=event_id,
            placement=spec.id,
            customer_id=customer_id,
            timestamp=now,
            features=features,
            arms=ps.arm_keys
            if candidates is ps.candidates and len(choice.eligible) == len(candidates)
            else tuple((candidates[i].arm.id, candidates[i].arm.version) for i in choice.eligible),
            pmf=choice.pmf,
            chosen=choice.arm_index,
            probability=choice.probability,
            model_version=model_version,
            deadline=deadline,
            outcome=Outcome.OPEN if chosen is not None else Outcome.NO_ARM,
            cost=cost,
            reward_cost=reward_cost,
            budgets=keys,
            ineligible=tuple(choice.ineligible.items()),
            reason=choice.reason,
            variant=variant,
            slot=slot,
            activated=not defer,
            explanation=choice.explanation,
            context=logged_context(added, by_arm, candidates, choice.eligible),
        )
        self._metrics.decision(spec.id, decision.arm_id)
        entry = None
        if chosen is not None:
            self._learner.remember(event_id, slot, shared)
            entry = OpenDecision(
                spec.id,
                deadline,
                chosen.arm.id,
                customer_id,
                chosen.spec.campaign,
                cost,
                reward_cost,
                keys,
                activated=not defer,
            )
            self._windows.add(event_id, slot, entry)
        made = _Made(self._windows, self._learner, decision, entry, *reserved)
        inserted = self._writer.add_decision(decision, on_dropped=made.undo, wait=waits is not None)
        if waits is not None and inserted is not None:
            waits.append((inserted, made))
        return decision

    def _baseline(
        self,
        ps: PlacementState,
        candidates: list[Candidate],
        shared: str,
        baseline: str,
        context: Mapping[str, Value],
        excluded: frozenset[str],
        arm_rules: ArmContexts = NO_ARM_CONTEXT,
    ) -> Choice:
        """Apprentice and logging-only modes serve the caller's own choice, unless an eligibility
        rule or the caller's own exclusions rule it out (then nothing is served: an ineligible
        offer is never shown); apprentice mode also scores whether the model's greedy choice
        among the eligible arms would have matched it."""
        spec = ps.record.spec
        why = {c.arm.id: r for c in candidates if (r := ruled_out(spec, c.spec, context, excluded, arm_rules))}
        if baseline in why:
            return Choice(None, 0.0, (), (), why, reason=f"baseline arm {quote(baseline)} is not eligible: {why[baseline]}")
        ok = [i for i, c in enumerate(candidates) if c.arm.id not in why]
        j = [candidates[i].arm.id for i in ok].index(baseline)
        if spec.mode == "apprentice":
            pm = ps.models[""]
            greedy = int(np.argmax(pm.model.expected_rewards(shared, [candidates[i].arm.line for i in ok])))
            pm.scored += 1
            pm.recent.append(greedy == j)
            pm.agreed += greedy == j
        pmf = tuple(1.0 if i == j else 0.0 for i in range(len(ok)))
        return Choice(j, 1.0, pmf, tuple(ok), why, explanation=_BASELINE)

    def _accounts(self, placement: str, arm: ArmView, now: float) -> list[Account]:
        a = arm.spec
        if a is None or (a.budget is None and a.campaign is None):
            return []
        return self._budgets.accounts(placement, a, now)

    def _accepts(self, placement: str, arm: str) -> float:
        accepted, closed = self._acceptance.get((placement, arm), (0, 0))
        return (accepted + 1) / (closed + 2)
