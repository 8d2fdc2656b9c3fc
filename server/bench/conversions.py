"""Conversions from billing (issue #31) at speed: ReportConversions batches against the same
server's RewardBatch, and ``nextbest conversions load`` of a large Parquet extract.

One server (PostgreSQL where it answers, else SQLite) with a placement of 20 arms, each
listing a billing product, ``attribution: {window: 7d}`` (last touch) and the bench's
``learn_at: reward``: a credit is a reward that closes its decision at once, as a Reward does.

* ``batches``: per round, two fresh sets of decisions, one per customer (Choose from the load
  generator); the same number of items then goes as RewardBatch calls of 100 (one reward per
  decision: the ceiling) and as ReportConversions calls of 100 (one conversion per customer, by
  the product of the arm it was shown, each crediting that one decision), by the same
  closed-loop callers. Figures: items/s of each and their ratio, server CPU per item; the
  medians of the rounds, which alternate which goes first.
* ``file``: a Parquet extract of N conversions written in chunks (bounded memory), of which
  the first ones belong to customers with a decision (attributed) and the rest to customers
  never shown anything (unattributed, as most of a billing extract is); loaded by
  ``nextbest conversions load FILE --target`` in a process of its own: its rate and peak RSS
  (its VmHWM, sampled every 50 ms), against pyarrow reading the file and the batches' rate above.

    python -m nextbest.bench.conversions                    # FULL_ITEMS per round, FILE_ROWS
    python -m nextbest.bench.conversions --rows 1000000     # the issue's file size
    nextbest bench --phases conversions --conversion-rows 1000000
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nextbest.bench.load import CHOOSE, REWARD_BATCH, reward_batch_request, write_payloads
from nextbest.bench.profiles import read_rate, write_chunks

if TYPE_CHECKING:
    from nextbest.bench.phases import Limits, LoadRunner
    from nextbest.bench.procs import Workers
    from nextbest.bench.report import Report

MIB = 1024 * 1024
REPORT_CONVERSIONS = "/nextbest.v1.DecisionService/ReportConversions"
PID = "conv20"
ARMS = 20
BATCH = 100  # items per ReportConversions and per RewardBatch call
FULL_ITEMS, SMOKE_ITEMS = 3_000, 300  # items of each kind per round
FULL_ROUNDS, SMOKE_ROUNDS = 3, 1
FILE_ROWS, SMOKE_FILE_ROWS = 50_000, 2_000  # the file's rows: 1 M took 17 min on PostgreSQL here (docs/performance.md)
CHUNK = 100_000  # rows generated and written at a time


def product(j: int) -> str:
    return f"SKU{j:03d}"


def spec() -> Any:
    """The bench's 20-arm placement, each arm selling a product, attributed over 7 days."""
    from nextbest.bandit.spec import PlacementSpec
    from nextbest.bench.procs import placement

    data = placement(PID, ARMS).model_dump()
    for j, arm in enumerate(data["arms"]):
        arm["products"] = [product(j)]
    data["attribution"] = {"window": 7 * 86400.0, "model": "last_touch"}
    return PlacementSpec.model_validate(data)


# -- decisions and payloads --------------------------------------------------------------------


def every_call(runner: LoadRunner, method: str, calls: Sequence[bytes], name: str, **spec: Any) -> dict[str, Any]:
    """Each of ``calls`` sent once (closed loop, no warm-up), from one load worker."""
    path = str(runner.tmp / f"conv-{name}.bin")
    write_payloads(path, calls)
    run = {"method": method, "payloads": path, "mode": "closed", "exhaust": True, "warmup": 0.0, "seconds": 3600.0}
    return runner.run({**run, "max_requests": len(calls), **spec}, workers=1)


def decide(runner: LoadRunner, customers: Sequence[str], tag: str) -> list[str]:
    """One Choose per customer (client-chosen event ids); their event ids, in order."""
    from nextbest.bench.procs import choose_pool

    pool = choose_pool(PID)
    reqs = []
    for i, c in enumerate(customers):
        req = pool[i % len(pool)]
        req.customer_id = c
        reqs.append(req.SerializeToString())
    r = every_call(runner, CHOOSE, reqs, f"choose-{tag}", event_prefix=f"{tag}-")
    if r["errors"] or r["sent"] != len(reqs):
        raise RuntimeError(f"conversions: {r['errors']} of {len(reqs)} Chooses failed ({r.get('error_codes')})")
    prefix = r["parts"][0]["prefix"]
    return [f"{prefix}{i:012d}" for i in range(len(reqs))]


def shown(url: str, prefix: str) -> dict[str, str]:
    """customer_id -> the arm its decision served, for the customers whose ids start with ``prefix``."""
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            rows = c.execute(
                text("SELECT customer_id, arm_id FROM decisions WHERE customer_id LIKE :p AND arm_id IS NOT NULL"), {"p": prefix + "%"}
            ).all()
    finally:
        eng.dispose()
    return {r[0]: r[1] for r in rows}


def conversion_calls(arms: dict[str, str], tag: str, at: float) -> list[bytes]:
    """ReportConversionsRequests of BATCH conversions, one per customer, by its arm's product."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from nextbest.v1 import decision_pb2

    ts = Timestamp()
    ts.FromNanoseconds(int(at * 1e9))
    items = [
        decision_pb2.Conversion(
            conversion_id=f"{tag}-{i:09d}", customer_id=c, product=product(int(arm.rsplit("_", 1)[1])), value=4.99, occurred_at=ts
        )
        for i, (c, arm) in enumerate(sorted(arms.items()))
    ]
    return [
        decision_pb2.ReportConversionsRequest(conversions=items[i : i + BATCH]).SerializeToString()
        for i in range(0, len(items) - BATCH + 1, BATCH)
    ]


def closed_calls(runner: LoadRunner, method: str, calls: Sequence[bytes], tag: str) -> dict[str, Any]:
    """Every call once, by RewardBatch's closed-loop callers (phases.LoadRunner.rewards)."""
    r = every_call(runner, method, calls, tag, batch=BATCH, concurrency=max(2, 4 * runner.limits.reward_concurrency // BATCH))
    # RewardBatch counts LEARNED items; a ReportConversions call counts once (items checked in the database)
    # (and LoadRunner.run's CPU per request is per item there, per call here)
    items = r["ok"] if method == REWARD_BATCH else r["ok"] * BATCH
    r["items"] = items
    r["items_per_s"] = items / r["seconds"] if r["seconds"] > 0 else 0.0
    r["server_cpu_us_per_item"] = r["server_cpu_us"] if method == REWARD_BATCH else r["server_cpu_us"] / BATCH
    return r


def credited(url: str, prefix: str) -> tuple[int, int]:
    """(conversions stored, credits stored) of the conversions whose ids start with ``prefix``."""
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            n, k = c.execute(
                text("SELECT count(*), coalesce(sum(credited), 0) FROM conversions WHERE conversion_id LIKE :p"), {"p": prefix + "%"}
            ).one()
    finally:
        eng.dispose()
    return int(n), int(k)


def batches_round(runner: LoadRunner, url: str, items: int, k: int) -> dict[str, Any]:
    """One round: RewardBatch and ReportConversions of ``items`` each, on fresh decisions."""
    rw_ids = decide(runner, [f"rb{k}c{i:08d}" for i in range(items)], f"rb{k}")
    cv_customers = [f"cv{k}c{i:08d}" for i in range(items)]
    decide(runner, cv_customers, f"cv{k}")
    calls = conversion_calls(shown(url, f"cv{k}c"), f"inv{k}", time.time())
    reward_calls = [reward_batch_request([(e, 1.0) for e in rw_ids[i : i + BATCH]]) for i in range(0, len(rw_ids) - BATCH + 1, BATCH)]
    order = ("reward_batch", "conversions") if k % 2 == 0 else ("conversions", "reward_batch")
    out: dict[str, Any] = {"order": order}
    for kind in order:
        if kind == "reward_batch":
            out[kind] = closed_calls(runner, REWARD_BATCH, reward_calls, f"rb{k}")
        else:
            out[kind] = closed_calls(runner, REPORT_CONVERSIONS, calls, f"cv{k}")
    out["stored"], out["credits"] = credited(url, f"inv{k}-")
    return out


# -- the file ----------------------------------------------------------------------------------


def write_extract(path: Path, rows: int, arms: dict[str, str], at: float, seed: int = 0, chunk: int = CHUNK) -> int:
    """A billing extract of ``rows`` conversions written ``chunk`` rows at a time: first one for
    each customer of ``arms`` (by the product of the arm it was shown: attributed), then
    customers never decided (unattributed); returns the file's size in bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    decided = sorted(arms.items())
    products = pa.array([product(j) for j in range(ARMS)])
    at_us = int(at * 1e6)

    def table(lo: int, m: int) -> Any:
        idx = pa.array(np.arange(lo, lo + m))
        ids = pc.binary_join_element_wise("bill-", pc.utf8_lpad(pc.cast(idx, pa.string()), 10, "0"), "")
        customers = pc.binary_join_element_wise("u", pc.utf8_lpad(pc.cast(pa.array(rng.integers(0, 10**8, m)), pa.string()), 8, "0"), "")
        prods = products.take(pa.array(rng.integers(0, ARMS, m)))
        times = at_us - rng.integers(0, 86_400_000_000, m)
        mine = decided[lo : lo + m]
        if mine:  # this chunk's first rows: the decided customers, just after their decision
            k = len(mine)
            customers = pa.concat_arrays([pa.array([c for c, _ in mine]), customers.slice(k)])
            prods = pa.concat_arrays([pa.array([product(int(a.rsplit("_", 1)[1])) for _, a in mine]), prods.slice(k)])
            times[:k] = at_us
        return pa.table(
            {
                "conversion_id": ids,
                "customer_id": customers,
                "product": prods,
                "value": pa.array(np.round(rng.gamma(2.0, 3.0, m), 2)),
                "occurred_at": pa.array(times, pa.timestamp("us", tz="UTC")),
            }
        )

    return write_chunks(path, rows, chunk, table)


def load(path: Path, target: str, out_dir: Path, timeout: float = 7200) -> dict[str, Any]:
    """``nextbest conversions load FILE --target`` in a process of its own: rate, wall time, peak RSS."""
    from nextbest.bench.procs import run_child

    cmd = [sys.executable, "-m", "nextbest.cli.main", "conversions", "load", str(path), "--target", target]
    run = run_child(cmd, out_dir, "conv-load", timeout, env={**os.environ, "NEXTBEST_TOKEN": ""})
    text = run.stdout.decode(errors="replace")
    m = re.search(
        r"([\d,]+) rows read .*? in ([\d,]+) batch(?:es)?: ([\d,]+) attributed \(([\d,]+) credits?\), ([\d,]+) unattributed, "
        r"([\d,]+) duplicate; ([\d.]+) s",
        text,
    )

    def num(i: int) -> float:
        return float(m.group(i).replace(",", "")) if m else 0.0

    seconds = num(7) if m else run.wall_seconds
    return {
        "returncode": run.returncode,
        "stderr": run.stderr,
        "rows": int(num(1)),
        "batches": int(num(2)),
        "attributed": int(num(3)),
        "credits": int(num(4)),
        "unattributed": int(num(5)),
        "duplicate": int(num(6)),
        "seconds": seconds,
        "rows_per_s": num(1) / seconds if seconds > 0 else 0.0,
        "wall_seconds": run.wall_seconds,
        "rss_bytes": run.peak_rss or run.maxrss,
        "rusage_maxrss_bytes": run.maxrss,  # the spawning process's memory too (procs.ChildRun)
    }


def file_load(runner: LoadRunner, url: str, rows: int, attributed: int) -> dict[str, Any]:
    """Decide for ``attributed`` customers, write the extract, read it, load it."""
    decide(runner, [f"fl{i:08d}" for i in range(attributed)], "fl")
    arms = shown(url, "fl")
    path = runner.tmp / "conversions.parquet"
    t0 = time.perf_counter()
    size = write_extract(path, rows, arms, time.time())
    out: dict[str, Any] = {"rows": rows, "decided": len(arms), "file_bytes": size, "write_seconds": time.perf_counter() - t0}
    out["read"] = read_rate(path, batch_rows=1000)
    rss0 = runner.server.rss()
    out["load"] = load(path, runner.server.target, runner.tmp)
    out["server_rss_growth"] = runner.server.rss() - rss0
    path.unlink()
    return out


# -- the phase ---------------------------------------------------------------------------------


@contextmanager
def _database(postgres: bool, tmp: Path) -> Iterator[str]:
    if postgres:
        from nextbest.bench.procs import postgres_schema

        with postgres_schema() as url:
            yield url
    else:
        yield f"sqlite:///{tmp / 'conversions.db'}"


def run(workers: Workers, tmp: Path, lim: Limits, smoke: bool, postgres: bool, rows: int | None = None) -> dict[str, Any]:
    """Both parts on one server of their own; ``rows`` the file's size (default FILE_ROWS)."""
    from nextbest.bench.phases import LoadRunner
    from nextbest.bench.procs import start_nextbest
    from nextbest.client import NextbestClient

    items = SMOKE_ITEMS if smoke else FULL_ITEMS
    rounds = SMOKE_ROUNDS if smoke else FULL_ROUNDS
    rows = rows or (SMOKE_FILE_ROWS if smoke else FILE_ROWS)
    out: dict[str, Any] = {"backend": "postgres" if postgres else "sqlite", "batch": BATCH, "items": items}
    with _database(postgres, tmp) as url:
        server = start_nextbest(url)
        try:
            with NextbestClient(server.target, timeout=120) as nb:
                nb.apply([spec()])
            runner = LoadRunner(workers, server, tmp, lim)
            out["rounds"] = [batches_round(runner, url, items, k) for k in range(rounds)]
            out["file"] = file_load(runner, url, rows, min(items, rows))
        finally:
            server.stop()
    rs = out["rounds"]
    conv = statistics.median(r["conversions"]["items_per_s"] for r in rs)
    rb = statistics.median(r["reward_batch"]["items_per_s"] for r in rs)
    out["summary"] = {
        "conversions_per_s": conv,
        "reward_batch_per_s": rb,
        "ratio": statistics.median(r["conversions"]["items_per_s"] / max(r["reward_batch"]["items_per_s"], 1e-9) for r in rs),
        "conversions_cpu_us": statistics.median(r["conversions"]["server_cpu_us_per_item"] for r in rs),
        "reward_batch_cpu_us": statistics.median(r["reward_batch"]["server_cpu_us_per_item"] for r in rs),
    }
    return out


def add_to(rep: Report, r: dict[str, Any]) -> None:
    """The phase's figures in the bench report."""
    rep.phases["conversions"] = r
    s, f = r["summary"], r["file"]
    for rd in r["rounds"]:
        if rd["stored"] != rd["conversions"]["items"] or rd["credits"] != rd["stored"]:
            rep.note(f"conversions: {rd['stored']:,} stored with {rd['credits']:,} credits of {rd['conversions']['items']:,} sent")
    rep.add(
        "conversions.batches",
        f"ReportConversions of {r['batch']}, each crediting one decision ({r['backend']}; median of {len(r['rounds'])} rounds)",
        s["conversions_per_s"],
        "conversions/s",
        {"RewardBatch": s["reward_batch_per_s"]},
    )
    rep.add("conversions.cpu", "server CPU per conversion", s["conversions_cpu_us"], "us", {"RewardBatch": s["reward_batch_cpu_us"]})
    ld = f["load"]
    if ld["returncode"] != 0:
        rep.note(f"conversions load exited {ld['returncode']}: {ld['stderr'][-200:]}")
    rep.add(
        "conversions.load",
        f"conversions load, Parquet of {f['rows']:,} rows ({ld['attributed']:,} attributed) into {r['backend']}",
        ld["rows_per_s"],
        "rows/s",
        {"ReportConversions batches": s["conversions_per_s"], "pyarrow read": f["read"]["rows_per_s"]},
    )
    rep.add("conversions.rss", f"conversions load peak RSS ({f['file_bytes'] / MIB:,.0f} MiB file)", ld["rss_bytes"] / MIB, "MiB")


def format_table(r: dict[str, Any]) -> str:
    s, f = r["summary"], r["file"]
    ld = f["load"]
    return "\n".join(
        [
            f"conversions on {r['backend']}, batches of {r['batch']}, {r['items']:,} items of each kind per round, "
            f"{len(r['rounds'])} round(s), medians:",
            f"  ReportConversions {s['conversions_per_s']:,.0f}/s ({s['conversions_cpu_us']:,.0f} us server CPU each), "
            f"RewardBatch {s['reward_batch_per_s']:,.0f}/s ({s['reward_batch_cpu_us']:,.0f} us): {s['ratio']:.2f} x",
            f"  load of {f['rows']:,} rows ({f['file_bytes'] / MIB:,.1f} MiB; {ld['attributed']:,} attributed, {ld['unattributed']:,} "
            f"unattributed): {ld['rows_per_s']:,.0f} rows/s in {ld['seconds']:,.1f} s, peak RSS {ld['rss_bytes'] / MIB:,.0f} MiB; "
            f"pyarrow read {f['read']['rows_per_s']:,.0f}/s" + (f"; exit {ld['returncode']}" if ld["returncode"] else ""),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    from nextbest.bench.phases import FULL, SMOKE
    from nextbest.bench.procs import Workers, postgres_available, print_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, help=f"conversions in the file (default {FILE_ROWS:,}; smoke {SMOKE_FILE_ROWS:,})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes")
    parser.add_argument("--no-postgres", dest="no_postgres", action="store_true", help="SQLite even if PostgreSQL answers")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    args = parser.parse_args(argv)
    workers = Workers(1)
    try:
        with tempfile.TemporaryDirectory(prefix="nextbest-bench-conversions-") as d:
            pg = not args.no_postgres and postgres_available()
            r = run(workers, Path(d), SMOKE if args.smoke else FULL, args.smoke, pg, args.rows)
    finally:
        workers.close()
    return print_report(r, format_table(r), args.json)


if __name__ == "__main__":
    sys.exit(main())
