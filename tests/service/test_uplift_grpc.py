"""Uplift on real purchases through real gRPC (issue #31): GetStats gives per variant, the holdout
included, the customers decided, those converting, the conversion rate and the value per
customer with 95 % intervals and the difference to the holdout, counting every conversion of a
decided customer from their first decision on (attributed or not: the holdout's purchases are
what happens without offers); unattributed conversions by product apart; ``nextbest stats``
prints the same. On a fake clock, SQLite and PostgreSQL."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import grpc
import pytest

from nextbest.bandit.attribution import Conversion
from nextbest.bandit.offline.experiment_stats import wilson
from nextbest.bandit.spec import PlacementSpec
from nextbest.cli.main import main
from nextbest.v1 import admin_pb2
from tests.harness import FakeClock, ServerThread, running_server

H = 3600.0
T0 = float(int(time.time() - 3 * H))
Z = 1.959963984540054
APP = PlacementSpec.model_validate(
    {
        "id": "app",
        "arms": [
            {"id": "app_data", "features": {"category": "data"}, "products": ["DATA5"]},
            {"id": "app_voice", "features": {"category": "voice"}, "products": ["VOICE3"]},
        ],
        "attribution": {"window": "2d", "model": "last_touch"},
        "reward_window": "3d",
        "experiment": {"holdout": {"share": 0.5, "policy": "uniform"}, "variants": [{"id": "A", "share": 0.5}]},
    }
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def served(any_db: str, clock: FakeClock) -> Iterator[ServerThread]:
    with running_server(any_db, clock, sweep_interval=60) as s:
        s.call(s.engine.config.apply([APP]))
        yield s


def _sums(values: list[float]) -> tuple[int, int, float, float]:
    """customers, converting, value sum and sum of squares of per-customer values."""
    return len(values), sum(v > 0 for v in values), sum(values), sum(v * v for v in values)


def _mean_ci(total: float, sq: float, n: int) -> tuple[float, float, float, float]:
    """Mean, its sample variance and normal 95 % bounds."""
    mean = total / n
    var = (sq - total * total / n) / (n - 1)
    return mean, var, mean - Z * math.sqrt(var / n), mean + Z * math.sqrt(var / n)


def _iv(i: admin_pb2.EstimateInterval) -> tuple[float, float, float]:
    return i.estimate, i.low, i.high


def test_get_stats_gives_uplift_on_every_purchase_against_the_holdout(
    served: ServerThread, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    group: dict[str, str] = {}  # customer -> variant, every customer decided
    shown: dict[str, str] = {}  # customer -> the arm shown (activated)
    with served.client() as c:

        def decide(customer: str, arm: str, defer: bool = False) -> str:
            other = "app_voice" if arm == "app_data" else "app_data"
            d = c.choose("app", {"segment": "youth"}, customer_id=customer, exclude_arms=[other], defer_activation=defer)
            assert d.arm_id == arm
            group[customer] = d.variant
            if not defer:
                shown[customer] = arm
            return d.variant

        def pick(variant: str, arm: str, defer: bool = False) -> str:
            """The next new customer that lands in ``variant`` (the others stay decided)."""
            for i in range(len(group), 200):
                if decide(f"c{i:03d}", arm, defer) == variant:
                    return f"c{i:03d}"
            raise AssertionError(f"no customer landed in {variant}")

        a0, a1 = pick("A", "app_data"), pick("A", "app_data")
        pick("A", "app_data")  # decided, never buys
        h0 = pick("holdout", "app_data")
        h1 = pick("holdout", "app_data", defer=True)  # decided, never activated: shown nothing
        h2 = pick("holdout", "app_voice")
        pick("holdout", "app_data")  # decided, never buys
        clock.advance(2 * H)
        at = clock() - 1
        assert not c.stats("app").conversions  # no conversion reported yet: no tally read
        r = c.report_conversions(
            [
                Conversion("k1", a0, "", "DATA5", 10.0, at),  # attributed to a0's impression
                Conversion("k2", a0, "", "VOICE3", 5.0, at),  # a0 was never shown voice: unattributed, counts
                Conversion("k3", a1, "app_data", "", 4.0, at),
                Conversion("k4", h0, "", "DATA5", 8.0, at),  # the holdout shown data: attributed, counts
                Conversion("k5", h1, "", "DATA5", 6.0, at),  # shown nothing: unattributed, counts
                Conversion("k6", h2, "", "DATA5", 2.0, at),  # shown voice, bought data: unattributed, counts
                Conversion("k7", h2, "", "VOICE3", 3.0, T0 - H),  # before h2's first decision: not counted
                Conversion("k8", "stranger", "", "DATA5", 7.0, at),  # never decided: in no variant
            ]
        )
        assert [x.status for x in r] == ["attributed", "unattributed", "attributed", "attributed"] + ["unattributed"] * 4
        s = c.stats("app", since=T0 - 2 * H)
        default_period = c.stats("app")
        empty = c.stats("app", since=clock() - 0.5, until=clock())

    bought = {a0: 15.0, a1: 4.0, h0: 8.0, h1: 6.0, h2: 2.0}
    a_values = [bought.get(x, 0.0) for x, v in group.items() if v == "A"]
    h_values = [bought.get(x, 0.0) for x, v in group.items() if v == "holdout"]
    assert sorted(x for x in a_values if x) == [4.0, 15.0] and sorted(x for x in h_values if x) == [2.0, 6.0, 8.0]
    got = {v.variant: v for v in s.conversions}
    assert list(got) == ["A", "holdout"]
    rates = {}
    for name, values in (("A", a_values), ("holdout", h_values)):
        n, k, total, sq = _sums(values)
        v = got[name]
        assert (v.customers, v.converting_customers) == (n, k)
        w = wilson(k, n)
        assert _iv(v.conversion_rate) == pytest.approx((k / n, w.low, w.high))
        mean, var, low, high = _mean_ci(total, sq, n)
        assert _iv(v.value_per_customer) == pytest.approx((mean, low, high))
        rates[name] = (n, k / n, mean, var)
    assert not got["holdout"].HasField("difference_to_holdout")
    (na, pa, ma, va), (nh, ph, mh, vh) = rates["A"], rates["holdout"]
    d = got["A"].difference_to_holdout
    se = math.sqrt(pa * (1 - pa) / na + ph * (1 - ph) / nh)
    assert _iv(d.conversion_rate) == pytest.approx((pa - ph, pa - ph - Z * se, pa - ph + Z * se))
    se = math.sqrt(va / na + vh / nh)
    assert _iv(d.value_per_customer) == pytest.approx((ma - mh, ma - mh - Z * se, ma - mh + Z * se))
    # Unattributed, by product, of every placement: k2 + k7 (VOICE3), k5 + k6 + k8 (DATA5)
    assert [(u.product, u.conversions, u.value) for u in s.unattributed] == [("DATA5", 3, 15.0), ("VOICE3", 2, 8.0)]
    # The default period, the last 30 days, holds all of it; a period after the decisions none.
    assert default_period.conversions == s.conversions and default_period.unattributed == s.unattributed
    assert not empty.conversions and not empty.unattributed

    assert main(["stats", "app", "--target", served.target, "--since", str(T0 - 2 * H)]) == 0
    out = capsys.readouterr().out
    table = out.split("conversions (from billing)", 1)[1]
    a_row = next(line for line in table.splitlines() if line.startswith("A "))
    assert a_row.split()[:4] == ["A", str(na), "2", f"{pa:.4f}"]
    assert f"{ma:.2f}" in a_row
    assert "difference to the holdout" in table and f"rate {pa - ph:+.4f}" in table and f"value/customer {ma - mh:+.2f}" in table
    assert "DATA5" in table and "15.00" in table


def test_get_stats_refuses_an_empty_period(served: ServerThread, clock: FakeClock) -> None:
    with served.client() as c, pytest.raises(grpc.RpcError) as e:
        c.stats("app", since=clock(), until=clock() - 1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "start_time: must be before end_time" in str(e.value.details())
