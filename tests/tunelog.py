"""A log where a better learning setting exists, for the tuning tests: the best arm depends on
the customer's segment *and* channel together (an exclusive or), which the default shared × arm
cross (-q UA) cannot represent and a cubic cross (--cubic UUA) can. Logged at random."""

from __future__ import annotations

import numpy as np

from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.features import feature
from nextbest.bandit.offline.replay_log import ReplayLog
from nextbest.bandit.spec import PlacementSpec
from nextbest.config.plans import plan
from nextbest.storage.base import Close
from nextbest.storage.sql import open_store

PLACEMENT = "offers"
ARMS = ("a", "b", "c")
ARM_FEATURES = {"a": {"category": "data"}, "b": {"category": "voice"}, "c": {"category": "tv"}}
T0 = 1.7e9


def truth(segment: int, channel: int) -> np.ndarray:
    """Acceptance probability of each arm: a when segment == channel, b otherwise, c always 0.4."""
    same = segment == channel
    return np.array([0.7 if same else 0.15, 0.15 if same else 0.7, 0.4])


def _events(n: int, seed: int, flat: float | None = None) -> list[tuple[int, int, int, float, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s, ch = int(rng.integers(2)), int(rng.integers(2))
        c = int(rng.integers(3))
        r = float(rng.random() < (truth(s, ch)[c] if flat is None else flat))
        out.append((s, ch, c, r, float(rng.uniform(5, 50))))
    return out


def _features(s: int, ch: int, arpu: float) -> tuple[tuple[str, str, float | str], ...]:
    return (feature("customer", "segment", f"s{s}"), feature("customer", "channel", f"ch{ch}"), feature("customer", "arpu", round(arpu, 2)))


def replay_log(n: int, seed: int = 3) -> ReplayLog:
    """``n`` closed decisions in memory."""
    arms = tuple((a, 1) for a in ARMS)
    pmf = (1 / 3, 1 / 3, 1 / 3)
    ev = _events(n, seed)
    return ReplayLog.build(
        [f"ev{i:06d}" for i in range(n)],
        [T0 + i for i in range(n)],
        [e[3] for e in ev],
        [1 / 3] * n,
        [e[2] for e in ev],
        [arms] * n,
        [pmf] * n,
        features=[_features(s, ch, arpu) for s, ch, _, _, arpu in ev],
        arm_features={(a, 1): tuple(feature("", k, v) for k, v in ARM_FEATURES[a].items()) for a in ARMS},
    )


def write_log(path: str, n: int, seed: int = 3, vw_args: str = "", flat: float | None = None) -> None:
    """The placement (its arms with features, ``vw_args``) and ``n`` closed decisions, through
    the store; with ``flat`` every offer is accepted with that probability (nothing to learn)."""
    store = open_store(f"sqlite:///{path}")
    spec = PlacementSpec.model_validate(
        {"id": PLACEMENT, "vw_args": vw_args, "arms": [{"id": a, "features": ARM_FEATURES[a]} for a in ARMS]}
    )
    p = plan({}, [spec], 1)
    store.save_placements(p.records, p.new_arm_versions)
    decisions, closes = [], []
    for i, (s, ch, c, r, arpu) in enumerate(_events(n, seed, flat)):
        ts = T0 + i * 2.0
        decisions.append(
            LoggedDecision(
                event_id=f"ev{i:06d}",
                placement=PLACEMENT,
                customer_id=f"c{i % 300}",
                timestamp=ts,
                features=_features(s, ch, arpu),
                arms=tuple((a, 1) for a in ARMS),
                pmf=(1 / 3, 1 / 3, 1 / 3),
                chosen=c,
                probability=1 / 3,
                model_version=i,
                deadline=ts + 600,
                outcome=Outcome.OPEN,
            )
        )
        closes.append(Close(f"ev{i:06d}", Outcome.REWARD if r else Outcome.DEFAULT, r, ts + 5))
    store.write(decisions, closes)
    store.close()
