"""Billing for the telecom simulator (issue #31): purchases reported by customer and product.

A real operator's outcome is seen by billing, not by the channel: an offer accepted today is a
purchase of its product by the customer some hours or days later, keyed by the customer and a
billing product code, with no event id; and customers buy without any offer too (bundles from
the USSD menu, recharges), so a holdout that was shown nothing still has purchases. This module
turns the simulator's responses into such purchases and keeps what only a simulator knows: the
expected purchase value each shown offer caused, hence the true uplift of the served policy
against showing nothing.

Seeded and apart from the visit stream: the delays and the organic purchases have their own
random streams, one delay per shown offer (accepted or not), so two policies served to the same
customers get the same delays (common random numbers).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from nextbest.bandit.attribution import Conversion
from nextbest.bandit.sim.telecom import Outcome, TelecomSim, Visit
from nextbest.bandit.spec import ArmSpec, PlacementSpec

HOLDOUT = "holdout"  # the variant name the server gives the control group
TREATED = "bandit"  # the experiment's one variant: the placement's model


def product_code(offer_id: str) -> str:
    """The billing product code of a simulated offer: ``data_5gb_7d`` is ``SKU_DATA_5GB_7D``."""
    return f"SKU_{offer_id.upper()}"


@dataclass(frozen=True, slots=True)
class BillingSpec:
    """How purchases reach billing. Delays are log-normal in hours, clipped to
    [``delay_min_hours``, ``delay_max_hours``], which stays inside the attribution window so
    that an accepted offer's purchase can be credited to it; organic purchases come at
    ``organic_per_week`` per customer on average (each customer's own rate is that times a
    Gamma(2, 1/2) draw), of a product drawn with weight 1/price (cheap bundles most often)."""

    delay_median_hours: float = 18.0
    delay_sigma: float = 1.0
    delay_min_hours: float = 1.0
    delay_max_hours: float = 60.0
    organic_per_week: float = 0.3
    attribution_days: float = 3.0
    holdout: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must lie strictly between 0 and 1, not {self.holdout!r}")
        if not 0.0 < self.delay_min_hours <= self.delay_median_hours <= self.delay_max_hours < 24.0 * self.attribution_days:
            raise ValueError("delays must satisfy 0 < min <= median <= max < the attribution window")
        if self.organic_per_week < 0.0:
            raise ValueError("organic_per_week must be >= 0")


@dataclass(frozen=True, slots=True, order=True)
class Purchase:
    """One purchase as billing sees it, plus whether an offer caused it (the simulator's truth,
    never reported)."""

    day: float  # when it occurred, in simulated days
    number: int  # billing's invoice number: the conversion id
    customer_id: str
    product: str
    value: float
    organic: bool

    def conversion(self, epoch: float) -> Conversion:
        """What billing reports: an invoice id, the customer, the product, the value, the time;
        no event id and no arm."""
        return Conversion(f"inv-{self.number}", self.customer_id, "", self.product, self.value, epoch + self.day * 86400.0)


@dataclass
class Billing:
    """Purchases of one simulated customer base under one seed, and the truth about them."""

    sim: TelecomSim
    seed: int = 0
    spec: BillingSpec = field(default_factory=BillingSpec)
    horizon_days: float = 0.0  # organic purchases are drawn over [0, horizon_days)

    def __post_init__(self) -> None:
        delay_ss, organic_ss = np.random.SeedSequence([self.seed, 31]).spawn(2)
        self._delay_rng = np.random.default_rng(delay_ss)
        self._pending: list[Purchase] = []
        self._numbers = 0
        kind = self.sim.reward_kind  # what billing reports as a purchase's value: margin by default
        self._price = {o.id: float(o.price) for o in self.sim.scenario.offers}
        self._value = {o.id: float({"margin": o.margin, "revenue": o.price}.get(kind, 1.0)) for o in self.sim.scenario.offers}
        # (customer, day the purchase would occur, expected value) of every shown offer
        self._caused: dict[int, list[tuple[float, float]]] = {}
        self.first_day: dict[str, dict[int, float]] = {}  # placement -> customer -> first decision day
        self.group: dict[str, dict[int, str]] = {}  # placement -> customer -> the variant the server put them in
        self._organic(np.random.default_rng(organic_ss))

    def _push(self, day: float, customer: int, offer: str, organic: bool) -> None:
        self._numbers += 1
        p = Purchase(day, self._numbers, self.sim.customer_id(customer), product_code(offer), self._value[offer], organic)
        heapq.heappush(self._pending, p)

    def _organic(self, rng: np.random.Generator) -> None:
        n = self.sim.scenario.customers.count
        rate = self.spec.organic_per_week / 7.0 * rng.gamma(2.0, 0.5, n)  # per customer and day
        counts = rng.poisson(rate * self.horizon_days)
        offers = list(self._price)
        w = np.array([1.0 / max(self._price[o], 0.01) for o in offers])
        for c in np.flatnonzero(counts):
            for day, k in zip(
                rng.uniform(0.0, self.horizon_days, counts[c]), rng.choice(len(offers), counts[c], p=w / w.sum()), strict=True
            ):
                self._push(float(day), int(c), offers[int(k)], True)

    def delay(self) -> float:
        """One purchase delay in days."""
        s = self.spec
        hours = s.delay_median_hours * math.exp(s.delay_sigma * float(self._delay_rng.normal()))
        return min(max(hours, s.delay_min_hours), s.delay_max_hours) / 24.0

    def decided(self, visit: Visit, variant: str) -> None:
        """The server decided this visit in ``variant`` (the holdout is shown nothing). The split is
        sticky per customer within a placement, not across placements."""
        self.first_day.setdefault(visit.placement, {}).setdefault(visit.customer, visit.day)
        self.group.setdefault(visit.placement, {}).setdefault(visit.customer, variant)

    def shown(self, visit: Visit, arm_id: str, outcome: Outcome) -> None:
        """The customer was shown ``arm_id`` and responded: an accepted offer is a purchase of its
        product after a delay. Its expected value (acceptance x value) is what the offer caused."""
        at = visit.day + self.delay()
        expected = float(visit.reward[visit.arms.index(arm_id)])  # acceptance x value
        self._caused.setdefault(visit.customer, []).append((at, expected))
        if outcome.accepted:
            self._push(at, visit.customer, arm_id, False)

    def due(self, day: float) -> list[Purchase]:
        """The purchases that occurred before ``day``, in time order, taken off the queue."""
        out = []
        while self._pending and self._pending[0].day < day:
            out.append(heapq.heappop(self._pending))
        return out

    def pending(self) -> int:
        return len(self._pending)

    def true_uplift(self, placement: str, until_day: float) -> float:
        """The true difference to the holdout in value per customer of a placement, counted as
        GetStats counts (purchases at or after the customer's first decision there, before
        ``until_day``): the expected purchase value the shown offers caused, averaged over the
        customers the placement decided outside its holdout, minus the same over its holdout.
        Organic purchases do not depend on the group, so they drop out. The holdout's term is
        not zero: each placement splits its customers with its own salt, so a customer held out
        here may be served elsewhere; and serving here changes what is bought elsewhere (fatigue,
        top-ups), which the served customers' expected values already carry."""
        first = self.first_day.get(placement, {})
        group = self.group.get(placement, {})
        means = {}
        for held in (False, True):
            members = [c for c in first if (group[c] == HOLDOUT) == held]
            total = sum(v for c in members for at, v in self._caused.get(c, ()) if first[c] <= at < until_day)
            means[held] = total / len(members) if members else 0.0
        return means[False] - means[True]


def with_billing(specs: Iterable[PlacementSpec], spec: BillingSpec, conversions: bool = True) -> list[PlacementSpec]:
    """The simulator's placements as a billing-fed deployment configures them: each arm lists its
    product, attribution over ``spec.attribution_days`` (last touch), a reward window as long
    (learned at its close, credits summed), and one experiment split shared by every placement
    (the same salt), so a customer in the holdout is in it everywhere. With ``conversions``
    false, the channels report each outcome by event id at once: the placements keep learning
    at the reward, as the simulator's always did."""
    learning: dict[str, object] = {
        "attribution": {"window": spec.attribution_days * 86400.0, "model": "last_touch"},
        "reward_window": spec.attribution_days * 86400.0,
        "learn_at": "window_close",
        "reward_aggregation": "sum",
    }
    experiment = {
        "salt": "sim-billing",
        "holdout": {"share": spec.holdout, "policy": "uniform"},
        "variants": [{"id": TREATED, "share": 1.0 - spec.holdout}],
    }
    out = []
    for p in specs:
        arms = [ArmSpec.model_validate({**a.model_dump(exclude_unset=True), "products": [product_code(a.id)]}) for a in p.arms]
        out.append(
            PlacementSpec.model_validate(
                {
                    **p.model_dump(exclude_unset=True),
                    "arms": [a.model_dump(exclude_unset=True) for a in arms],
                    **(learning if conversions else {}),
                    "experiment": experiment,
                }
            )
        )
    return out
