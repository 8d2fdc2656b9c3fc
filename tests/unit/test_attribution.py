"""Attribution of conversions from billing (issue #31): the pure rule (bandit/attribution.py),
a conversion's checks, and the placement settings it reads (bandit/spec.py)."""

from __future__ import annotations

import math
import random

import pytest
from pydantic import ValidationError

from nextbest.bandit.attribution import Conversion, Credit, Touch, attribute
from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.spec import AttributionSpec, PlacementSpec, error_location

DAY = 86400.0
NOW = 1_800_000_000.0
RULES = {
    "app": AttributionSpec(window=7 * DAY, model="last_touch"),
    "ussd": AttributionSpec(window=2 * DAY, model="linear"),
}


def touch(event_id: str, placement: str, at: float, arm: str = "data_5gb", slot: int = 0) -> Touch:
    return Touch(event_id, slot, placement, arm, at)


def test_last_touch_credits_the_latest_eligible_touch_of_any_placement() -> None:
    """The latest touch is on app (last touch): it alone is credited; a ussd touch older than
    ussd's 2-day window is not eligible, even though app's window is 7 days."""
    t = NOW
    touches = [
        touch("u-old", "ussd", t - 3 * DAY),  # outside ussd's 2 days
        touch("a1", "app", t - 5 * DAY),
        touch("u1", "ussd", t - 1 * DAY),
        touch("a2", "app", t - 3600),
    ]
    assert attribute(20.0, t, touches, RULES) == [Credit("a2", 0, "app", "data_5gb", 1.0, 20.0)]


def test_linear_splits_among_every_eligible_touch_with_exact_shares() -> None:
    """The latest touch is on ussd (linear): every eligible touch, across both placements, each
    within its own placement's window, gets 1/n, in time order; the values add up exactly."""
    t = NOW
    touches = [
        touch("u2", "ussd", t - 60, slot=1),
        touch("a-old", "app", t - 8 * DAY),  # outside app's 7 days
        touch("a1", "app", t - 6 * DAY),
        touch("u-old", "ussd", t - 2 * DAY - 1),  # just outside ussd's 2 days
        touch("u1", "ussd", t - DAY),
    ]
    credits = attribute(10.0, t, touches, RULES)
    assert [(c.event_id, c.slot, c.placement) for c in credits] == [("a1", 0, "app"), ("u1", 0, "ussd"), ("u2", 1, "ussd")]
    assert [c.share for c in credits] == [1 / 3, 1 / 3, 1 / 3]
    assert math.fsum(c.value for c in credits) == 10.0
    assert credits[0].value == credits[1].value == 10.0 / 3


def test_the_window_includes_its_start_and_excludes_the_purchase_instant() -> None:
    t = NOW
    edge = touch("edge", "app", t - 7 * DAY)
    same = touch("same", "app", t)
    later = touch("later", "app", t + 1)
    assert attribute(5.0, t, [edge, same, later], RULES) == [Credit("edge", 0, "app", "data_5gb", 1.0, 5.0)]
    assert attribute(5.0, t, [same, later], RULES) == []
    assert attribute(5.0, t, [touch("x", "web", t - 1)], RULES) == []  # a placement without rules
    assert attribute(5.0, t, [], RULES) == []


def test_ties_go_to_the_later_event_id() -> None:
    """Two touches at the same time on placements with different models: the later event id is
    the last touch and its placement's model decides."""
    t = NOW
    a, u = touch("e-b", "app", t - 10), touch("e-a", "ussd", t - 10)
    assert attribute(3.0, t, [a, u], RULES) == [Credit("e-b", 0, "app", "data_5gb", 1.0, 3.0)]
    a, u = touch("e-a", "app", t - 10), touch("e-b", "ussd", t - 10)
    assert [c.event_id for c in attribute(3.0, t, [u, a], RULES)] == ["e-a", "e-b"]


def test_linear_values_always_sum_exactly() -> None:
    rng = random.Random(31)
    rules = {"p": AttributionSpec(window=90 * DAY, model="linear")}
    for _ in range(2000):
        n = rng.randint(1, 40)
        value = rng.choice([rng.uniform(-1e6, 1e6), rng.uniform(0, 1), 0.1, 1e12, 7.0])
        touches = [touch(f"e{i}", "p", NOW - rng.uniform(1, 80 * DAY)) for i in range(n)]
        credits = attribute(value, NOW, touches, rules)
        assert len(credits) == n
        assert math.fsum(c.value for c in credits) == value
        assert all(c.share == 1 / n for c in credits)
        assert [c.event_id for c in credits] == [t.event_id for t in sorted(touches, key=lambda t: t.at)]


def test_products_are_unique_across_the_arms_of_a_placement() -> None:
    ok = PlacementSpec.model_validate(
        {"id": "p", "arms": [{"id": "a", "products": ["SKU-1", "SKU-2"]}, {"id": "b", "products": ["SKU-3"]}]}
    )
    assert ok.arms[0].products == ["SKU-1", "SKU-2"]
    with pytest.raises(ValidationError) as e:
        PlacementSpec.model_validate({"id": "p", "arms": [{"id": "a", "products": ["SKU-1"]}, {"id": "b", "products": ["SKU-2", "SKU-1"]}]})
    err = e.value.errors()[0]
    loc, msg = error_location(tuple(err["loc"]), str(err["msg"]))
    assert loc == ("arms", 1, "products") and "'SKU-1'" in msg and "'a'" in msg
    with pytest.raises(ValidationError, match="duplicate product"):
        PlacementSpec.model_validate({"id": "p", "arms": [{"id": "a", "products": ["SKU-1", "SKU-1"]}]})
    with pytest.raises(ValidationError, match="products"):
        PlacementSpec.model_validate({"id": "p", "arms": [{"id": "a", "products": ["bad code"]}]})


def test_attribution_settings_and_the_apply_warning() -> None:
    p = PlacementSpec.model_validate({"id": "p"})
    assert p.attribution == AttributionSpec(window=7 * DAY, model="last_touch")
    assert p.warnings() == []  # nothing says it learns from conversions
    p = PlacementSpec.model_validate({"id": "p", "attribution": {"window": "3d", "model": "linear"}, "reward_window": "1d"})
    assert p.attribution.window == 3 * DAY and p.attribution.model == "linear"
    assert len(p.warnings()) == 1 and "LATE" in p.warnings()[0] and "(1d)" in p.warnings()[0] and "(3d)" in p.warnings()[0]
    assert PlacementSpec.model_validate({"id": "p", "attribution": {"window": "1d"}, "reward_window": "1d"}).warnings() == []
    assert PlacementSpec.model_validate({"id": "p", "arms": [{"id": "a", "products": ["X"]}]}).warnings() != []
    for bad in (0, -1, "91d", "soon"):
        with pytest.raises(ValidationError, match="window"):
            PlacementSpec.model_validate({"id": "p", "attribution": {"window": bad}})
    with pytest.raises(ValidationError, match="model"):
        PlacementSpec.model_validate({"id": "p", "attribution": {"model": "first_touch"}})


def conversion(**kw: object) -> Conversion:
    fields: dict[str, object] = {
        "conversion_id": "inv-1",
        "customer_id": "c42",
        "arm_id": "",
        "product": "SKU-1",
        "value": 4.99,
        "occurred_at": NOW - DAY,
    }
    return Conversion(**{**fields, **kw})  # type: ignore[arg-type]


def check(c: Conversion) -> None:
    c.check(now=NOW, max_id_length=256, max_abs_value=1e6, max_age=400 * DAY)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"value": math.nan}, "value"),
        ({"value": math.inf}, "value"),
        ({"value": 1e300}, "value"),
        ({"value": -2e6}, "value"),
        ({"conversion_id": "x" * 100_000}, "conversion_id"),
        ({"customer_id": "x" * 100_000}, "customer_id"),
        ({"conversion_id": ""}, "conversion_id"),
        ({"customer_id": ""}, "customer_id"),
        ({"customer_id": "c\x0042"}, "customer_id"),
        ({"conversion_id": "inv\x00"}, "conversion_id"),
        ({"product": "SKU\ud800"}, "product"),
        ({"product": "P" * 129}, "product"),
        ({"product": "", "arm_id": "a\x00"}, "arm_id"),
        ({"arm_id": "data_5gb"}, "product"),  # both
        ({"product": ""}, "product"),  # neither
        ({"occurred_at": NOW + 301}, "occurred_at"),
        ({"occurred_at": NOW - 401 * DAY}, "occurred_at"),
        ({"occurred_at": math.nan}, "occurred_at"),
        ({"occurred_at": 1e20}, "occurred_at"),
        ({"occurred_at": -1e12}, "occurred_at"),
    ],
)
def test_hostile_conversions_are_refused_naming_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as e:
        check(conversion(**kw))
    assert e.value.field == field
    assert len(str(e.value)) < 200


def test_valid_conversions_pass() -> None:
    check(conversion())
    check(conversion(product="", arm_id="data_5gb", value=-4.99))  # a refund
    check(conversion(occurred_at=NOW + 300))  # clock skew
    check(conversion(occurred_at=NOW - 400 * DAY, value=1e6))


def test_products_and_attribution_travel_through_the_admin_api_and_export() -> None:
    from nextbest.config.export import to_yaml
    from nextbest.rpc import convert
    from nextbest.storage.base import PlacementRecord

    spec = PlacementSpec.model_validate(
        {
            "id": "p",
            "reward_window": "14d",
            "attribution": {"window": "3d", "model": "linear"},
            "arms": [{"id": "a", "products": ["SKU-1", "SKU-2"]}, {"id": "b"}],
        }
    )
    back = convert.placement_spec(convert.placement_pb(PlacementRecord(spec, {"a": 1, "b": 1})))
    assert back == spec
    assert back.arms[0].products == ["SKU-1", "SKU-2"] and back.attribution == AttributionSpec(window=3 * DAY, model="linear")
    text = to_yaml([spec], [])
    assert "attribution: {window: 3d, model: linear}" in text and "products: [SKU-1, SKU-2]" in text
    # a placement without them sends the defaults back
    plain = PlacementSpec.model_validate({"id": "p"})
    assert convert.placement_spec(convert.placement_pb(PlacementRecord(plain, {}))).attribution == AttributionSpec()
