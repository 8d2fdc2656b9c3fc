"""A simulated telecom customer base whose true response model is known.

Because the simulator knows every offer's acceptance probability at every visit, it can say
what uniform random, the best fixed offer and an oracle would have earned on the very same
customer stream, without running them. The stream of visits (who comes, when, through which
channel) depends only on the seed, never on the policy; responses use one uniform draw per
visit, so two policies are compared under common random numbers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from nextbest.bandit.sim.scenario import Condition, Dist, Effect, Scenario, Weights
from nextbest.bandit.spec import ArmSpec, PlacementSpec

Vector = NDArray[np.float64]
FeatureDict = dict[str, dict[str, float | str]]
# What the channels send to Choose (``nextbest simulate --context``): ``full``, every customer
# feature and the simulator's own impression counts (``history.seen_<offer>``, ``offers_seen``);
# ``channel``, only the channel (and the customer id), as an IVR or a USSD gateway can;
# ``channel+history``, the same on placements that add the service's interaction-history features;
# ``profile``, on placements that read the stored profile; ``profile+history``, both. The simulator's own impression counts are what a
# channel does not have: they are sent in ``full`` only.
CONTEXTS = ("full", "channel", "channel+history", "profile", "profile+history")
_CHUNK = 1024  # visits are drawn in chunks so that a shorter run is a prefix of a longer one


def _draw(spec: float | Dist, rng: np.random.Generator, n: int) -> Vector:
    if not isinstance(spec, Dist):
        return np.full(n, float(spec))
    if spec.dist == "lognormal":
        assert spec.median is not None and spec.sigma is not None
        x = spec.median * np.exp(rng.normal(0.0, spec.sigma, n))
    elif spec.dist == "normal":
        assert spec.mean is not None and spec.sd is not None
        x = rng.normal(spec.mean, spec.sd, n)
    elif spec.dist == "uniform":
        assert spec.low is not None and spec.high is not None
        x = rng.uniform(spec.low, spec.high, n)
    else:
        assert spec.value is not None
        x = np.full(n, spec.value)
    lo = -np.inf if spec.min is None else spec.min
    hi = np.inf if spec.max is None else spec.max
    return np.asarray(np.clip(x, lo, hi), dtype=np.float64)


def _pick(spec: Weights | str, rng: np.random.Generator, n: int) -> list[str]:
    if isinstance(spec, str):
        return [spec] * n
    names = list(spec)
    p = np.array([spec[k] for k in names], dtype=np.float64)
    return [names[i] for i in rng.choice(len(names), size=n, p=p / p.sum())]


def _holds(when: Condition, values: dict[str, float | str]) -> bool:
    for feat, want in when.items():
        have = values[feat]
        if (have not in want) if isinstance(want, list) else (have != want):
            return False
    return True


def _effect(e: Effect, values: dict[str, float | str]) -> float:
    if not _holds(e.when, values):
        return 0.0
    out = e.logit
    if e.of is not None:
        x = e.slope * (float(values[e.of]) - e.center)
        out += x if e.cap is None else max(-e.cap, min(e.cap, x))
    return out


@dataclass(frozen=True, slots=True)
class Visit:
    """One customer visit to one placement, with the truth about every offer it can show."""

    index: int
    day: float
    customer: int
    channel: str
    placement: str
    arms: tuple[str, ...]
    features: FeatureDict  # what the channel sends to Choose
    accept: Vector  # true acceptance probability of each arm now
    reward: Vector  # expected reward of each arm now
    revenue: Vector  # expected revenue of each arm now
    u: float  # the uniform that decides the response, whatever arm is shown


@dataclass(frozen=True, slots=True)
class Outcome:
    accepted: bool
    reward: float
    revenue: float


class TelecomSim:
    """Customers, visits and responses of one scenario under one seed."""

    def __init__(self, scenario: Scenario, seed: int = 0, reward: str | None = None) -> None:
        self.scenario = scenario
        self.reward_kind = reward or scenario.response.reward
        if self.reward_kind not in ("margin", "revenue", "acceptance"):
            raise ValueError(f"reward must be margin, revenue or acceptance, not {reward!r}")
        pop_ss, visit_ss, resp_ss = np.random.SeedSequence(seed).spawn(3)
        self._visit_rng = np.random.default_rng(visit_ss)
        self._resp_rng = np.random.default_rng(resp_ss)
        self.offer_ids = [o.id for o in scenario.offers]
        self._offer_index = {o: i for i, o in enumerate(self.offer_ids)}
        self._price = np.array([o.price for o in scenario.offers])
        value = {"margin": [o.margin for o in scenario.offers], "revenue": list(self._price), "acceptance": [1.0] * len(self.offer_ids)}
        self._value = np.array(value[self.reward_kind], dtype=np.float64)
        self._channels = list(scenario.channels)
        self._arms = {ch: np.array([self._offer_index[o] for o in c.offers]) for ch, c in scenario.channels.items()}
        self._build_population(np.random.default_rng(pop_ss))
        self._history: dict[int, deque[tuple[float, int]]] = {}
        self._pending: Iterator[tuple[int, int, float]] = iter(())
        self._next = 0

    # -- the customer base ------------------------------------------------------------------

    def _build_population(self, rng: np.random.Generator) -> None:
        sc = self.scenario
        segs = sc.customers.segments
        n = sc.customers.count
        share = np.array([s.share for s in segs])
        self.segment = rng.choice(len(segs), size=n, p=share / share.sum())
        self.numeric: dict[str, Vector] = {k: np.zeros(n) for k in segs[0].numeric}
        self.categorical: dict[str, list[str]] = {k: [""] * n for k in segs[0].categorical}
        self.plan = [""] * n
        self.preferred = [""] * n
        self.visit_rate = np.zeros(n)
        self.recharge_every = np.full(n, np.inf)
        self.recharge_phase = np.zeros(n)
        self.last_purchase = np.full(n, -np.inf)
        for si, s in enumerate(segs):
            idx = np.flatnonzero(self.segment == si)
            m = len(idx)
            for k, spec in s.numeric.items():
                self.numeric[k][idx] = np.round(_draw(spec, rng, m), 2)
            for k, cat in s.categorical.items():
                for i, v in zip(idx, _pick(cat, rng, m), strict=True):
                    self.categorical[k][i] = v
            for i, v in zip(idx, _pick(s.channels, rng, m), strict=True):
                self.preferred[i] = v
                self.plan[i] = s.plan
            self.visit_rate[idx] = np.maximum(_draw(s.visits_per_week, rng, m), 1e-6)
            if s.recharge_every_days is not None:
                every = np.maximum(_draw(s.recharge_every_days, rng, m), 1.0)
                self.recharge_every[idx] = every
                self.recharge_phase[idx] = rng.uniform(0, every)
        self._seg_channels = [
            (np.array([self._channels.index(c) for c in s.channels]), np.array(list(s.channels.values()), dtype=np.float64)) for s in segs
        ]

    def days_since_recharge(self, c: int, day: float) -> float:
        """Prepaid top-ups come every cycle; a purchase counts as a top-up. Postpaid: 0."""
        every = self.recharge_every[c]
        if not math.isfinite(every):
            return 0.0
        natural = (day + self.recharge_phase[c]) % every
        return float(min(natural, day - self.last_purchase[c]))

    def customer_id(self, c: int) -> str:
        """The id the simulated channels send for customer c (and the profile store keys on)."""
        return f"cust{c}"

    def profile(self, c: int, day: float = 0.0) -> dict[str, float | str]:
        """Customer c's features as a data warehouse holds them on a day: every feature of
        :meth:`values` but the visit's channel. ``days_since_recharge`` and its band (``lapse``)
        change every day; the rest are fixed for the customer's life."""
        v = self.values(c, day, "")
        del v["channel"]
        return v

    def values(self, c: int, day: float, channel: str) -> dict[str, float | str]:
        """Every feature of customer c at a visit, as the response model reads them."""
        v: dict[str, float | str] = {"plan": self.plan[c], "preferred_channel": self.preferred[c], "channel": channel}
        for k, arr in self.numeric.items():
            v[k] = float(arr[c])
        for k, lst in self.categorical.items():
            v[k] = lst[c]
        v["days_since_recharge"] = round(self.days_since_recharge(c, day), 1)
        for name, band in self.scenario.bands.items():
            v[name] = band.labels[int(np.searchsorted(band.edges, float(v[band.of]), side="right"))]
        return v

    # -- the visit stream -------------------------------------------------------------------

    def _chunks(self) -> Iterator[tuple[int, int, float]]:
        sc, rng = self.scenario, self._visit_rng
        p = self.visit_rate / self.visit_rate.sum()
        share = sc.customers.preferred_channel_share
        while True:
            cust = rng.choice(len(p), size=_CHUNK, p=p)
            use_pref = rng.random(_CHUNK) < share
            u_ch = rng.random(_CHUNK)
            u_resp = self._resp_rng.random(_CHUNK)
            for c, pref, u, ur in zip(cust, use_pref, u_ch, u_resp, strict=True):
                c = int(c)
                if pref:
                    ch = self._channels.index(self.preferred[c])
                else:
                    ids, w = self._seg_channels[int(self.segment[c])]
                    cdf = np.cumsum(w) / w.sum()
                    ch = int(ids[min(int(np.searchsorted(cdf, u, side="right")), len(ids) - 1)])
                yield c, ch, float(ur)

    def next_visit(self) -> Visit:
        """The next visit of the stream, with the state (fatigue, top-ups) as of now."""
        if self._next == 0:
            self._pending = self._chunks()
        c, ch_i, u = next(self._pending)
        i, self._next = self._next, self._next + 1
        day = i / self.scenario.visits_per_day
        channel = self._channels[ch_i]
        arms = self._arms[channel]
        values = self.values(c, day, channel)
        seen = self._seen(c, day)
        p = self.acceptance(values, arms, day, seen)
        feats = self._features(values, seen)
        ids = tuple(self.offer_ids[a] for a in arms)
        return Visit(
            i, day, c, channel, self.scenario.channels[channel].placement, ids, feats, p, p * self._value[arms], p * self._price[arms], u
        )

    def truth(self, c: int, channel: str, day: float) -> Vector:
        """True acceptance of each offer of a channel for customer c at a day, given the
        impressions so far (what the oracle knows; for tests and analysis)."""
        return self.acceptance(self.values(c, day, channel), self._arms[channel], day, self._seen(c, day))

    def _seen(self, c: int, day: float) -> NDArray[np.int64]:
        """Impressions of each offer to customer c within the fatigue window before day."""
        counts = np.zeros(len(self.offer_ids), dtype=np.int64)
        window = self.scenario.response.fatigue.window_days
        for t, o in self._history.get(c, ()):
            if day - window <= t <= day:
                counts[o] += 1
        return counts

    def acceptance(self, values: dict[str, float | str], arms: NDArray[np.int64], day: float, seen: NDArray[np.int64]) -> Vector:
        """True acceptance probabilities of the given offers for a customer at a visit."""
        sc = self.scenario
        fat = sc.response.fatigue
        active = [p for p in sc.promotions if p.start_day <= day < p.start_day + p.days and _holds(p.when, values)]
        out = np.empty(len(arms))
        for j, a in enumerate(arms):
            oid = self.offer_ids[a]
            r = sc.response.offers[oid]
            z = r.base + sc.channels[str(values["channel"])].logit + sum(_effect(e, values) for e in r.effects)
            z += sum(e.logit for p in active for e in p.effects if oid in e.offers)
            out[j] = 1.0 / (1.0 + math.exp(-z)) * fat.same_offer ** int(seen[a]) * fat.any_offer ** int(seen.sum())
        return out

    def _features(self, values: dict[str, float | str], seen: NDArray[np.int64]) -> FeatureDict:
        customer = {k: v for k, v in values.items() if k != "channel"}
        history: dict[str, float | str] = {f"seen_{self.offer_ids[o]}": float(seen[o]) for o in np.flatnonzero(seen)}
        history["offers_seen"] = float(seen.sum())
        return {"customer": customer, "visit": {"channel": str(values["channel"])}, "history": history}

    def respond(self, visit: Visit, arm_id: str) -> Outcome:
        """The customer's response to the shown offer; records the impression (and purchase)."""
        j = visit.arms.index(arm_id)
        o = self._offer_index[arm_id]
        h = self._history.setdefault(visit.customer, deque())
        while h and h[0][0] < visit.day - self.scenario.response.fatigue.window_days:
            h.popleft()  # visits come in time order: what left the window never returns
        h.append((visit.day, o))
        if visit.u < visit.accept[j]:
            if self._price[o] > 0:
                self.last_purchase[visit.customer] = visit.day
            return Outcome(True, float(self._value[o]), float(self._price[o]))
        return Outcome(False, 0.0, 0.0)

    def placements(self) -> list[PlacementSpec]:
        """The scenario's placements as the service's config: offers become arms with their features."""
        out = []
        for c in self.scenario.channels.values():
            arms = []
            for oid in c.offers:
                o = self.scenario.offer(oid)
                feats: dict[str, float | str | bool] = {"category": o.category, "price": o.price, **o.features}
                arms.append(ArmSpec(id=oid, features=feats))
            out.append(
                PlacementSpec(
                    id=c.placement,
                    description=c.description,
                    arms=arms,
                    exploration=c.exploration,
                    vw_args=c.vw_args,
                    reward_window=600.0,
                    learn_at="reward",  # the simulated channels report every outcome at once
                    fatigue=c.fatigue,
                )
            )
        return out


def request_features(visit: Visit, context: str = "full") -> FeatureDict:
    """What the channel sends to Choose for a visit under a context mode (see CONTEXTS): the
    visit's features in ``full``, else only the channel (the customer id goes beside them)."""
    if context == "full":
        return visit.features
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, not {context!r}")
    return {"visit": dict(visit.features["visit"])}


@dataclass
class Scoreboard:
    """What the served policy earned, and what the counterfactual policies would have."""

    max_arms: int
    placement: list[str] = field(default_factory=list)
    day: list[float] = field(default_factory=list)
    got: list[float] = field(default_factory=list)  # realized reward of the served policy
    got_revenue: list[float] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    _reward: list[Vector] = field(default_factory=list)
    _revenue: list[Vector] = field(default_factory=list)

    def add(self, visit: Visit, arm_id: str, outcome: Outcome) -> None:
        pad = np.full(self.max_arms, np.nan)
        r, v = pad.copy(), pad.copy()
        r[: len(visit.arms)], v[: len(visit.arms)] = visit.reward, visit.revenue
        self.placement.append(visit.placement)
        self.day.append(visit.day)
        self.got.append(outcome.reward)
        self.got_revenue.append(outcome.revenue)
        self.chosen.append(visit.arms.index(arm_id))
        self._reward.append(r)
        self._revenue.append(v)

    def __len__(self) -> int:
        return len(self.got)

    def per_event(self, start: int = 0, end: int | None = None) -> dict[str, tuple[Vector, Vector]]:
        """Per-event (reward, revenue) of each policy; expectations except for ``policy``."""
        sl = slice(start, end)
        R, V = np.array(self._reward[sl]), np.array(self._revenue[sl])
        n = len(R)
        if n == 0:
            z = np.zeros(0)
            return {k: (z, z) for k in ("policy", "policy_expected", "random", "best_fixed", "oracle")}
        rows = np.arange(n)
        chosen = np.array(self.chosen[sl])
        best = np.nanargmax(R, axis=1)
        fixed = np.zeros(n, dtype=np.int64)
        places = np.array(self.placement[sl])
        for p in set(self.placement[sl]):
            m = places == p
            fixed[m] = int(np.nanargmax(np.nansum(R[m], axis=0)))  # best single offer of that placement, in hindsight
        return {
            "policy": (np.array(self.got[sl]), np.array(self.got_revenue[sl])),
            "policy_expected": (R[rows, chosen], V[rows, chosen]),
            "random": (np.nanmean(R, axis=1), np.nanmean(V, axis=1)),
            "best_fixed": (R[rows, fixed], V[rows, fixed]),
            "oracle": (R[rows, best], V[rows, best]),
        }

    def summary(self, start: int = 0, end: int | None = None) -> dict[str, dict[str, float]]:
        """Average reward and revenue per event of each policy over events [start, end)."""
        out = {}
        for k, (r, v) in self.per_event(start, end).items():
            out[k] = {"reward": float(r.mean()) if len(r) else 0.0, "revenue": float(v.mean()) if len(v) else 0.0}
        return out
