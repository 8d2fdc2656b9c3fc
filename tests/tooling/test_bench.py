"""The benchmark keeps working: its smoke mode runs every phase end to end.

No figure is asserted against a time: timings belong to the benchmark's report, not to tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nextbest.bench.report import Report
from tests.harness import ROOT

# Floods and throughput: run alone after the parallel part of scripts/test (pyproject's serial marker).
pytestmark = pytest.mark.serial

PHASES = (
    "vw",
    "server_time",
    "reward_inproc",
    "echo",
    "partial",
    "choose",
    "latency",
    "reward",
    "memory",
    "replay",
    "capacity",
    "profiles",
)


def _numbers(d: Any) -> list[float]:
    if isinstance(d, bool):
        return []
    if isinstance(d, int | float):
        return [float(d)]
    if isinstance(d, dict):
        return [x for v in d.values() for x in _numbers(v)]
    if isinstance(d, list):
        return [x for v in d for x in _numbers(v)]
    return []


def _run(tmp_path: Path, *args: str, timeout: float) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "nextbest.bench.main", *args, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "figure" in r.stdout and "ratio to ceiling" in r.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    return data


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One smoke run of every phase, read by each phase's test below: no phase runs twice."""
    return _run(tmp_path_factory.mktemp("smoke"), "--smoke", timeout=190)


@pytest.mark.timeout(200)
def test_smoke_run_reports_every_phase_with_numbers(smoke: dict[str, Any]) -> None:
    data = smoke
    assert data["meta"]["mode"] == "smoke"
    for phase in PHASES:
        assert phase in data["phases"], phase
        body = data["phases"][phase]
        if "skipped" in body:
            assert phase == "replay", f"{phase} skipped: {body['skipped']}"
            continue
        assert _numbers(body), phase
    figures = {f["key"]: f for f in data["figures"]}
    for key in (
        "echo.choose",
        "echo.reward",
        "partial.parse",
        "partial.decode",
        "choose.sqlite.20.loop_cpu",
        "choose.sqlite.5",
        "choose.sqlite.20",
        "choose.sqlite.100",
        "latency.20.80%.p99",
        "reward.sqlite",
        "vw.20.predict",
        "vw.20.learn",
        "server_time.20.besides_vw",
        "memory.default.rss_1",
        "memory.tuned.rss_target",
        "replay.db",
        "replay.dsjson",
        "replay.vw.db",
        "capacity.sqlite.per_decision",
        "capacity.sqlite.learner",
        "capacity.sqlite_ingest.1",
    ):
        assert key in figures, key
        assert math.isfinite(figures[key]["value"]), key
    # each figure with a ceiling carries its ratio to it
    assert all(set(f["ratios"]) == set(f["ceilings"]) for f in data["figures"])
    assert figures["choose.sqlite.20"]["ceilings"]["echo"] > 0
    for kind in ("parse", "decode"):  # the partial Choose servers answer every call
        run = data["phases"]["partial"][kind]
        assert run["ok"] > 0 and run["errors"] == 0, run
    replay = data["phases"]["replay"]  # the replay at scale, smoke sizes: every scenario ran
    assert replay["db"]["events"] == replay["db"]["select_rows"] == 2_000 - 2_000 // 50  # the open ones are not replayed
    assert replay["dsjson"]["events"] == replay["dsjson"]["lines"] == 1_000
    for size, run in replay["rss"].items():
        assert run["returncode"] == 0 and run["events"] > 0.95 * int(size) and 20 < run["rss_bytes"] / 2**20 < 1000, run
    for source in ("db", "dsjson"):
        assert replay["vw"][source]["events"] > 450 and 0.0 < replay["vw"][source]["ratio"] < 1.5, replay["vw"][source]
    capacity = data["phases"]["capacity"]
    assert capacity["sqlite"]["per_decision"]["decisions"]["rows"] == 1.0 and capacity["sqlite"]["learned_warm"] == 100
    # the p99 target's point is run several times, each run kept
    assert len(data["phases"]["latency"]["20@80%"]["runs"]) == 3
    assert len(data["phases"]["latency"]["20@50%"]["runs"]) == 1


def _paced(p50: float, p95: float, p99: float) -> dict[str, Any]:
    return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "rate": 100.0, "dropped": 0, "errors": 0}


def test_latency_at_the_target_point_is_judged_on_the_median_run() -> None:
    rep = Report(smoke=True)
    runs = [(_paced(1, 4, 6), _paced(1, 2, 4)), (_paced(2, 20, 61), _paced(1, 2, 5)), (_paced(1, 5, 12), _paced(1, 2, 3))]
    rep.latency(20, 0.8, 100.0, runs)
    figures = {f.key: f for f in rep.figures}
    p99 = figures["latency.20.80%.p99"]
    assert (p99.value, p99.ceilings, p99.met) == (12.0, {"echo": 3.0}, False)  # the median run, with its own echo
    assert figures["latency.20.80%.p95"].value == 5.0  # the same run's
    assert "the run with the median p99 of 3" in p99.label
    assert any("6.0 / 61.0 / 12.0 ms" in n for n in rep.notes)
    rep.latency(20, 0.8, 100.0, runs[:2])  # of two, the higher (never the kinder) middle
    assert rep.figures[-1].value == 61.0 and rep.figures[-1].met is False
    rep.latency(20, 0.8, 100.0, runs[:1])
    assert rep.figures[-1].value == 6.0 and rep.figures[-1].met is True and "median" not in rep.figures[-1].label


def test_phase_names_are_checked() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "nextbest.bench.main", "--phases", "vw,nope"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "nope" in r.stderr


@pytest.mark.bench
@pytest.mark.timeout(1200)
def test_full_benchmark(tmp_path: Path) -> None:
    data = _run(tmp_path, timeout=1100)
    assert data["meta"]["mode"] == "full"
    assert {"choose", "latency", "reward", "memory"} <= set(data["phases"])


@pytest.mark.timeout(200)  # runs the module's smoke run if no test did before
def test_smoke_overload_phase_reports_shed_share_and_accepted_latency(smoke: dict[str, Any]) -> None:
    """Fails on the code before the overload phase: the smoke run had no overload phase."""
    data = smoke
    body = data["phases"]["overload"]
    assert {"saturation", "unloaded", "flood", "unshed"} <= set(body)
    figures = {f["key"]: f for f in data["figures"]}
    for key in ("overload.accepted.p99", "overload.shed_share", "overload.accepted.rate"):
        assert key in figures, key
    assert set(figures["overload.accepted.p99"]["ceilings"]) == {"p99 at 50 % load", "no shedding p99"}
    assert 0.0 <= figures["overload.shed_share"]["value"] <= 1.0


@pytest.mark.timeout(200)  # runs the module's smoke run if no test did before
def test_smoke_profiles_phase_reports_load_rate_and_peak_memory(smoke: dict[str, Any]) -> None:
    """nextbest profiles load of a generated Parquet extract (the smoke size, 2,000 rows), in a process of its own."""
    data = smoke
    body = data["phases"]["profiles"]
    load = body["sizes"]["2000"]["load"]
    assert load["returncode"] == 0, load["stderr"]
    assert load["rows"] == 2000 and load["stored"] == 2000 and load["rss_bytes"] > 0
    figures = {f["key"]: f for f in data["figures"]}
    assert {"profiles.load.2000", "profiles.rss.2000"} <= set(figures)
    assert "pyarrow read" in figures["profiles.load.2000"]["ceilings"]
    if body["backend"] == "postgres":
        assert "plain COPY" in figures["profiles.load.2000"]["ceilings"]


@pytest.mark.timeout(200)  # runs the module's smoke run if no test did before
def test_smoke_context_phase_compares_profiled_choose_with_plain(smoke: dict[str, Any]) -> None:
    """Fails on the code before the context phase (issue #30): the smoke run had no context phase."""
    data = smoke
    many = data["phases"]["context"]["sqlite"]["many"]
    for name in ("plain", "inline", "profiled"):  # every server answered
        assert many[name]["rate"] > 0, (name, many[name])
    assert many["hit_rate"] < 0.05  # every request a customer the cache has not read lately
    figures = {f["key"]: f for f in data["figures"]}
    for what in ("rate", "p99", "server_cpu"):
        f = figures[f"context.sqlite.many.{what}"]
        assert set(f["ceilings"]) == {"without", "profile in the request"} and math.isfinite(f["value"]), f
    assert figures["context.sqlite.many.rate"]["target"] == ">= 0.8 x without"


def test_context_hit_rate_counts_reads_within_the_ttl() -> None:
    from nextbest.bench.context import hit_rate

    run = {"sent": 6, "ok": 4, "errors": 0, "seconds": 4.0}  # 2 warm-up, 4 measured; 1 s apart
    # a at 2 s: read at 0 s, a hit; a at 4 s: that read is 4 s old (a hit does not refresh it), a miss
    assert hit_rate(["a", "b", "a", "c", "a", "b"], run, warmup=2.0, ttl=2.5) == 0.25
    assert hit_rate(["a", "b", "c"], run, warmup=2.0, ttl=2.5) == 0.0  # each back after 3 s: expired


def test_conversions_extract_puts_the_decided_customers_first_and_is_written_in_chunks(tmp_path: Path) -> None:
    """The conversions phase's file (its smoke run, 26-31 s, runs only when named): the decided
    customers' conversions come first, by the product of the arm each was shown, at one time;
    the rest are other customers; every chunk is a row group."""
    import pyarrow.parquet as pq

    from nextbest.bench.conversions import write_extract

    path = tmp_path / "c.parquet"
    write_extract(path, 2_500, {"d1": "arm_003", "d0": "arm_017"}, 1_800_000_000.0, chunk=1_000)
    f = pq.ParquetFile(path)
    assert f.metadata.num_row_groups == 3
    t = f.read().to_pydict()
    assert len(set(t["conversion_id"])) == 2_500
    assert t["customer_id"][:2] == ["d0", "d1"] and t["product"][:2] == ["SKU017", "SKU003"]
    assert not {"d0", "d1"} & set(t["customer_id"][2:])
    assert [x.timestamp() for x in t["occurred_at"][:2]] == [1_800_000_000.0] * 2
    assert all(x.timestamp() < 1_800_000_000.0 for x in t["occurred_at"][2:])


@pytest.mark.timeout(200)
def test_smoke_http_phase_reports_http_choose_against_grpc_choose(tmp_path: Path) -> None:
    """HTTP/JSON Choose against gRPC Choose on one server (issue #32), smoke sizes: every call of
    both doors answered, and the throughput and p99 ratios reported with their target."""
    data = _run(tmp_path, "--smoke", "--phases", "http", timeout=190)
    body = data["phases"]["http"]
    for kind in ("saturation", "paced"):
        assert len(body["rounds"][kind]) == 3  # the smoke run's rounds, each a gRPC run then an HTTP one
        for door, run in (pair for r in body["rounds"][kind] for pair in zip(("grpc", "http"), r, strict=True)):
            assert run["ok"] > 0 and run["errors"] == 0 and run["dropped"] == 0, (door, kind, run)
        assert {body["grpc"][kind]["p99_ms"], body["http"][kind]["p99_ms"]} <= {run["p99_ms"] for r in body["rounds"][kind] for run in r}
    figures = {f["key"]: f for f in data["figures"]}
    for key in ("http.grpc.rate", "http.http.rate", "http.rate_ratio", "http.grpc.p99", "http.http.p99", "http.p99_ratio"):
        assert key in figures, key
        assert math.isfinite(figures[key]["value"]) and figures[key]["value"] > 0, figures[key]
    assert figures["http.http.rate"]["ceilings"] == {"gRPC": figures["http.grpc.rate"]["value"]}
    assert figures["http.rate_ratio"]["value"] == figures["http.http.rate"]["value"] / figures["http.grpc.rate"]["value"]
    assert figures["http.rate_ratio"]["target"] == ">= 0.5" and figures["http.http.rate"]["target"] == ">= 0.5 x gRPC"
    assert figures["http.p99_ratio"]["value"] == figures["http.http.p99"]["value"] / figures["http.grpc.p99"]["value"]
