"""What a Choose adds to its request's features (issue #30): the customer's stored profile,
merged into the shared features, and the customer's interaction history of each arm, appended
to each arm's VW line and read by rules as the arm's own features; and the context logged with
the decision (the profile's as_of and names, each logged arm's history values); and how a
Choose reads and records the customer's shared contact history.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import is_not

from nextbest.bandit.contact import Impression
from nextbest.bandit.decider import NO_ARM_CONTEXT, ArmContexts, ArmView, Candidate, context_of
from nextbest.bandit.decision_log import DecisionContext, LoggedDecision
from nextbest.bandit.features import SHARED_NAMESPACE, Feature, feature_key, shared_tokens, with_arm_features
from nextbest.bandit.history import history_features, never_seen
from nextbest.bandit.spec import PlacementSpec, window_label
from nextbest.engine.profiles import CachedProfile
from nextbest.storage.base import ContactRow, RecentImpression


@dataclass(frozen=True, slots=True)
class ChooseContext:
    """What a Choose adds to its request: the profile used (its as_of and the names it gave)."""

    profile_as_of: float | None = None
    profile_keys: tuple[str, ...] = ()
    shared: str | None = None  # the shared VW line of the merged features (one slot), made from the profile's text


NO_ADDITIONS = ChooseContext()


def with_profile(features: Sequence[Feature], cached: CachedProfile | None) -> tuple[tuple[Feature, ...], tuple[str, ...]]:
    """The request's features and the stored profile's, the request winning where both name a
    feature; and the names (``namespace.name``) that came from the profile."""
    if cached is None or not cached.keys:
        return tuple(features), ()
    own = cached.key_set
    if not any((f"{ns}.{name}" if ns else name) in own for ns, name, _ in features):  # feature_key, inlined
        return (*features, *cached.profile.features), cached.keys  # most requests: nothing in common
    asked = {feature_key(f) for f in features}
    added = [(f, k) for f, k in zip(cached.profile.features, cached.keys, strict=True) if k not in asked]
    return (*features, *(f for f, _ in added)), tuple(k for _, k in added)


def merged(spec: PlacementSpec, asked: Sequence[Feature], profile: CachedProfile | None) -> tuple[Sequence[Feature], ChooseContext]:
    """The request's features with the profile's, and what the Choose logs of it. When the
    whole profile is used on a one-slot placement, the shared VW line is made from the
    profile's cached text (not from its features again)."""
    features, keys = with_profile(asked, profile)
    if profile is None:
        return features, NO_ADDITIONS
    line = None
    if spec.slots == 1 and profile.keys and len(keys) == len(profile.keys):  # all of it: its VW text as read
        own = shared_tokens(asked)
        line = f"shared |{SHARED_NAMESPACE} {own} {profile.text}" if own else f"shared |{SHARED_NAMESPACE} {profile.text}"
    return features, ChooseContext(profile.profile.as_of, keys, line)


def arm_history(
    spec: PlacementSpec, history: list[Impression], candidates: list[Candidate], now: float
) -> tuple[list[Candidate], dict[str, tuple[Feature, ...]], ArmContexts]:
    """This customer's history of each offer, as of this slot (earlier slots included): the
    candidates with it in their VW lines, each arm's history features by arm id, and what
    rules read of them per arm."""
    windows = _windows(tuple(spec.context.history))
    never = never_seen(windows)  # an arm not seen keeps its cached line and candidate
    if not history:  # a customer not seen lately: every arm unseen, the candidates as they are
        by_arm = dict.fromkeys([c.arm.id for c in candidates], never)
    else:
        by_arm = history_features(history, [c.arm.id for c in candidates], windows, now)
        if any(map(is_not, by_arm.values(), repeat(never))):  # else the shared candidates as they are
            candidates = [c if (fs := by_arm[c.arm.id]) is never else _with_history(c, fs) for c in candidates]
    arm_rules: ArmContexts = NO_ARM_CONTEXT
    if spec.has_rules:
        unseen = context_of(never)
        arm_rules = {a: unseen if fs is never else context_of(fs) for a, fs in by_arm.items()}
    return candidates, by_arm, arm_rules


@functools.lru_cache(maxsize=256)
def _windows(spans: tuple[float, ...]) -> tuple[tuple[str, float], ...]:
    """ContextSpec.windows, built once per set of windows (not per Choose)."""
    return tuple((window_label(x), x) for x in spans)


def _with_history(c: Candidate, history: tuple[Feature, ...]) -> Candidate:
    """The candidate with its history in its VW line. VW drops zero-valued features when it
    parses an example (the same predictions and updates, checked bit for bit), so only non-zero
    values are written, and an arm the customer never saw keeps its cached line and candidate:
    most arms of most customers (the bench put a fifth of a 20-arm Choose in rebuilding lines)."""
    shown = [f for f in history if f[2] != 0.0]
    if not shown:
        return c
    return Candidate(ArmView(c.arm.id, c.arm.version, with_arm_features(c.arm.line, shown), c.arm.spec), c.accounts, c.acceptance)


def logged_context(
    added: ChooseContext, by_arm: Mapping[str, tuple[Feature, ...]], candidates: Sequence[Candidate], eligible: Sequence[int]
) -> DecisionContext | None:
    """The decision's context as used, for the log: the profile's as_of and names, and the
    history features of each logged (eligible) arm in the logged order."""
    if added is NO_ADDITIONS and not by_arm:
        return None
    if not by_arm:
        arms: tuple[tuple[Feature, ...], ...] = ()
    elif len(eligible) == len(by_arm) == len(candidates):  # every arm, in the candidates' order
        arms = tuple(by_arm.values())
    else:
        arms = tuple(by_arm[candidates[i].arm.id] for i in eligible)
    return DecisionContext(added.profile_as_of, added.profile_keys, arms)


def caps(spec: PlacementSpec) -> bool:
    """Whether the placement's contact policies, cool-down or fatigue read the history: on a
    shared history its Chooses take the customer's lock, which makes them exact across servers."""
    return bool(spec.contact_policies or spec.cooldown or spec.fatigue is not None)


def retrieved(f: asyncio.Future[list[RecentImpression]]) -> None:
    """A read whose Choose stopped waiting (its placement changed) must not log an unread error."""
    if not f.cancelled():
        f.exception()


def impressions_made(customer_id: str, decisions: Sequence[LoggedDecision]) -> list[ContactRow]:
    """The impressions a Choose made now (deferred decisions count when activated)."""
    return [
        ContactRow(customer_id, d.timestamp, d.placement, d.arm_id, d.event_id, d.slot)
        for d in decisions
        if d.arm_id is not None and d.activated
    ]
