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


def history_features(
    history: Iterable[Impression], arms: Sequence[str], windows: Sequence[tuple[str, float]], now: float
) -> dict[str, tuple[Feature, ...]]:
    """Each arm's history features, by arm id, from the customer's impressions (oldest first)."""
    n = len(windows)
    longest = windows[-1][1] if windows else 0.0  # the history kept may reach further (contact policies)
    counts = {a: [0] * (2 * n) for a in arms}
    last_seen: dict[str, float] = {}
    last_taken: dict[str, float] = {}
    for imp in history:
        c = counts.get(imp.arm)
        if c is None:
            continue
        age = now - imp.at
        if age >= longest:
            continue
        taken = imp.responded is True
        for k, (_, span) in enumerate(windows):
            if age < span:
                c[2 * k] += 1
                c[2 * k + 1] += taken
        last_seen[imp.arm] = max(imp.at, last_seen.get(imp.arm, imp.at))
        if taken:
            last_taken[imp.arm] = max(imp.at, last_taken.get(imp.arm, imp.at))
    labels = names(windows)
    out: dict[str, tuple[Feature, ...]] = {}
    for a in arms:
        feats: list[Feature] = [(NAMESPACE, labels[j], float(v)) for j, v in enumerate(counts[a])]
        if a in last_seen:
            feats.append((NAMESPACE, "days_since_impression", round((now - last_seen[a]) / DAY, 4)))
        if a in last_taken:
            feats.append((NAMESPACE, "days_since_accept", round((now - last_taken[a]) / DAY, 4)))
        out[a] = tuple(feats)
    return out
