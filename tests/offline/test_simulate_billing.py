"""The simulator reports like billing does (issue #31): purchases by customer and product, hours
to days after the offer, no event id; organic purchases for everyone, the holdout included; the
true uplift the simulator knows; and a run through a real in-process server on simulated time
whose GetStats interval holds that truth."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from nextbest.bandit.sim.billing import HOLDOUT, TREATED, Billing, BillingSpec, product_code, with_billing
from nextbest.bandit.sim.scenario import load_scenario
from nextbest.bandit.sim.telecom import Outcome, TelecomSim, Visit
from nextbest.cli import simulate
from nextbest.cli.simulate_billing import billing_run, compare_tables, coverage

DEFAULT = load_scenario()
NO_ORGANIC = BillingSpec(organic_per_week=0.0)


def _visit(day: float, customer: int, placement: str, arms: tuple[str, ...], reward: list[float], accepted: bool) -> Visit:
    n = len(arms)
    return Visit(0, day, customer, "app", placement, arms, {}, np.full(n, 0.5), np.array(reward), np.zeros(n), 0.0 if accepted else 1.0)


def test_an_accepted_offer_is_a_purchase_of_its_product_hours_to_days_later_with_no_event_id() -> None:
    sim = TelecomSim(DEFAULT, seed=3)
    billing = Billing(sim, seed=3, spec=NO_ORGANIC, horizon_days=10.0)
    assert billing.pending() == 0  # no organic purchases asked for
    bought: dict[tuple[str, str], list[float]] = {}
    for _ in range(400):
        v = sim.next_visit()
        out = sim.respond(v, v.arms[0])
        billing.shown(v, v.arms[0], out)
        if out.accepted:
            bought.setdefault((sim.customer_id(v.customer), product_code(v.arms[0])), []).append(v.day)
    purchases = billing.due(100.0)
    assert len(purchases) == sum(map(len, bought.values())) > 20
    assert [p.day for p in purchases] == sorted(p.day for p in purchases)
    delays = []
    margin = {o.id: o.margin for o in DEFAULT.offers}
    for p in purchases:
        c = p.conversion(1_000_000.0)
        assert (c.arm_id, c.customer_id, c.product) == ("", p.customer_id, p.product)  # keyed by customer and product only
        assert c.conversion_id == f"inv-{p.number}" and c.occurred_at == 1_000_000.0 + p.day * 86400.0
        assert c.value == pytest.approx(margin[p.product.removeprefix("SKU_").lower()])
        assert not p.organic
        # the latest showing of that product to that customer before the purchase
        delays.append(p.day - max(d for d in bought[(p.customer_id, p.product)] if d < p.day))
    hours = np.array(delays) * 24
    assert hours.min() >= 1.0 - 1e-9 and hours.max() <= 60.0 + 1e-9
    assert 6.0 < float(np.median(hours)) < 40.0 and hours.max() > 24.0  # hours to days
    assert billing.due(100.0) == []  # taken off the queue


def test_delays_and_organic_purchases_are_seeded() -> None:
    a, b = (Billing(TelecomSim(DEFAULT, seed=1), seed=1, horizon_days=5.0) for _ in range(2))
    assert [a.delay() for _ in range(5)] == [b.delay() for _ in range(5)]
    assert a.due(5.0) == b.due(5.0)
    c = Billing(TelecomSim(DEFAULT, seed=1), seed=2, horizon_days=5.0)
    assert c.due(5.0) != Billing(TelecomSim(DEFAULT, seed=1), seed=1, horizon_days=5.0).due(5.0)


def test_customers_buy_without_offers_the_holdout_included() -> None:
    sim = TelecomSim(DEFAULT, seed=4)
    billing = Billing(sim, seed=4, spec=BillingSpec(organic_per_week=0.3), horizon_days=14.0)
    held = set()
    for _ in range(300):
        v = sim.next_visit()
        billing.decided(v, HOLDOUT if v.customer % 5 == 0 else TREATED)
        if v.customer % 5 == 0:
            held.add(sim.customer_id(v.customer))
    organic = billing.due(14.0)
    assert all(p.organic and 0.0 <= p.day < 14.0 for p in organic)
    # 3,000 customers x 2 weeks x 0.3 a week: about 1,800
    assert 1_600 < len(organic) < 2_000
    assert len({p.customer_id for p in organic} & held) > 20
    assert {p.product for p in organic} <= {product_code(o.id) for o in DEFAULT.offers}
    assert billing.true_uplift("sim.app_home", 14.0) == 0.0  # nothing shown, nothing caused


def test_the_true_uplift_by_hand() -> None:
    sim = TelecomSim(DEFAULT, seed=0)
    billing = Billing(sim, seed=0, spec=NO_ORGANIC, horizon_days=10.0)
    billing.delay = lambda: 0.5  # type: ignore[method-assign]
    arms = ("data_1gb_1d", "data_5gb_7d")

    def serve(day: float, customer: int, placement: str, variant: str, reward: list[float], arm: int = 0) -> None:
        v = _visit(day, customer, placement, arms, reward, False)
        billing.decided(v, variant)
        if variant != HOLDOUT:
            billing.shown(v, arms[arm], Outcome(False, 0.0, 0.0))

    # customer 1, served on both: shown on Q at day 0.2 (expected 4.0, bought at 0.7: before
    # their first decision on P at day 1, so not P's), on P at day 1 (2.0 at 1.5) and day 3
    # (0.25 at 3.5); customer 2 served on P at day 9.8 (5.0, at 10.3: after a period to day 10);
    # customer 3, held out on P at day 2, served on Q at day 2.5 (1.0 at 3.0); customer 4 held
    # out on P, never served.
    serve(0.2, 1, "Q", TREATED, [4.0, 0.0])
    serve(1.0, 1, "P", TREATED, [2.0, 9.0])
    serve(3.0, 1, "P", TREATED, [0.25, 9.0])
    serve(9.8, 2, "P", TREATED, [1.0, 5.0], arm=1)
    serve(2.0, 3, "P", HOLDOUT, [1.0, 1.0])
    serve(2.5, 3, "Q", TREATED, [1.0, 7.0])
    serve(4.0, 4, "P", HOLDOUT, [1.0, 1.0])
    assert billing.true_uplift("P", 10.0) == pytest.approx((2.0 + 0.25 + 0.0) / 2 - (1.0 + 0.0) / 2)
    assert billing.true_uplift("P", 11.0) == pytest.approx((2.0 + 0.25 + 5.0) / 2 - (1.0 + 0.0) / 2)
    # Q has no holdout: on Q, decided first at day 0.2, customer 1's purchases from P count too
    assert billing.true_uplift("Q", 10.0) == pytest.approx((4.0 + 2.0 + 0.25 + 1.0) / 2)
    assert billing.true_uplift("R", 10.0) == 0.0
    assert billing.due(11.0) == []  # nothing was accepted
    accepted = _visit(5.0, 2, "Q", arms, [3.0, 1.0], True)
    billing.decided(accepted, TREATED)
    billing.shown(accepted, arms[0], Outcome(True, 3.0, 0.99))
    [p] = billing.due(11.0)
    assert (p.day, p.customer_id, p.product, p.value, p.organic) == (5.5, "cust2", "SKU_DATA_1GB_1D", DEFAULT.offer(arms[0]).margin, False)


def test_the_placements_list_products_attribute_and_share_one_holdout() -> None:
    specs = with_billing(TelecomSim(DEFAULT).placements(), BillingSpec(holdout=0.25))
    for p in specs:
        assert all(a.products == [product_code(a.id)] for a in p.arms)
        assert p.attribution.window == 3 * 86400.0 and p.reward_window >= p.attribution.window
        assert (p.learn_at, p.reward_aggregation) == ("window_close", "sum")
        assert p.experiment is not None and p.experiment.salt == "sim-billing" and p.experiment.holdout is not None
        assert p.experiment.holdout.share == 0.25 and [(v.id, v.share) for v in p.experiment.variants] == [(TREATED, 0.75)]
    events = with_billing(TelecomSim(DEFAULT).placements(), BillingSpec(), conversions=False)
    assert {(p.learn_at, p.reward_window) for p in events} == {("reward", 600.0)}
    with pytest.raises(ValueError, match="holdout"):
        BillingSpec(holdout=1.0)


def _options(*more: str) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="nextbest")
    simulate.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["simulate", "--rewards", "conversions", "--events", "400", "--progress-every", "100000", *more])
    return {k: v for k, v in vars(args).items() if k != "func"}


def test_a_run_through_the_server_reports_an_uplift_whose_interval_holds_the_truth() -> None:
    r = billing_run(_options(), "conversions", 7)
    c = r["conversions"]
    assert r["treated"] + r["held_out"] == 400 and r["held_out"] > 40
    assert c["attributed"] > 10 and c["unattributed"] > c["attributed"] and c["duplicate"] == 0
    assert c["attributed"] + c["unattributed"] == c["purchases"] > c["organic"] > 0
    app = r["placements"]["sim.app_home"]
    assert app["holdout_customers"] > 10 and app["customers"] > 3 * app["holdout_customers"]
    assert app["low"] <= app["true"] <= app["high"] and app["true"] > 0.0
    assert app["inside"]
    k, n = coverage([r])
    assert n == len(r["placements"]) and k >= n - 1
    assert "| sim.app_home |" in compare_tables([r], 400, 400)


def _fake(rewards: str, seed: int, share: float, inside: bool) -> dict[str, object]:
    u = {"customers": 80, "holdout_customers": 20, "uplift": 1.0 + seed, "low": 0.5, "high": 2.5, "true": 1.5, "inside": inside}
    return {"rewards": rewards, "seed": seed, "share": share, "share_last": share + 0.1, "placements": {"sim.app_home": u}}


def test_the_comparison_tables_and_the_coverage_count() -> None:
    runs = [
        _fake("events", 1, 0.6, False),
        _fake("events", 2, 0.8, False),
        _fake("conversions", 1, 0.5, True),
        _fake("conversions", 2, 0.3, False),
    ]
    assert coverage(runs) == (1, 2)
    assert compare_tables(runs, 10_000, 5_000).splitlines() == [
        "| how outcomes reach the server | all 10,000 events | last 5,000 |",
        "|---|---:|---:|",
        "| every outcome by event id, at once (`--rewards events`) | 0.700 ± 0.141 | 0.800 ± 0.141 |",
        "| purchases from billing, hours to days later (`--rewards conversions`) | 0.400 ± 0.141 | 0.500 ± 0.141 |",
        "",
        "| placement | uplift per customer (mean over seeds) | true uplift (mean) | truth inside the 95 % CI |",
        "|---|---:|---:|---:|",
        "| sim.app_home | +2.50 | +1.50 | 1 of 2 |",
    ]


@pytest.mark.parametrize(("flags", "message"), [(["--holdout", "1.5"], "--holdout"), (["--context", "profile"], "--context")])
def test_the_billing_mode_refuses_what_it_cannot_do(flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        simulate.main(["simulate", "--rewards", "conversions", *flags])
