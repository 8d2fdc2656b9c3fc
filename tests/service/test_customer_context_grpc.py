"""Issue #30 end to end through real gRPC, on SQLite and PostgreSQL: profiles loaded from a
Parquet file with ``nextbest profiles load`` are used by Choose for customers whose requests
carry only their id; a rule on a profile feature and a rule on a history feature hold for every
served arm over random requests; the log, both exports and Explain show the values used with
their source, and a profile updated after a decision does not change that decision's record."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nextbest.bandit.spec import PlacementSpec
from nextbest.cli.main import main as cli
from nextbest.storage.base import Profile
from nextbest.v1 import decision_pb2
from tests import envs
from tests.harness import FakeClock, running_server

DAY = 86400.0
CUSTOMERS = 60


def _placement() -> PlacementSpec:
    arms = []
    for a in envs.ARMS:
        rule: dict[str, object] = {"feature": "history.accepts_30d", "eq": 0}  # not if they took it in 30 days
        if a == "device_5g":
            rule = {"all": [rule, {"feature": "customer.plan", "eq": "postpaid"}]}  # postpaid only
        arms.append({"id": a, "features": {"category": envs.CATEGORY[a]}, "eligible": rule})
    return envs.placement("ivr_menu", arms=arms, context={"profile": True, "history": ["7d", "30d"]}, fallback_arm=None)


def _extract(path: Path, as_of: float) -> dict[str, dict[str, object]]:
    rng = random.Random(5)
    rows = {
        f"tel:{i}": {"customer.plan": rng.choice(["postpaid", "prepaid"]), "customer.arpu": round(rng.uniform(3, 60), 2)}
        for i in range(CUSTOMERS)
    }
    table = pa.table(
        {
            "customer_id": list(rows),
            "as_of": [as_of] * len(rows),
            "customer.plan": [r["customer.plan"] for r in rows.values()],
            "customer.arpu": [r["customer.arpu"] for r in rows.values()],
        }
    )
    pq.write_table(table, path)
    return rows


def test_profiles_and_history_decide_and_are_logged_as_used(any_db: str, tmp_path: Path) -> None:
    clock = FakeClock()
    extract, as_of = tmp_path / "profiles.parquet", clock() - DAY
    truth = _extract(extract, as_of)
    rng = random.Random(11)
    with running_server(any_db, clock, seed="context-test") as server:
        assert cli(["profiles", "load", str(extract), "--target", server.target]) == 0
        with server.client() as nb:
            nb.apply([_placement()])
            stored = nb.placement("ivr_menu").context
            assert stored.profile and stored.history == [7 * DAY, 30 * DAY]
            taken: dict[tuple[str, str], float] = {}  # (customer, arm) -> when it was accepted
            served: list[tuple[str, str, str]] = []  # (event, customer, arm)
            for _ in range(240):
                clock.advance(rng.uniform(60, 4 * 3600))
                customer = f"tel:{rng.randrange(CUSTOMERS + 10)}"  # ten without a profile
                d = nb.choose("ivr_menu", customer_id=customer)  # the channel knows the number only
                if not d.arm_id:
                    continue
                served.append((d.event_id, customer, d.arm_id))
                profile = truth.get(customer)
                if d.arm_id == "device_5g":  # the profile rule: postpaid customers only
                    assert profile is not None and profile["customer.plan"] == "postpaid", customer
                when = taken.get((customer, d.arm_id))
                assert when is None or clock() - when >= 30 * DAY, (customer, d.arm_id)  # the history rule
                if rng.random() < 0.4:
                    nb.reward(d.event_id, 1.0)
                    taken[(customer, d.arm_id)] = clock()
                else:
                    nb.reward(d.event_id, 0.0)
            assert len(served) > 150 and {a for _, _, a in served} >= {"device_5g", "data_5gb"}
            assert any(c not in truth for _, c, _ in served)  # customers without a profile are served too

            # The log keeps what was used: the profile's values and as_of, each arm's history.
            event, customer, arm = next((e, c, a) for e, c, a in served if c in truth and a == "device_5g")
            explained = nb.explain(event)
            sources = {f"{f.feature.namespace}.{f.feature.name}": f.source for f in explained.features}
            assert sources == {"customer.plan": decision_pb2.FEATURE_SOURCE_PROFILE, "customer.arpu": decision_pb2.FEATURE_SOURCE_PROFILE}
            values = {f"{f.feature.namespace}.{f.feature.name}": f.feature.text or f.feature.number for f in explained.features}
            assert values == truth[customer]
            assert explained.profile_as_of.ToNanoseconds() / 1e9 == as_of
            assert all(a.history for a in explained.arms if a.eligible)
            assert all(f.namespace == "history" for a in explained.arms for f in a.history)

            # A profile updated after the decision changes nothing of it.
            nb.put_profiles([Profile(customer, (("customer", "plan", "prepaid"), ("customer", "arpu", 1.0)), clock())])
            again = nb.explain(event)
            assert {f"{f.feature.namespace}.{f.feature.name}": f.feature.text or f.feature.number for f in again.features} == truth[
                customer
            ]

    # Both exports carry the values as used, and where they came from.
    dsjson, parquet = tmp_path / "log.dsjson", tmp_path / "log.parquet"
    assert cli(["export-log", "--db", any_db, "--placement", "ivr_menu", "--out", str(dsjson)]) == 0
    assert cli(["export-log", "--db", any_db, "--placement", "ivr_menu", "--format", "parquet", "--out", str(parquet)]) == 0
    line = next(json.loads(x) for x in dsjson.read_text().splitlines() if json.loads(x)["EventId"] == event)
    assert line["c"]["U"] == {f"customer.plan={truth[customer]['customer.plan']}": 1, "customer.arpu": truth[customer]["customer.arpu"]}
    assert sorted(line["_nb"]["extra"]["context"]["profile_keys"]) == ["customer.arpu", "customer.plan"]
    assert any("history.accepts_30d" in json.dumps(action) for action in line["c"]["_multi"])
    rows = pq.read_table(parquet).to_pylist()
    row = next(r for r in rows if r["event_id"] == event)
    assert sorted(row["profile_keys"]) == ["customer.arpu", "customer.plan"]
    assert row["arm_features"] and all(f["namespace"] == "history" for fs in row["arm_features"] for f in fs)
