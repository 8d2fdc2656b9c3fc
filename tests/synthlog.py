"""A synthetic decision log written through the real store, for stats and report tests."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
from sqlalchemy import inspect, text

from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.features import feature
from nextbest.bandit.spec import CampaignSpec, PlacementSpec
from nextbest.storage.base import Close, PlacementRecord
from nextbest.storage.sql import open_store

T0 = 1_760_054_400.0  # 2025-10-10T00:00:00Z, a UTC midnight in the past (reward windows are over)
ARMS = ("data_5gb", "voice_300", "combo_10gb")
RATES = {"holdout": 0.10, "A": 0.20, "B": 0.15}
SHARES = {"holdout": 0.1, "A": 0.45, "B": 0.45}


def write_log(
    url: str,
    placement: str = "app_home_banner",
    n: int = 3000,
    hours: float = 48.0,
    seed: int = 7,
    rates: Mapping[str, float] = RATES,
    shares: Mapping[str, float] = SHARES,
    arms: Sequence[str] = ARMS,
    variants: bool = True,
    open_tail: int = 20,
    not_shown: int = 5,
) -> None:
    """``n`` decisions spread over ``hours`` from T0: variants by share, 0/1 rewards by rate;
    the first arm costs budget (campaign xmas with an even schedule); the last ``open_tail``
    decisions are still open, the last ``not_shown`` of them deferred and not activated (when
    the database records activation), and every 500th decision had nothing to offer."""
    rng = np.random.default_rng(seed)
    store = open_store(url)
    spec = PlacementSpec.model_validate({"id": placement, "arms": [{"id": a} for a in arms]})
    camp = CampaignSpec.model_validate(
        {"id": "xmas", "budget": {"total": 100.0, "daily": 60.0, "start": T0, "end": T0 + hours * 3600 * 1.25}}
    )
    store.save_placements([PlacementRecord(spec, {a: 1 for a in arms})], [(placement, a, 1, {}) for a in arms], [camp])
    names = list(shares)
    which = rng.choice(len(names), size=n, p=np.array([shares[v] for v in names]))
    times = np.sort(T0 + rng.uniform(0, hours * 3600, size=n))
    decisions, closes, tags = [], [], []
    for i in range(n):
        v = names[int(which[i])]
        pmf = np.full(len(arms), 0.1 / (len(arms) - 1))
        pmf[i % len(arms)] = 0.9
        if v == "holdout":
            pmf = np.full(len(arms), 1.0 / len(arms))
        chosen: int | None = int(rng.choice(len(arms), p=pmf))
        if i % 500 == 499:
            chosen = None  # nothing eligible
        budgets = (("campaign:xmas", "total"), ("campaign:xmas", time.strftime("%Y-%m-%d", time.gmtime(times[i])))) if chosen == 0 else ()
        eid = f"e{i:06d}"
        decisions.append(
            LoggedDecision(
                eid,
                placement,
                f"c{i % 97}",
                float(times[i]),
                (feature("customer", "segment", "youth"),),
                tuple((a, 1) for a in arms),
                tuple(float(p) for p in pmf),
                chosen,
                float(pmf[chosen]) if chosen is not None else 1.0,
                1,
                float(times[i]) + 600,
                Outcome.OPEN if chosen is not None else Outcome.NO_ARM,
                cost=0.01 if chosen == 0 else 0.0,
                reward_cost=0.5 if chosen == 0 else 0.0,
                budgets=budgets,
            )
        )
        tags.append(v)
        if chosen is not None and i < n - open_tail:
            won = bool(rng.random() < rates[v])
            closes.append(_close(eid, won, float(times[i]), 0.5 if chosen == 0 else 0.0, budgets))
    store.write(decisions, closes)
    with store.engine.begin() as c:
        columns = {col["name"] for col in inspect(c).get_columns("decisions")}
        if variants:
            if "variant" not in columns:
                c.execute(text("ALTER TABLE decisions ADD COLUMN variant VARCHAR(64)"))
            c.execute(
                text("UPDATE decisions SET variant = :v WHERE event_id = :e"),
                [{"v": v, "e": d.event_id} for v, d in zip(tags, decisions, strict=True)],
            )
        if "activated" in columns and not_shown:
            c.execute(
                text("UPDATE decisions SET activated = :f WHERE event_id = :e"),
                [{"f": False, "e": d.event_id} for d in decisions[-not_shown:]],
            )
    store.close()


def _close(eid: str, won: bool, at: float, reward_cost: float, budgets: tuple[tuple[str, str], ...]) -> Close:
    return Close(eid, Outcome.REWARD if won else Outcome.DEFAULT, 1.0 if won else 0.0, at + 60, reward_cost, budgets)
