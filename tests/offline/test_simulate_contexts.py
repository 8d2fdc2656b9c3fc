"""``nextbest simulate --context``: what the channels send (full, channel only, + stored profile,
+ profile and history), the customer base exported as a warehouse extract, and runs on an
in-process server whose clock follows the simulated days."""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nextbest.bandit.sim.scenario import load_scenario
from nextbest.bandit.sim.telecom import CONTEXTS, TelecomSim, request_features
from nextbest.cli import simulate
from nextbest.cli.simulate import SIM_EPOCH, export_profiles, main
from nextbest.storage.sql import open_store

DEFAULT = load_scenario()


def _args(context: str, events: int, *more: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nextbest")
    simulate.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["simulate", "--local", "--context", context, "--events", str(events), "--progress-every", "100000", *more])


def test_the_cli_names_the_simulators_modes() -> None:
    assert simulate.CONTEXT_MODES == CONTEXTS  # the CLI starts without numpy: its own copy


def test_the_export_has_one_row_per_customer_with_its_day_0_profile(tmp_path: Path) -> None:
    sim = TelecomSim(DEFAULT, seed=5)
    path = tmp_path / "profiles.parquet"
    assert export_profiles(sim, path) == DEFAULT.customers.count
    table = pq.read_table(path)
    assert table.num_rows == DEFAULT.customers.count
    names = list(sim.profile(0))
    assert table.column_names == ["customer_id", "as_of", *(f"customer.{n}" for n in names)]
    assert "channel" not in names and {"plan", "arpu", "days_since_recharge", "lapse"} <= set(names)
    rows = table.to_pylist()
    assert len({r["customer_id"] for r in rows}) == len(rows)
    for c in (0, 1, 777, len(rows) - 1):
        row = rows[c]
        assert row["customer_id"] == sim.customer_id(c)
        assert row["as_of"].timestamp() == SIM_EPOCH
        assert {n: row[f"customer.{n}"] for n in names} == sim.profile(c, 0.0)
    assert pq.read_schema(path).field("customer.arpu").type == "double"
    assert pq.read_schema(path).field("customer.plan").type == "string"


def test_only_the_full_mode_sends_customer_features() -> None:
    sim = TelecomSim(DEFAULT, seed=2)
    for _ in range(200):
        v = sim.next_visit()
        assert request_features(v, "full") == v.features
        assert set(v.features) == {"customer", "visit", "history"}
        for mode in ("channel", "channel+history", "profile", "profile+history"):
            assert request_features(v, mode) == {"visit": {"channel": v.channel}}
        sim.respond(v, v.arms[0])
    with pytest.raises(ValueError, match="context must be one of"):
        request_features(v, "everything")


def test_profile_modes_read_the_stored_profile_and_history_on_their_placements() -> None:
    specs = TelecomSim(DEFAULT, seed=1).placements()
    assert all(not p.context.profile and not p.context.history for p in simulate.context_specs(specs, "channel"))
    assert all(p.context.profile and not p.context.history for p in simulate.context_specs(specs, "profile"))
    assert all(not p.context.profile and len(p.context.history) == 2 for p in simulate.context_specs(specs, "channel+history"))
    both = simulate.context_specs(specs, "profile+history")
    assert all(p.context.profile and p.context.windows == [("7d", 7 * 86400.0), ("30d", 30 * 86400.0)] for p in both)


def test_a_profile_run_decides_on_loaded_profiles_and_history_in_simulated_days(tmp_path: Path) -> None:
    events = 200  # 0.4 simulated days; the extract is reloaded as of day 0.2
    sim = TelecomSim(DEFAULT, seed=3)
    args = _args("profile+history", events, "--profile-refresh", "0.2")
    with simulate.sim_server(3, db_dir=str(tmp_path)) as (target, clock, learned):
        board, _, _ = simulate._play(args, sim, simulate._specs(sim, args, args.context), target, clock, learned, "sim")
        assert learned("sim.app_home") > 0
        (db,) = tmp_path.glob("nextbest-local-*/nb.db")
        store = open_store(f"sqlite:///{db}")
        try:
            logged = [store.find_decision(f"sim-{i}") for i in range(events)]
        finally:
            store.close()
    assert len(board) == events
    day = 1 / DEFAULT.visits_per_day
    with_history = 0
    for i, d in enumerate(logged):
        assert d is not None
        assert d.customer_id.startswith("cust")
        assert d.timestamp == pytest.approx(SIM_EPOCH + i * day * 86400.0)  # the server's clock is the simulated one
        extract_day = 0.2 if i / DEFAULT.visits_per_day >= 0.2 else 0.0
        assert d.context.profile_as_of == pytest.approx(SIM_EPOCH + extract_day * 86400.0)
        assert "customer.plan" in d.context.profile_keys and "customer.arpu" in d.context.profile_keys
        names = {(ns, name) for ns, name, _ in d.features}
        assert ("visit", "channel") in names and ("customer", "plan") in names
        assert ("history", "offers_seen") not in names  # the simulator's own counts are not sent
        arm_names = {name for feats in d.context.arm_features for _, name, _ in feats}
        assert {"impressions_7d", "accepts_30d"} <= arm_names
        with_history += any(name == "impressions_30d" and v > 0 for feats in d.context.arm_features for _, name, v in feats)
    assert with_history > 0  # customers come back within the first simulated day


def test_compare_contexts_prints_a_markdown_table_and_its_command(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", "--compare-contexts", "channel,profile", "--seeds", "4", "--events", "60", "--window", "30"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| what the channels send | all 60 events | last 30 | IVR, all events | USSD, all events |" in out
    assert "channel and customer id only (`channel`)" in out and "+ stored profile (`profile`)" in out
    assert "nextbest simulate --compare-contexts channel,profile --seeds 4 --events 60 --window 30" in out


def test_the_table_gives_mean_and_spread_over_seeds() -> None:
    runs = [
        {"context": "channel", "all": a, "last": b, "sim.ivr": 0.3, "sim.ussd_menu": 0.4}
        for a, b in ((0.40, 0.50), (0.44, 0.52), (0.42, 0.54))
    ]
    table = simulate.context_table(runs, ["channel"], 10_000, 5_000)
    assert "| all 10,000 events | last 5,000 |" in table
    assert "| channel and customer id only (`channel`) | 0.420 ± 0.020 | 0.520 ± 0.020 | 0.300 ± 0.000 | 0.400 ± 0.000 |" in table
