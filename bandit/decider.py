"""The decision pipeline of one placement:

eligible arms (the caller's exclusions, active, dates, eligibility rules, budget, contact
policy) → VW scores → adjusted by business value, pacing price × expected cost and fatigue
penalty → exploration → draw.

The logged probability is the final probability of the drawn arm among the eligible ones (and
the "no offer" option that pacing adds), so offline evaluation stays unbiased; the reasons why
other arms were not eligible are returned for the log.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from nextbest.bandit import contact, exploration
from nextbest.bandit.budget import Account, Ledger
from nextbest.bandit.decision_log import Explanation
from nextbest.bandit.eligibility import Value, reason_against
from nextbest.bandit.explain import fallback_not_eligible
from nextbest.bandit.features import Feature, arm_line, feature_key
from nextbest.bandit.model import CbModel
from nextbest.bandit.reward_scale import exploration_scale
from nextbest.bandit.spec import ArmSpec, ExplorationSpec, HoldoutSpec, PlacementSpec

NO_OFFER = "paced: no offer"
EXCLUDED = "excluded by caller"
NO_CONTEXT: Mapping[str, Value] = {}
NOTHING_EXCLUDED: frozenset[str] = frozenset()
# Per arm, by arm id: features only that arm has in this request (interaction history),
# read by rules on top of the request's context.
ArmContexts = Mapping[str, Mapping[str, Value]]
NO_ARM_CONTEXT: ArmContexts = {}


def context_of(features: Sequence[Feature]) -> dict[str, Value]:
    """A request's features by ``namespace.name``, as eligibility rules read them."""
    return {(f"{ns}.{name}" if ns else name): value for ns, name, value in features}  # feature_key, inlined


def arm_context(context: Mapping[str, Value], arms: ArmContexts, arm: str) -> Mapping[str, Value]:
    """The features a rule reads for one arm: the request's, and the arm's own on top."""
    own = arms.get(arm)
    return {**context, **own} if own else context


def ruled_out(
    spec: PlacementSpec, arm: ArmSpec, context: Mapping[str, Value], excluded: frozenset[str], arms: ArmContexts = NO_ARM_CONTEXT
) -> str:
    """Why the caller's exclusions or an eligibility rule (the placement's, then the arm's) keep
    this arm from this request; "" when they do not. Unknown (a missing feature) rules it out."""
    if arm.id in excluded:
        return EXCLUDED
    ctx = arm_context(context, arms, arm.id) if arms else context
    return reason_against(spec.eligible, ctx) or reason_against(arm.eligible, ctx)


@dataclass(frozen=True, slots=True)
class ArmView:
    """An arm as the decider sees it: its spec, version and cached VW text."""

    id: str
    version: int
    line: str
    spec: ArmSpec | None = None

    @classmethod
    def of(cls, arm: ArmSpec, version: int) -> ArmView:
        return cls(arm.id, version, arm_line(arm.id, arm.vw_features()), arm)


@dataclass(slots=True)
class Candidate:
    """An arm with the budget accounts a choice of it would spend from."""

    arm: ArmView
    accounts: list[Account] = field(default_factory=list)
    acceptance: float = 0.5  # estimated share of impressions that earn a positive reward

    @property
    def spec(self) -> ArmSpec:
        assert self.arm.spec is not None
        return self.arm.spec

    @property
    def reservation(self) -> float:
        return self.spec.cost_per_impression + self.spec.cost_per_reward

    @property
    def expected_cost(self) -> float:
        return self.spec.cost_per_impression + self.acceptance * self.spec.cost_per_reward


@dataclass(frozen=True, slots=True)
class Choice:
    """What the pipeline decided.

    ``eligible`` indexes the candidates that were scored, in order; ``pmf`` is over them (plus a
    last entry for "no offer" when pacing offered it); ``arm_index`` indexes ``eligible``.
    """

    arm_index: int | None
    probability: float
    pmf: tuple[float, ...]
    eligible: tuple[int, ...] = ()
    ineligible: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    fallback: bool = False
    explanation: Explanation | None = None  # how the pmf came about, for the log (Explain)


def exploration_parameter(spec: ExplorationSpec, learned: int) -> float:
    """Epsilon, softmax's lambda or SquareCB's gamma at ``learned`` examples."""
    if spec.algorithm == "epsilon":
        return spec.epsilon
    if spec.algorithm == "softmax":
        return spec.lam
    return exploration.squarecb_gamma(spec.gamma_scale, spec.gamma_exponent, learned)


def explore(values: NDArray[np.float64], spec: ExplorationSpec, learned: int, reward_scale: float = 1.0) -> NDArray[np.float64]:
    """The placement's exploration algorithm applied to (adjusted) expected rewards.

    Softmax and SquareCB compare value gaps with a temperature or gamma tuned for rewards in
    [0, 1]; values are divided by ``reward_scale`` (the width of a declared reward range, else a
    high quantile of the recent reward magnitudes, at least 1: bandit/reward_scale.py) so that
    revenue or margin rewards explore like acceptance rewards do.
    """
    parameter = exploration_parameter(spec, learned)
    if spec.algorithm == "epsilon":
        return exploration.epsilon_greedy(values, parameter)
    values = values / reward_scale
    if spec.algorithm == "softmax":
        return exploration.softmax(values, parameter)
    return exploration.squarecb(values, parameter)


def eligibility(
    spec: PlacementSpec,
    candidates: Sequence[Candidate],
    history: list[contact.Impression],
    now: float,
    budgeted: bool = True,
    context: Mapping[str, Value] = NO_CONTEXT,
    excluded: frozenset[str] = NOTHING_EXCLUDED,
    arms: ArmContexts = NO_ARM_CONTEXT,
) -> tuple[list[int], dict[str, str]]:
    """Indices of the eligible candidates, and the reason for each one that is not.
    ``budgeted=False`` promises that no candidate spends from a budget; ``context`` is the
    request's features for eligibility rules (``context_of``), ``excluded`` the caller's
    exclusions, ``arms`` each arm's own features (history) that its rules read too."""
    if spec.unconstrained and not (budgeted and any(c.accounts for c in candidates)):
        if not spec.has_rules and not excluded:
            return list(range(len(candidates))), {}
        return _by_rules(spec, candidates, context, excluded, arms)
    ok: list[int] = []
    why: dict[str, str] = {}
    placement_rule = "" if arms else reason_against(spec.eligible, context)  # once per request
    for i, c in enumerate(candidates):
        a = c.spec
        if arms:
            ctx = arm_context(context, arms, a.id)
            placement_rule = reason_against(spec.eligible, ctx)
        else:
            ctx = context
        if a.id in excluded:
            why[a.id] = EXCLUDED
        elif not a.active:
            why[a.id] = "retired or paused"
        elif a.start is not None and now < a.start.timestamp():
            why[a.id] = "not started"
        elif a.end is not None and now >= a.end.timestamp():
            why[a.id] = "ended"
        elif placement_rule:
            why[a.id] = placement_rule
        elif reason := reason_against(a.eligible, ctx):
            why[a.id] = reason
        elif c.accounts and (reason := Ledger.can_reserve(c.accounts, c.reservation, now)):
            why[a.id] = reason
        elif (spec.contact_policies or spec.cooldown) and (
            reason := contact.blocked(spec.contact_policies, spec.cooldown, spec.id, history, a.id, a.campaign, now)
        ):
            why[a.id] = reason
        else:
            ok.append(i)
    return ok, why


def _by_rules(
    spec: PlacementSpec, candidates: Sequence[Candidate], context: Mapping[str, Value], excluded: frozenset[str], arms: ArmContexts
) -> tuple[list[int], dict[str, str]]:
    """``eligibility`` of a placement whose only constraints are rules and exclusions."""
    ok: list[int] = []
    why: dict[str, str] = {}
    placement_rule = "" if arms else reason_against(spec.eligible, context)  # once per request
    for i, c in enumerate(candidates):
        a = c.spec
        if arms:
            ctx = arm_context(context, arms, a.id)
            placement_rule = reason_against(spec.eligible, ctx)
        else:
            ctx = context
        if a.id in excluded:
            why[a.id] = EXCLUDED
        elif placement_rule:
            why[a.id] = placement_rule
        elif reason := reason_against(a.eligible, ctx):
            why[a.id] = reason
        else:
            ok.append(i)
    return ok, why


_FALLBACK = Explanation("fallback")
_HOLDOUT = {p: Explanation(f"holdout: {p}") for p in ("uniform", "fixed", "rules")}


def fallback_against(
    spec: PlacementSpec,
    arm: ArmSpec,
    context: Mapping[str, Value],
    excluded: frozenset[str],
    now: float,
    arms: ArmContexts = NO_ARM_CONTEXT,
) -> str:
    """Why the fallback arm may not be served either ("" when it may). It bypasses budgets,
    contact policies and the cool-down, nothing else: an offer that the caller excluded, that is
    paused, outside its dates or whose eligibility rule is false or unknown is never shown."""
    if arm.id in excluded:
        return EXCLUDED
    if not arm.active:
        return "retired or paused"
    if arm.start is not None and now < arm.start.timestamp():
        return "not started"
    if arm.end is not None and now >= arm.end.timestamp():
        return "ended"
    return ruled_out(spec, arm, context, excluded, arms)


def _nothing(
    spec: PlacementSpec,
    candidates: Sequence[Candidate],
    why: dict[str, str],
    reason: str = "",
    now: float = 0.0,
    context: Mapping[str, Value] = NO_CONTEXT,
    excluded: frozenset[str] = NOTHING_EXCLUDED,
    arms: ArmContexts = NO_ARM_CONTEXT,
) -> Choice:
    """Nothing could be chosen: serve the fallback arm with certainty, unless it is ruled out
    too (``fallback_against``), or no arm with a reason."""
    reason = reason or ("no eligible arm" if candidates else "no active arm")
    fb = next((i for i, c in enumerate(candidates) if c.arm.id == spec.fallback_arm), None)
    if fb is not None:
        against = fallback_against(spec, candidates[fb].spec, context, excluded, now, arms)
        if not against:
            return Choice(0, 1.0, (1.0,), (fb,), why, reason=f"fallback: {reason}", fallback=True, explanation=_FALLBACK)
        why[candidates[fb].arm.id] = against
        reason = f"{reason}; {fallback_not_eligible(candidates[fb].arm.id, against)}"
    return Choice(None, 0.0, (), (), why, reason=reason)


def _matches(when: dict[str, float | str | bool], features: Sequence[Feature]) -> bool:
    values: dict[str, float | str] = {}
    for f in features:
        _, name, value = f
        values[feature_key(f)] = value
        values.setdefault(name, value)
    for k, want in when.items():
        have = values.get(k)
        if isinstance(want, bool):
            want = "true" if want else "false"
        if have is None or (str(have) != str(want) and not (isinstance(have, float) and isinstance(want, int | float) and have == want)):
            return False
    return True


def serve_holdout(
    holdout: HoldoutSpec,
    spec: PlacementSpec,
    candidates: Sequence[Candidate],
    features: Sequence[Feature],
    uniform: Callable[[], float],
    now: float = 0.0,
    history: list[contact.Impression] | None = None,
    context: Mapping[str, Value] = NO_CONTEXT,
    excluded: frozenset[str] = NOTHING_EXCLUDED,
    arms: ArmContexts = NO_ARM_CONTEXT,
) -> Choice:
    """The control group's policy, under the same constraints as the bandit's."""
    ok, why = eligibility(spec, candidates, history or [], now, context=context, excluded=excluded, arms=arms)
    if not ok:
        return _nothing(spec, candidates, why, "", now, context, excluded, arms)
    if holdout.policy == "uniform":
        pmf = np.full(len(ok), 1.0 / len(ok))
        i = exploration.draw(pmf, uniform())
        return Choice(i, float(pmf[i]), tuple(float(p) for p in pmf), tuple(ok), why, explanation=_HOLDOUT["uniform"])
    target = holdout.arm
    for rule in holdout.rules:
        if _matches(rule.when, features):
            target = rule.arm
            break
    ids = [candidates[i].arm.id for i in ok]
    if target is None or target not in ids:
        reason = f"holdout arm {target} not eligible" if target else "no rule matched"
        return _nothing(spec, candidates, why, reason, now, context, excluded, arms)
    j = ids.index(target)
    pmf_t = tuple(1.0 if k == j else 0.0 for k in range(len(ok)))
    return Choice(j, 1.0, pmf_t, tuple(ok), why, explanation=_HOLDOUT[holdout.policy])


def decide(
    model: CbModel,
    spec: PlacementSpec,
    candidates: Sequence[Candidate],
    shared: str,
    uniform: Callable[[], float],
    now: float = 0.0,
    history: list[contact.Impression] | None = None,
    reward_scale: float = 1.0,
    budgeted: bool = True,
    context: Mapping[str, Value] = NO_CONTEXT,
    excluded: frozenset[str] = NOTHING_EXCLUDED,
    arms: ArmContexts = NO_ARM_CONTEXT,
    learned: int | None = None,
) -> Choice:
    """Run the whole pipeline for one request (``budgeted=False``: no candidate has a budget).
    ``learned``: the examples exploration counts on (default the model's; a model group's
    member counts its own)."""
    t = model.learned if learned is None else learned
    history = history or []
    ok, why = eligibility(spec, candidates, history, now, budgeted, context, excluded, arms)
    if not ok:
        return _nothing(spec, candidates, why, "", now, context, excluded, arms)
    eligible = [candidates[i] for i in ok]
    values = model.expected_rewards(shared, [c.arm.line for c in eligible])
    # A model poisoned by extreme inputs: score as untrained, do not fail. (A finite sum means
    # every value is finite; one sum costs a third of isfinite + all on 20 arms, measured.)
    if not math.isfinite(float(values.sum())):
        values = np.where(np.isfinite(values), values, 0.0)
    expected = tuple(values.tolist())  # recorded for Explain; a 20-arm tolist is about a microsecond
    prices = np.zeros(len(eligible))
    budgeted = budgeted and any(c.accounts for c in eligible)
    raw = values.copy() if budgeted else values
    adjusted = budgeted or not spec.unconstrained
    penalties = np.zeros(len(eligible)) if adjusted and spec.fatigue is not None else None
    for j, c in enumerate(eligible if adjusted else ()):
        a = c.spec
        values[j] += a.business_value
        if c.accounts:
            for acc in c.accounts:
                if acc.pacer is not None and c.expected_cost > 0:
                    acc.pacer.observe_value(max(raw[j] + a.business_value, 0.0) / c.expected_cost)
            prices[j] = Ledger.price(c.accounts, now) * c.expected_cost
        if spec.fatigue is not None:
            pen = contact.penalty(spec.fatigue, history, a.id, a.campaign, now)
            if spec.fatigue.kind == "scale":  # lowers the value whatever its sign
                pen = abs(values[j]) * -math.expm1(-pen)
            values[j] -= pen
            assert penalties is not None
            penalties[j] = pen
    paced = budgeted and bool(np.any(prices > 0))
    if paced:
        values = np.append(values - prices, 0.0)  # "no offer": what a priced-out budget buys instead
    scale = exploration_scale(max(reward_scale, 1.0), t, spec.reward_range, spec.max_abs_reward)
    pmf = explore(values, spec.exploration, t, scale)
    i = exploration.draw(pmf, uniform())
    pmf_t = tuple(pmf.tolist())
    explanation = Explanation(
        spec.exploration.algorithm,
        exploration_parameter(spec.exploration, t),
        scale,
        expected,
        tuple(c.spec.business_value for c in eligible) if adjusted and any(c.spec.business_value for c in eligible) else (),
        tuple(prices.tolist()) if paced else (),
        tuple(penalties.tolist()) if penalties is not None and penalties.any() else (),
    )
    if paced and i == len(eligible):
        return Choice(None, pmf_t[i], pmf_t, tuple(ok), why, reason=NO_OFFER, explanation=explanation)
    return Choice(i, pmf_t[i], pmf_t, tuple(ok), why, explanation=explanation)
