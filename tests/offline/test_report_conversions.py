"""The report's "conversions (from billing)" table (issue #31): per variant, the holdout
included, customers, converting customers, rate and value per customer with 95 % intervals and
the difference to the holdout, counting every conversion of a decided customer; unattributed
conversions by product apart. The same figures as GetStats (tests/service/test_uplift_grpc.py);
the page's rendering in a browser is tests/offline/test_report.py's."""

from __future__ import annotations

import html as htmllib
import re
import warnings

from nextbest.bandit.attribution import Credit
from nextbest.bandit.offline.uplift import uplift
from nextbest.bandit.spec import PlacementSpec
from nextbest.offline.report import build_report
from nextbest.storage.base import PlacementRecord, VariantConversions
from nextbest.storage.sql import open_store
from tests.storage.test_conversion_store import conv, decision

T0 = 1_780_000_000.0


def _rows(page: str) -> list[list[str]]:
    section = page.split("<h2>Conversions (from billing)</h2>", 1)[1].split("<h2>", 1)[0]
    return [
        [htmllib.unescape(x) for x in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", section)
        if "<td" in row
    ]


def test_the_report_shows_conversions_per_variant_against_the_holdout(any_db: str) -> None:
    url = any_db
    store = open_store(url)
    spec = PlacementSpec.model_validate({"id": "app", "arms": [{"id": a} for a in ("data_5gb", "voice_300", "combo")]})
    store.save_placements([PlacementRecord(spec, {"data_5gb": 1, "voice_300": 1, "combo": 1})], [])
    store.write(
        [
            decision("e1", "a1", T0, variant="A"),
            decision("e2", "a2", T0 + 1, variant="A"),
            decision("e3", "a3", T0 + 2, variant="A"),
            decision("e4", "h1", T0 + 3, variant="holdout", activated=False),  # shown nothing
            decision("e5", "h2", T0 + 4, variant="holdout"),
        ],
        [],
    )
    store.record_conversions(
        [
            (conv("k1", "a1", 10.0, T0 + 100), [Credit("e1", 0, "app", "data_5gb", 1.0, 10.0)]),
            (conv("k2", "a1", 6.0, T0 + 200, product="VOICE3"), []),  # not shown voice: unattributed, counts
            (conv("k3", "a2", 4.0, T0 + 100), [Credit("e2", 0, "app", "data_5gb", 1.0, 4.0)]),
            (conv("k4", "h1", 5.0, T0 + 100), []),  # the holdout's purchase: what happens without offers
            (conv("k5", "h2", 9.0, T0 - 100), []),  # before h2's first decision: not counted
        ],
        now=T0 + 300,
    )
    store.close()
    # A: 3 customers buying 16, 4 and 0; the holdout: 2 customers buying 5 and 0
    a, h = uplift([VariantConversions("A", 3, 2, 20.0, 272.0), VariantConversions("holdout", 2, 1, 5.0, 25.0)])
    assert a.rate_difference is not None and a.value_difference is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no reward measured yet: sentences instead of empty charts, no library warns
        page = build_report(url, "app")
    assert "No measured reward yet: the chart appears" in page and "nothing to draw a learning curve" in page
    rows = _rows(page)
    assert rows[0] == [
        "A",
        "3",
        "2",
        "0.6667",
        f"[{a.rate.low:.4f}, {a.rate.high:.4f}]",
        "6.67",
        f"[{a.value.low:.2f}, {a.value.high:.2f}]",
        f"+0.1667 [{a.rate_difference.low:+.4f}, {a.rate_difference.high:+.4f}]",
        f"+4.17 [{a.value_difference.low:+.2f}, {a.value_difference.high:+.2f}]",
    ]
    assert rows[1][:4] == ["holdout", "2", "1", "0.5000"] and rows[1][5] == "2.50" and rows[1][-2:] == ["–", "–"]
    assert rows[2:] == [["SKU-1", "1", "5.00"], ["VOICE3", "1", "6.00"]]  # unattributed by product (k5 is before the period)
    assert "the holdout's purchases are what happens without offers" in htmllib.unescape(page)
