"""Interaction-history features: what this customer saw and took of each offer (issue #30).

Pega CDH calls them interaction-history summaries: per action, counts of impressions and
positive outcomes within windows and the days since the last of each, fed to the adaptive
model as predictors. Here they are arm-level features (namespace ``history``) that go into each
arm's VW action line and that eligibility rules read per arm (``history.accepts_30d eq 0``: not
if they took it in the last 30 days). They are computed from the contact history the decider
already has for the customer (every placement's impressions, an offer known by its arm id,
bandit/contact.py), in one pass over it: never a scan of the decision log per Choose.

An accept is an impression whose decision got a positive reward (``Impression.responded``); its
day is the impression's. ``days_since_*`` is absent when there is none within the longest
window: a rule on it is then unknown (fails closed), and the model sees no such feature.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from nextbest.bandit.contact import Impression
from nextbest.bandit.features import Feature

NAMESPACE = "history"
DAY = 86400.0


def names(windows: Sequence[tuple[str, float]]) -> list[str]:
    """Every feature name a placement with these windows gives each arm, in order."""
    out = []
    for label, _ in windows:
        out += [f"impressions_{label}", f"accepts_{label}"]
    return [*out, "days_since_impression", "days_since_accept"]


_NEVER: dict[tuple[tuple[str, float], ...], tuple[Feature, ...]] = {}  # windows -> an unseen arm's features


def never_seen(windows: Sequence[tuple[str, float]]) -> tuple[Feature, ...]:
    """The features of an arm the customer did not see within the longest window: zero counts,
    no days-since. One tuple per set of windows, shared by every such arm of every Choose
    (``history_features`` returns it itself: ``is`` tells an unseen arm)."""
    key = tuple(windows)
    never = _NEVER.get(key)
    if never is None:
        never = tuple((NAMESPACE, label, 0.0) for label in names(windows)[: 2 * len(windows)])
        if len(_NEVER) < 1000:
            _NEVER[key] = never
    return never


def history_features(
    history: Iterable[Impression], arms: Sequence[str], windows: Sequence[tuple[str, float]], now: float
) -> dict[str, tuple[Feature, ...]]:
    """Each arm's history features, by arm id, from the customer's impressions (oldest first);
    an arm not seen within the longest window gets ``never_seen(windows)`` itself."""
    never = never_seen(windows)
    out = dict.fromkeys(arms, never)
    n = len(windows)
    longest = windows[-1][1] if windows else 0.0  # the history kept may reach further (contact policies)
    counts: dict[str, list[int]] = {}
    last_seen: dict[str, float] = {}
    last_taken: dict[str, float] = {}
    for imp in history:
        a = imp.arm
        if a not in out:
            continue
        age = now - imp.at
        if age >= longest:
            continue
        c = counts.get(a)
        if c is None:
            c = counts[a] = [0] * (2 * n)
        taken = imp.responded is True
        for k, (_, span) in enumerate(windows):
            if age < span:
                c[2 * k] += 1
                c[2 * k + 1] += taken
        if imp.at >= last_seen.get(a, imp.at):
            last_seen[a] = imp.at
        if taken and imp.at >= last_taken.get(a, imp.at):
            last_taken[a] = imp.at
    for a, c in counts.items():
        feats: list[Feature] = [(NAMESPACE, f[1], float(v)) for f, v in zip(never, c, strict=True)]
        feats.append((NAMESPACE, "days_since_impression", round((now - last_seen[a]) / DAY, 4)))
        if a in last_taken:
            feats.append((NAMESPACE, "days_since_accept", round((now - last_taken[a]) / DAY, 4)))
        out[a] = tuple(feats)
    return out
