"""export-log --format parquet: DuckDB and pandas read it back, the README's SQL recipe equals the
replay, and the file is written in row groups."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.features import feature
from nextbest.bandit.offline.policies import parse_policy
from nextbest.bandit.offline.replay import evaluate
from nextbest.cli.main import main
from nextbest.offline.log_source import read_replay_log
from nextbest.storage.base import Close
from nextbest.storage.sql import open_store
from tests.harness import postgres_available, postgres_schema

# The README's recipe (section "Logs beyond one machine"), with the file and arm filled in.
RECIPE = """
WITH w AS (
  SELECT reward,
         CASE WHEN chosen_arm IS NULL THEN 0.0 ELSE (1.0 / len(arms)) / probability END AS w_uniform,
         CASE WHEN NOT list_contains(arms, $arm) THEN 1.0
              WHEN chosen_arm = $arm THEN 1.0 / probability ELSE 0.0 END AS w_constant
  FROM read_parquet($files)
)
SELECT avg(w_uniform * reward), sum(w_uniform * reward) / sum(w_uniform),
       avg(w_constant * reward), sum(w_constant * reward) / sum(w_constant)
FROM w
"""


def _log(n: int, seed: int = 5) -> tuple[list[LoggedDecision], list[Close]]:
    """Decisions of placement p over arms a, b, c (c not always eligible), some with two slots,
    some where pacing made no offer; every window closed long ago."""
    rng = np.random.default_rng(seed)
    decisions, closes = [], []
    for i in range(n):
        arms = ("a", "b", "c") if i % 3 else ("a", "b")
        p = rng.dirichlet(np.ones(len(arms)))
        paced = i % 17 == 5
        pmf = tuple(float(x) for x in (np.append(p * 0.7, 0.3) if paced else p))
        no_offer = paced and rng.random() < 0.3
        c = int(rng.choice(len(arms), p=p))
        base = LoggedDecision(
            event_id=f"e{i:05d}",
            placement="p",
            customer_id=f"c{i % 50}",
            timestamp=1.7e9 + i,
            features=(feature("customer", "segment", ("gold", "silver")[i % 2]), feature("customer", "arpu", float(i % 40))),
            arms=tuple((a, 1) for a in arms),
            pmf=pmf,
            chosen=None if no_offer else c,
            probability=0.3 if no_offer else pmf[c],
            model_version=i,
            deadline=1.7e9 + i + 600,
            outcome=Outcome.NO_ARM if no_offer else Outcome.OPEN,
        )
        decisions.append(base)
        if not no_offer:
            r = float(rng.random() < 0.2 + 0.2 * c)
            closes.append(Close(base.event_id, Outcome.REWARD if r else Outcome.DEFAULT, r, base.timestamp + 5))
        if i % 7 == 0 and not no_offer:  # a second slot over the arms left
            rest = tuple(a for j, a in enumerate(arms) if j != c)
            q = tuple(1.0 / len(rest) for _ in rest)
            decisions.append(replace(base, slot=1, arms=tuple((a, 1) for a in rest), pmf=q, chosen=0, probability=q[0]))
            closes.append(Close(base.event_id, Outcome.REWARD, 1.0, base.timestamp + 6, slot=1))
    return decisions, closes


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/log.db"
        return
    if not postgres_available():
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    with postgres_schema() as u:
        yield u


def _write(url: str, n: int) -> None:
    decisions, closes = _log(n)
    store = open_store(url)
    try:
        store.write(decisions, closes)
    finally:
        store.close()


def test_the_sql_recipe_over_the_parquet_export_equals_the_replay(url: str, tmp_path: Path) -> None:
    import duckdb
    import pandas as pd

    _write(url, 600)
    out = tmp_path / "log.parquet"
    assert main(["export-log", "--db", url, "--placement", "p", "--format", "parquet", "--out", str(out)]) == 0
    log = read_replay_log(url, "p")
    got = {
        (r.policy, r.estimate.estimator): r.estimate.value
        for r in evaluate(log, [parse_policy("uniform"), parse_policy("constant:c")], ["ips", "snips"])
    }
    row = duckdb.execute(RECIPE, {"files": str(out), "arm": "c"}).fetchone()
    assert row is not None
    sql = dict(zip([("uniform", "ips"), ("uniform", "snips"), ("constant:c", "ips"), ("constant:c", "snips")], row, strict=True))
    for key, value in got.items():
        assert math.isclose(sql[key], value, rel_tol=0, abs_tol=1e-9), (key, sql[key], value)
    frame = pd.read_parquet(out)
    assert len(frame) == log.n  # one row per decision and slot, the no-offer ones included
    assert frame["chosen_arm"].isna().sum() == int(np.count_nonzero(~log.offered)) > 0
    assert (frame["slot"] == 1).sum() > 0 and frame["decided_at"].dt.tz is not None
    first = frame.iloc[0]
    assert list(first["arms"]) == ["a", "b"] and first["features"][0]["namespace"] == "customer"


def test_the_export_is_written_in_row_groups(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from nextbest.offline.parquet_log import write_parquet

    decisions, _ = _log(250)
    path = tmp_path / "x.parquet"
    assert write_parquet(str(path), iter(decisions), row_group=100) == len(decisions)
    f = pq.ParquetFile(path)
    assert f.metadata.num_rows == len(decisions)
    assert f.num_row_groups == math.ceil(len(decisions) / 100)
