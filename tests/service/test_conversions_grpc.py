"""ReportConversions through real gRPC (issue #31): purchases from billing, keyed by customer and
product, credited to the right decisions (last touch, linear), within the window, only to
activated impressions; the audit and Explain agree; a reloaded file is all DUPLICATE; a hostile
item refuses its batch with nothing written; credited rewards are learned once, and LATE after
the decision's window. On a fake clock: no sleeps."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nextbest.bandit.attribution import Conversion, Credit
from nextbest.bandit.spec import PlacementSpec
from nextbest.cli.main import explain_table, main
from nextbest.client import NextbestClient
from nextbest.rpc.auth import hash_token
from nextbest.v1 import decision_pb2
from tests.harness import ADMIN_TOKEN, CHANNEL_TOKEN, TOKENS, FakeClock, ServerThread, running_server, token_client, until

H, D = 3600.0, 86400.0
# The fake clock starts three hours before the real one: the CLI checks a file's times against
# the real clock (none in the future), the server against the fake one.
T0 = float(int(time.time() - 3 * H))
DATA_TOKEN = "billing-2c7e9f0a1b3d"


def _placement(pid: str, window: str, model: str, reward_window: str, **kw: object) -> PlacementSpec:
    """Two arms: ``data`` sells the product DATA5, ``voice`` VOICE3; rewards of a decision summed."""
    data: dict[str, object] = {
        "id": pid,
        "arms": [
            {"id": f"{pid}_data", "features": {"category": "data"}, "products": ["DATA5"]},
            {"id": f"{pid}_voice", "features": {"category": "voice"}, "products": ["VOICE3"]},
        ],
        "attribution": {"window": window, "model": model},
        "reward_window": reward_window,
        "reward_aggregation": "sum",
    }
    data.update(kw)
    return PlacementSpec.model_validate(data)


APP = _placement("app", "2d", "last_touch", "3d")
USSD = _placement("ussd", "3d", "linear", "4d")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def served(any_db: str, clock: FakeClock) -> Iterator[ServerThread]:
    with running_server(any_db, clock, sweep_interval=60) as s:  # the test sweeps
        s.call(s.engine.config.apply([APP, USSD]))
        yield s


def _show(c: NextbestClient, placement: str, arm: str, customer: str, defer: bool = False) -> str:
    """A decision of ``placement`` serving ``arm`` (the other excluded) to ``customer``."""
    other = {"data": "voice", "voice": "data"}[arm]
    d = c.choose(placement, {"segment": "youth"}, customer_id=customer, exclude_arms=[f"{placement}_{other}"], defer_activation=defer)
    assert d.arm_id == f"{placement}_{arm}"
    return d.event_id


def _conv(cid: str, customer: str, at: float, value: float = 10.0, product: str = "DATA5", arm_id: str = "") -> Conversion:
    return Conversion(cid, customer, arm_id, "" if arm_id else product, value, at)


def _credits(reports: list) -> list[tuple[str, str, float, float]]:  # type: ignore[type-arg]
    return [(r.status, *((c.event_id, c.share, c.value) for c in r.credits)) for r in reports]


def test_a_purchase_is_credited_across_placements_by_last_touch_and_linear_within_the_window(
    served: ServerThread, clock: FakeClock
) -> None:
    s = served
    with s.client() as c:
        a1 = _show(c, "app", "data", "c1")  # T0
        clock.advance(1 * H)
        u1 = _show(c, "ussd", "data", "c1")  # T0+1h
        clock.advance(1 * H)
        other_customer = _show(c, "app", "data", "c2")  # T0+2h
        clock.advance(1 * H)
        other_arm = _show(c, "app", "voice", "c1")  # T0+3h
        clock.advance(1 * H)
        deferred = _show(c, "app", "data", "c1", defer=True)  # T0+4h: never activated
        clock.advance(2 * H)
        # T0+6h: the latest touch is on ussd (linear): split over both placements' touches
        before = _conv("k0", "c1", T0 - 1)  # before every impression: nobody caused it
        k1 = _conv("k1", "c1", clock() - 1, 10.0)
        r = c.report_conversions([before, k1])
        assert [x.status for x in r] == ["unattributed", "attributed"]
        assert r[1].credits == (Credit(a1, 0, "app", "app_data", 0.5, 5.0), Credit(u1, 0, "ussd", "ussd_data", 0.5, 5.0))
        clock.advance(1 * H)
        a5 = _show(c, "app", "data", "c1")  # T0+7h
        clock.advance(1 * H)
        # T0+8h: the latest touch is on app (last touch): all to it
        r = c.report_conversions([_conv("k2", "c1", clock(), 4.0)])
        assert (r[0].status, r[0].credits) == ("attributed", (Credit(a5, 0, "app", "app_data", 1.0, 4.0),))
        # T0+2.5d: app's 2-day window has passed its impressions; ussd's 3 days still hold u1
        clock.advance(2.5 * D - 8 * H)
        r = c.report_conversions([_conv("k3", "c1", clock(), 1.0), _conv("k4", "c1", clock(), 3.0, arm_id="app_voice")])
        assert (r[0].status, r[0].credits) == ("attributed", (Credit(u1, 0, "ussd", "ussd_data", 1.0, 1.0),))
        assert (r[1].status, r[1].credits) == ("unattributed", ())  # its impression (T0+3h) is out of app's window

        # The audit table and Explain agree, decision by decision; the others got nothing.
        audit = s.engine.store.credits_of_conversions(["k0", "k1", "k2", "k3", "k4"])
        assert {k: sorted(v, key=lambda x: x.event_id) for k, v in audit.items() if v} == {
            "k1": sorted(
                [Credit(a1, 0, "app", "app_data", 0.5, 5.0), Credit(u1, 0, "ussd", "ussd_data", 0.5, 5.0)], key=lambda x: x.event_id
            ),
            "k2": [Credit(a5, 0, "app", "app_data", 1.0, 4.0)],
            "k3": [Credit(u1, 0, "ussd", "ussd_data", 1.0, 1.0)],
        }
        explained = {
            e: [(x.conversion_id, x.share, x.value, x.occurred_at.ToSeconds()) for x in c.explain(e).conversions] for e in (a1, u1, a5)
        }
        assert explained == {
            a1: [("k1", 0.5, 5.0, int(T0 + 6 * H - 1))],
            u1: [("k1", 0.5, 5.0, int(T0 + 6 * H - 1)), ("k3", 1.0, 1.0, int(T0 + 2.5 * D))],
            a5: [("k2", 1.0, 4.0, int(T0 + 8 * H))],
        }
        for e in (other_customer, other_arm, deferred):
            assert list(c.explain(e).conversions) == []
        table = explain_table(c.explain(u1))
        assert "conversions credited (2):" in table and "k3" in table

        # Learned once: each decision's window closes with the sum of its credits, and a
        # conversion reported again (a retry, a reloaded file) changes nothing.
        again = c.report_conversions([k1, _conv("k2", "c1", T0 + 8 * H, 4.0)])
        assert [x.status for x in again] == ["duplicate", "duplicate"]
        assert again[0].credits == r_k1_credits(a1, u1)
        clock.advance(5 * D)
        s.call(s.engine.windows.sweep())
        until(lambda: s.engine.states["app"].model.learned == 4 and s.engine.states["ussd"].model.learned == 1)
        rows = {e: s.engine.store.find_decision(e) for e in (a1, u1, a5, other_customer, other_arm, deferred)}
        assert {e: (d.outcome.name, d.reward) for e, d in rows.items()} == {
            a1: ("REWARD", 5.0),
            u1: ("REWARD", 6.0),
            a5: ("REWARD", 4.0),
            other_customer: ("DEFAULT", 0.0),
            other_arm: ("DEFAULT", 0.0),
            deferred: ("NOT_ACTIVATED", None),
        }
        assert [x.status for x in c.report_conversions([k1])] == ["duplicate"]  # after the close too
        s.call(s.engine.windows.sweep())
        assert (s.engine.states["app"].model.learned, s.engine.states["ussd"].model.learned) == (4, 1)
        assert s.engine.store.find_decision(u1).reward == 6.0


def r_k1_credits(a1: str, u1: str) -> tuple[Credit, ...]:
    return (Credit(a1, 0, "app", "app_data", 0.5, 5.0), Credit(u1, 0, "ussd", "ussd_data", 0.5, 5.0))


def test_a_retry_after_a_crash_between_the_commit_and_the_rewards_completes_them(served: ServerThread, clock: FakeClock) -> None:
    s = served
    with s.client() as c:
        e = _show(c, "app", "data", "c5")
        clock.advance(H)
        conv = _conv("crash-1", "c5", clock() - 1, 3.0)
        credit = Credit(e, 0, "app", "app_data", 1.0, 3.0)
        # Committed with its credits; the server died before the rewards were stored.
        assert s.engine.store.record_conversions([(conv, [credit])], clock()) == [True]
        r = c.report_conversions([conv])  # the client's retry
        assert (r[0].status, r[0].credits) == ("duplicate", (credit,))
        assert [x.status for x in c.report_conversions([conv])] == ["duplicate"]  # and once more: no second reward
        clock.advance(5 * D)
        s.call(s.engine.windows.sweep())
        until(lambda: s.engine.states["app"].model.learned == 1)
        row = s.engine.store.find_decision(e)
        assert (row.outcome.name, row.reward) == ("REWARD", 3.0)


def test_a_conversion_after_the_decisions_window_closed_is_late_recorded_not_learned(any_db: str, clock: FakeClock) -> None:
    late = _placement("late", "7d", "last_touch", "1d")
    with running_server(any_db, clock, sweep_interval=60) as s, s.client() as c:
        s.call(s.engine.config.apply([late]))
        e = _show(c, "late", "data", "c9")
        clock.advance(2 * D)  # its reward window (1 day) is over; the attribution window (7 days) is not
        r = c.report_conversions([_conv("late-1", "c9", clock() - H, 7.0)])
        assert (r[0].status, r[0].credits) == ("attributed", (Credit(e, 0, "late", "late_data", 1.0, 7.0),))
        s.call(s.engine.windows.sweep())
        until(lambda: s.engine.states["late"].model.learned == 1)  # the default reward, once
        row = s.engine.store.find_decision(e)
        assert (row.outcome.name, row.reward) == ("DEFAULT", 0.0)
        assert sum(a.late_rewards for a in c.stats("late").arms) == 1  # recorded, counted, not learned
        assert [x.status for x in c.report_conversions([_conv("late-1", "c9", clock() - H, 7.0)])] == ["duplicate"]
        assert sum(a.late_rewards for a in c.stats("late").arms) == 1
        assert s.engine.states["late"].model.learned == 1


def test_a_hostile_item_refuses_its_batch_naming_the_field_and_nothing_is_written(served: ServerThread, clock: FakeClock) -> None:
    s = served
    now = clock()
    good = _conv("good-1", "c1", now - H)
    hostile = {
        "product": _conv("h", "c1", now, product="NO_SUCH_SKU"),
        "arm_id": _conv("h", "c1", now, arm_id="no_such_arm"),
        "occurred_at": _conv("h", "c1", now + 2 * D),
        "value": _conv("h", "c1", now, value=math.nan),
        "customer_id": _conv("h", "c\x001", now),
    }
    with s.client() as c:
        for field, bad in hostile.items():
            with pytest.raises(grpc.RpcError) as e:
                c.report_conversions([good, bad])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (e.value.details() or "").startswith(f"conversions[1].{field}"), e.value.details()
        more = [
            ("occurred_at", _conv("h", "c1", now - 400 * D)),  # ancient
            ("value", _conv("h", "c1", now, value=1e300)),
            ("conversion_id", _conv("x" * 100_000, "c1", now)),
            ("product", Conversion("h", "c1", "app_data", "DATA5", 1.0, now)),  # both
            ("occurred_at", decision_pb2.Conversion(conversion_id="h", customer_id="c1", product="DATA5", value=1.0)),  # unset
        ]
        for field, bad in more:
            with pytest.raises(grpc.RpcError) as e:
                c.report_conversions([good, bad])  # type: ignore[list-item]
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (e.value.details() or "").startswith(f"conversions[1].{field}"), e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.report_conversions([good] * (s.settings.max_reward_batch + 1))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_reward_batch" in (e.value.details() or "")
        assert s.engine.store.credits_of_conversions(["good-1", "h"]) == {}  # neither stored
        # nothing of the refused batches was stored: the good one is new now
        assert [x.status for x in c.report_conversions([good])] == ["unattributed"]
        assert [x.status for x in c.report_conversions([good])] == ["duplicate"]


def test_a_billing_file_loads_through_the_cli_and_a_reload_is_all_duplicate(
    served: ServerThread, clock: FakeClock, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = served
    with s.client() as c:
        a = _show(c, "app", "data", "31612345678")
        clock.advance(H)
        u = _show(c, "ussd", "voice", "31612345678")
    clock.advance(H)
    path = tmp_path / "billing.csv"
    path.write_text(
        "conversion_id,customer_id,product,arm_id,value,occurred_at\n"
        f"inv-1,31612345678,DATA5,,9.5,{T0 + 30 * 60:.0f}\n"
        f"inv-2,31612345678,,ussd_voice,2,{T0 + 90 * 60:.0f}\n"
        f"inv-3,31699999999,VOICE3,,1.25,{T0 + 90 * 60:.0f}\n"
    )
    assert main(["conversions", "load", str(path), "--target", s.target]) == 0
    out = capsys.readouterr().out
    assert "3 rows read" in out and "2 attributed (2 credits), 1 unattributed, 0 duplicate" in out, out
    audit = s.engine.store.credits_of_conversions(["inv-1", "inv-2", "inv-3"])
    assert [(x.event_id, x.value) for x in audit["inv-1"]] == [(a, 9.5)]
    assert [(x.event_id, x.value) for x in audit["inv-2"]] == [(u, 2.0)]
    assert main(["conversions", "load", str(path), "--target", s.target]) == 0
    assert "0 attributed (0 credits), 0 unattributed, 3 duplicate" in capsys.readouterr().out

    bad = tmp_path / "bad.csv"
    bad.write_text(f"conversion_id,customer_id,product,value,occurred_at\ninv-9,c1,DATA5,1,{T0:.0f}\ninv-10,c1,NO_SUCH,1,{T0:.0f}\n")
    assert main(["conversions", "load", str(bad), "--target", s.target]) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "'product'" in err and "nothing was stored" in err, err
    assert not s.engine.store.credits_of_conversions(["inv-9"]).get("inv-9")
    assert main(["conversions", "load", str(bad), "--db", "sqlite:///x.db"]) == 2
    assert "through a running server" in capsys.readouterr().err


def test_conversions_are_reported_with_the_data_or_admin_role_not_the_channel_role(db_url: str, clock: FakeClock) -> None:
    tokens = f"{TOKENS}; billing:data:{hash_token(DATA_TOKEN)}"
    with running_server(db_url, clock, auth_tokens=tokens) as s:
        s.call(s.engine.config.apply([APP]))
        item = [_conv("r1", "c1", clock())]
        with token_client(s.target, CHANNEL_TOKEN) as c, pytest.raises(grpc.RpcError) as e:
            c.report_conversions(item)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with token_client(s.target, DATA_TOKEN) as c:
            assert [x.status for x in c.report_conversions(item)] == ["unattributed"]
        with token_client(s.target, ADMIN_TOKEN) as c:
            assert [x.status for x in c.report_conversions(item)] == ["duplicate"]


def test_a_parquet_extract_is_read_with_its_types_and_a_file_with_wrong_types_is_refused_naming_the_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nextbest.cli.conversions import read_conversions

    at = T0 + 90.5
    table = pa.table(
        {
            "conversion_id": ["inv-1", "inv-2"],
            "customer_id": pa.array([31612345678, 31699999999], pa.int64()),
            "product": ["DATA5", None],
            "arm_id": [None, "app_voice"],
            "value": pa.array([9.5, 2], pa.float32()),
            "occurred_at": pa.array([int(at * 1e6)] * 2, pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(table, tmp_path / "billing.parquet")
    [batch] = list(read_conversions(str(tmp_path / "billing.parquet")))
    assert batch.conversions == [
        Conversion("inv-1", "31612345678", "", "DATA5", 9.5, at),
        Conversion("inv-2", "31699999999", "app_voice", "", 2.0, at),
    ]
    cases = {
        "value": "conversion_id,customer_id,product,value,occurred_at\ninv-1,c1,DATA5,abc,{t}\n",
        "occurred_at": "conversion_id,customer_id,product,value,occurred_at\ninv-1,c1,DATA5,1,yesterday\n",
        "customer_id": "conversion_id,customer_id,product,value,occurred_at\ninv-1,,DATA5,1,{t}\n",
    }
    for column, text in cases.items():
        path = tmp_path / f"bad_{column}.csv"
        path.write_text(text.format(t=int(T0)))
        assert main(["conversions", "load", str(path), "--target", "127.0.0.1:1"]) == 2  # refused before any call
        err = capsys.readouterr().err
        assert f"column '{column}'" in err and "nothing was stored" in err, err
