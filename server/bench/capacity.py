"""The figures of the capacity model (docs/performance.md) that the other phases do not measure: what the
database stores per decision and per reward, how fast the learner learns one placement, and how
many decision rows the database takes through the store's group commits.

Each runs in process (no gRPC): a server on a temporary SQLite file or a fresh PostgreSQL schema,
the benchmark's 20-arm placement, Choose and Reward through the servicer as the gRPC handlers call
it, and the store's own tables measured before and after (SQLite: ``dbstat``; PostgreSQL:
``pg_total_relation_size``, indexes and TOAST included).

    python -m nextbest.bench.capacity [--smoke] [--json out.json]
    nextbest bench --phases capacity
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, inspect, text

from nextbest.bench.inproc import NoContext, with_server
from nextbest.bench.procs import choose_pool, placement, postgres_schema, print_report

PID = "bench20"


def _tables(engine: Engine) -> dict[str, tuple[int, int]]:
    """Rows and bytes (table, its indexes and TOAST) of every table of the store."""
    out: dict[str, tuple[int, int]] = {}
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        names = inspect(conn).get_table_names()
        sizes: dict[str, int] = {}
        if sqlite:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            index_of = {r[0]: r[1] for r in conn.exec_driver_sql("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'")}
            for name, size in conn.exec_driver_sql("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
                table = index_of.get(name, name)
                sizes[table] = sizes.get(table, 0) + int(size)
        for name in names:
            rows = int(conn.execute(text(f'SELECT count(*) FROM "{name}"')).scalar_one())
            if not sqlite:
                size = int(conn.execute(text("SELECT pg_total_relation_size(:t)"), {"t": name}).scalar_one())
            else:
                size = sizes.get(name, 0)
            out[name] = (rows, size)
    return out


def _delta(after: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]], n: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, (rows, size) in after.items():
        r0, s0 = before.get(name, (0, 0))
        if rows != r0 or size != s0:
            out[name] = {"rows": (rows - r0) / n, "bytes": (size - s0) / n}
    return out


def footprint(db: str, n: int) -> dict[str, Any]:
    """Rows and bytes per decision (a Choose of 20 arms x 30 features) and per reward (its
    Reward, which under ``learn_at: reward`` closes the window at once), and the learner's rate
    on that placement: from the VW text the Choose left in memory (warm) and rebuilt from the log
    (cold, as after a restart)."""

    async def run(engine: Any) -> dict[str, Any]:
        from nextbest.rpc.decision import DecisionServicer
        from nextbest.v1 import decision_pb2

        await engine.config.apply([placement(PID, 20)])
        await engine.learner.stop()  # learning is timed on its own below
        servicer = DecisionServicer(engine.chooser, engine.windows, engine.reward_batch, engine.explainer, engine.metrics)
        ctx: Any = NoContext()
        reqs = choose_pool(PID)
        sql = engine.store.engine
        t0 = _tables(sql)
        ids = [(await servicer.Choose(reqs[i % len(reqs)], ctx)).event_id for i in range(n)]
        await asyncio.wait_for(engine.writer.flush(), 120)
        t1 = _tables(sql)
        for e in ids:
            await servicer.Reward(decision_pb2.RewardRequest(event_id=e, reward=1.0), ctx)
        await asyncio.wait_for(engine.writer.flush(), 120)
        t2 = _tables(sql)
        learner = engine.learner
        started = time.perf_counter()
        warm = await learner.catch_up(PID)
        warm_s = time.perf_counter() - started
        for pm in engine.states[PID].models.values():
            pm.cursor = 0  # learn the same rows again, from the log this time
        learner._lines.clear()
        started = time.perf_counter()
        cold = await learner.catch_up(PID)
        cold_s = time.perf_counter() - started
        return {
            "template": engine.store.find_decision(ids[0]),
            "db": sql.dialect.name,
            "decisions": n,
            "per_decision": _delta(t1, t0, n),
            "per_reward": _delta(t2, t1, n),
            "learned_warm": warm,
            "learn_warm_per_s": warm / warm_s if warm_s else 0.0,
            "learned_cold": cold,
            "learn_cold_per_s": cold / cold_s if cold_s else 0.0,
        }

    return asyncio.run(with_server(run, db))


def ingest(db: str, template: Any, n: int, writers: Sequence[int] = (1, 2), batch: int = 500) -> dict[str, Any]:
    """Decision rows per second that the database takes through the store's group commit
    (``Store.write`` of ``batch`` decisions, durable on return), from 1 and 2 writers at once,
    each with its own connection: the database's share of a decision's cost, without a server.
    ``template`` is a logged decision (``footprint``'s), copied under new event ids."""
    from nextbest.storage.sql import open_store

    out: dict[str, Any] = {"batch": batch}
    for k in writers:
        stores = [open_store(db) for _ in range(k)]
        per = n // k
        done = [0] * k

        threads = [threading.Thread(target=_write, args=(stores[j], template, f"ing{k}-{j}", per, batch, done, j)) for j in range(k)]
        started = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        seconds = time.perf_counter() - started
        for s in stores:
            s.close()
        out[str(k)] = {"rows": sum(done), "seconds": seconds, "rows_per_s": sum(done) / seconds}
    return out


def _write(store: Any, template: Any, prefix: str, count: int, batch: int, done: list[int], j: int) -> None:
    for lo in range(0, count, batch):
        rows = [replace(template, event_id=f"{prefix}-{lo + i}") for i in range(min(batch, count - lo))]
        store.write(rows, [])
        done[j] += len(rows)


def run(smoke: bool) -> dict[str, Any]:
    n, rows = (100, 1_000) if smoke else (5_000, 40_000)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="nextbest-bench-capacity-") as d:
        out["sqlite"] = footprint(f"sqlite:///{d}/fp.db", n)
        out["sqlite_ingest"] = ingest(f"sqlite:///{d}/fp.db", out["sqlite"].pop("template"), rows, writers=(1,))
    try:
        with postgres_schema("nbcap") as pg:
            out["postgres"] = footprint(pg, n)
            out["postgres_ingest"] = ingest(pg, out["postgres"].pop("template"), rows)
    except Exception as e:  # no PostgreSQL here: say so, keep the SQLite figures
        out["postgres_skipped"] = f"{e.__class__.__name__}: {e}"[:300]
    return out


def format_table(r: dict[str, Any]) -> str:
    lines = []
    for db in ("sqlite", "postgres"):
        if db not in r:
            continue
        f = r[db]
        for what in ("per_decision", "per_reward"):
            parts = ", ".join(f"{t} {v['rows']:.2f} rows {v['bytes']:,.0f} B" for t, v in sorted(f[what].items()))
            total = sum(v["bytes"] for v in f[what].values())
            lines.append(f"{db:<9}{what:<13}{total:>8,.0f} B  ({parts})")
        lines.append(f"{db:<9}{'learner':<13}{f['learn_warm_per_s']:>8,.0f}/s warm, {f['learn_cold_per_s']:,.0f}/s from the log")
    for key in ("sqlite_ingest", "postgres_ingest"):
        if key in r:
            for k, v in r[key].items():
                if k != "batch":
                    lines.append(f"{key:<22} {k} writer(s): {v['rows_per_s']:>8,.0f} decision rows/s")
    if "postgres_skipped" in r:
        lines.append(f"postgres skipped: {r['postgres_skipped']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    report = run(args.smoke)
    return print_report(report, format_table(report), args.json)


if __name__ == "__main__":
    sys.exit(main())
