"""A generated placement log for the streaming replay tests: slots, pacing's "no offer" events,
open and no-arm decisions, three arms with features, written through the store."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.features import feature
from nextbest.bandit.spec import PlacementSpec
from nextbest.config.plans import plan
from nextbest.storage.base import Close
from nextbest.storage.sql import open_store

PLACEMENT = "offers"
ARMS = {"a": {"category": "data", "price": 4.99}, "b": {"category": "voice", "price": 2.5}, "c": {"category": "tv", "price": 9.0}}
SEGMENTS = ("gold", "silver", "bronze")
TRUE_P = np.array([[0.8, 0.2, 0.1], [0.7, 0.3, 0.2], [0.6, 0.1, 0.3]])
LOGGING = np.array([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.1, 0.6, 0.3]])
NO_OFFER = 0.2  # pacing's "no offer" probability, where it paced


def decisions(n: int, seed: int = 11) -> tuple[list[LoggedDecision], list[Close]]:
    """``n`` events: every 7th paced (a PMF with "no offer", which it drew about a fifth of the
    time), every 5th a two-slot event (slot 1 among the arms slot 0 did not take), every 53rd
    without an eligible arm, the last 20 still open."""
    rng = np.random.default_rng(seed)
    out: list[LoggedDecision] = []
    closes: list[Close] = []
    t0 = 1.7e9
    for i in range(n):
        s = int(rng.integers(3))
        ts = t0 + i * 2.0
        base = LoggedDecision(
            event_id=f"ev{i:06d}",
            placement=PLACEMENT,
            customer_id=f"c{i % 97}",
            timestamp=ts,
            features=(feature("customer", "segment", SEGMENTS[s]), feature("customer", "arpu", round(float(rng.uniform(5, 50)), 2))),
            arms=(("a", 1), ("b", 1), ("c", 1)),
            pmf=tuple(float(x) for x in LOGGING[s]),
            chosen=None,
            probability=0.0,
            model_version=i,
            deadline=ts + 600.0,
        )
        if i % 53 == 0:
            out.append(replace(base, arms=(), pmf=(), outcome=Outcome.NO_ARM))
            continue
        pmf = np.array(base.pmf)
        if i % 7 == 0:
            pmf = np.append(pmf * (1 - NO_OFFER), NO_OFFER)
        c = int(rng.choice(len(pmf), p=pmf / pmf.sum()))
        closed = i < n - 20
        if c == 3:  # pacing made no offer
            out.append(replace(base, pmf=tuple(float(x) for x in pmf), probability=float(pmf[3]), outcome=Outcome.NO_ARM, deadline=ts))
            continue
        r = float(rng.random() < TRUE_P[s, c])
        out.append(replace(base, pmf=tuple(float(x) for x in pmf), chosen=c, probability=float(pmf[c])))
        if closed:
            closes.append(Close(base.event_id, Outcome.REWARD if r else Outcome.DEFAULT, r, ts + 5.0))
        if i % 5 == 0:  # a second slot among the other two arms, evenly
            rest = [j for j in range(3) if j != c]
            arms2 = tuple(base.arms[j] for j in rest)
            c2 = int(rng.integers(2))
            r2 = float(rng.random() < TRUE_P[s, rest[c2]])
            second = replace(
                base,
                arms=arms2,
                pmf=(0.5, 0.5),
                chosen=c2,
                probability=0.5,
                slot=1,
                features=(*base.features, feature("slot", "index", 1.0)),
            )
            out.append(second)
            if closed:
                closes.append(Close(base.event_id, Outcome.REWARD if r2 else Outcome.DEFAULT, r2, ts + 5.0, slot=1))
    return out, closes


def write(url: str, n: int, seed: int = 11) -> None:
    """The log of ``decisions(n, seed)`` in the database at ``url``, arms and placement included."""
    store = open_store(url)
    try:
        spec = PlacementSpec.model_validate({"id": PLACEMENT, "slots": 2, "arms": [{"id": k, "features": v} for k, v in ARMS.items()]})
        p = plan({}, [spec], 1)
        store.save_placements(p.records, p.new_arm_versions)
        ds, closes = decisions(n, seed)
        store.write(ds, [])
        store.write([], closes)
    finally:
        store.close()
