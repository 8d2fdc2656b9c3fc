"""Crediting purchases from billing to the decisions that showed the offer (issue #31).

The outcome a CVM team is judged on is seen by billing, not by the channel: a customer sees a
data bundle on the app banner, then buys it two days later from the USSD menu. Billing reports
that purchase keyed by the customer (MSISDN) and a product code, with no event id, so it has to
be matched to the customer's impressions of that offer afterwards. The vocabulary is the
marketers' own: a *touch* is an impression of the offer to the customer (Braze counts a
conversion within a deadline after a message, even without a click; Amazon Personalize takes
"Taken" events keyed by user, item and time); *last touch* credits the latest impression before
the purchase, *linear* spreads the value equally over every impression within the window.

A touch counts when its time lies in ``[occurred_at - window, occurred_at)`` of its own
placement's window: an impression at the instant of the purchase did not cause it. The model is
that of the placement of the latest eligible touch (ties: the later event id), so a placement
decides how the conversions it caused last are credited. Everything here is pure: the server
finds the touches of a batch (Store.touches_of) and stores the credits (Store.record_conversions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.spec import AttributionSpec
from nextbest.bandit.text import check_text

CLOCK_SKEW = 300.0  # a conversion may claim to lie this far in the future (the billing system's clock)
MIN_EPOCH = -62135596800.0  # 0001-01-01T00:00:00Z, the start of protobuf's Timestamp range
MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z, its end


@dataclass(frozen=True, slots=True)
class Touch:
    """An activated impression of an arm to a customer: a decision (or one slot of it) that
    served ``arm_id`` on ``placement`` at ``at``."""

    event_id: str
    slot: int
    placement: str
    arm_id: str
    at: float


@dataclass(frozen=True, slots=True)
class Credit:
    """The part of a conversion credited to one decision: ``share`` of it (1.0 under last
    touch, 1/n under linear), worth ``value``."""

    event_id: str
    slot: int
    placement: str
    arm_id: str
    share: float
    value: float


def attribute(value: float, occurred_at: float, touches: Sequence[Touch], rules: Mapping[str, AttributionSpec]) -> list[Credit]:
    """The credits of a conversion worth ``value`` at ``occurred_at`` among ``touches`` (the
    customer's impressions of the matching arms), by the attribution rules of each placement
    (placements without one credit nothing), ordered by time; [] when no touch is eligible.
    Under linear the shares are 1/n and the values value/n, the last taking the rounding
    remainder so that ``math.fsum`` of the values is exactly ``value``."""
    eligible = [t for t in touches if (r := rules.get(t.placement)) is not None and occurred_at - r.window <= t.at < occurred_at]
    if not eligible:
        return []
    eligible.sort(key=lambda t: (t.at, t.event_id, t.slot))
    last = eligible[-1]
    if rules[last.placement].model == "last_touch":
        return [Credit(last.event_id, last.slot, last.placement, last.arm_id, 1.0, value)]
    n = len(eligible)
    each = value / n
    values = [each] * n
    values[-1] = value - math.fsum(values[:-1])
    for _ in range(64):  # the remainder itself was rounded: step it by ulps until the sum is exact
        total = math.fsum(values)
        if total == value:
            break
        values[-1] = math.nextafter(values[-1], math.inf if total < value else -math.inf)
    return [Credit(t.event_id, t.slot, t.placement, t.arm_id, 1.0 / n, v) for t, v in zip(eligible, values, strict=True)]


@dataclass(frozen=True, slots=True)
class Conversion:
    """A purchase reported by billing: exactly one of ``arm_id`` (the offer itself) and
    ``product`` (a billing product code an arm lists) is set. ``conversion_id`` is the
    idempotency key: a conversion reported again is a duplicate, never counted twice."""

    conversion_id: str
    customer_id: str
    arm_id: str
    product: str
    value: float
    occurred_at: float

    def check(self, *, now: float, max_id_length: int, max_abs_value: float, max_age: float) -> None:
        """InvalidInput naming the field (``conversion_id``, ``customer_id``, ``arm_id``,
        ``product``, ``value``, ``occurred_at``) when this conversion cannot be recorded: an
        empty, too long or unstorable id; both or neither of arm_id and product; a value that is
        not finite or above ``max_abs_value`` in magnitude; a time more than CLOCK_SKEW in the
        future, older than ``max_age`` seconds, or outside protobuf's Timestamp range."""
        for name, text, limit in (
            ("conversion_id", self.conversion_id, max_id_length),
            ("customer_id", self.customer_id, max_id_length),
            ("arm_id", self.arm_id, 128),
            ("product", self.product, 128),
        ):
            if not isinstance(text, str):
                raise InvalidInput(name, "must be a text")
            if not text and name in ("conversion_id", "customer_id"):
                raise InvalidInput(name, "must not be empty")
            check_text(text, name, limit)
        if self.arm_id and self.product:
            raise InvalidInput("product", "set either arm_id or product, not both")
        if not self.arm_id and not self.product:
            raise InvalidInput("product", "set arm_id or product")
        if isinstance(self.value, bool) or not isinstance(self.value, int | float):
            raise InvalidInput("value", "must be a number")
        if not math.isfinite(self.value):
            raise InvalidInput("value", "must be a finite number")
        if abs(self.value) > max_abs_value:
            raise InvalidInput("value", f"magnitude above {max_abs_value:g}")
        at = self.occurred_at
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
            raise InvalidInput("occurred_at", "must be a finite time")
        if not MIN_EPOCH <= at <= MAX_EPOCH:
            raise InvalidInput("occurred_at", "outside the Timestamp range 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z")
        if at > now + CLOCK_SKEW:
            raise InvalidInput("occurred_at", f"{at - now:.0f} seconds in the future (at most {CLOCK_SKEW:g} of clock skew)")
        if at < now - max_age:
            raise InvalidInput("occurred_at", f"older than {max_age / 86400:g} days")
