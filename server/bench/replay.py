#!/usr/bin/env python3
"""Offline replay at the scale of a real log: speed as ratios to floors measured in the same
run, and peak memory as the log grows.

A synthetic placement's log is written into a temporary SQLite database (every PMF its own
softmax, so no two events share one; pacing's "no offer" in one event of 97; 2 % still open).
Then, each as ``nextbest replay`` runs it:

* ``db``: logged, uniform and constant:a with IPS and SNIPS, streamed from the database, against
  the bare ``sqlite3`` SELECT of the same rows in the same order (no replay can beat it);
* ``dsjson``: the same from the log's DSJSON export, against parsing that file with orjson alone;
  and from the same export rewritten by another writer (``json.dumps``: other key order and
  spacing), against parsing that file with orjson alone;
* ``rss``: peak resident memory of the ``nextbest replay`` process (``wait4``'s maxrss) at two
  sizes of the log, 1 M and 10 M events in the full run: flat if the replay streams;
* ``vw``: a ``vw:`` candidate (it learns every event in time order) on a placement of realistic
  size, against VW learning the same examples alone (VW's binding, parse + learn + finish: what
  VW does without any replay around it).

The replays run with one BLAS thread, as ``nextbest replay`` sets it (threadpoolctl, if installed).

Usage::

    python -m nextbest.bench.replay                  # full: 1 M / 10 M events, a few minutes
    python -m nextbest.bench.replay --smoke          # small, quick
    python -m nextbest.bench.replay --json out.json
    nextbest bench --phases replay                   # the same, in the benchmark's report
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import orjson

PLACEMENT = "offers"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    db_events: int  # the db and dsjson speed scenarios
    dsjson_events: int
    rss_events: tuple[int, int]  # peak memory at these two sizes of the log
    vw_events: int
    repeats: int


FULL = Sizes(db_events=1_000_000, dsjson_events=300_000, rss_events=(1_000_000, 10_000_000), vw_events=50_000, repeats=5)
SMOKE = Sizes(db_events=2_000, dsjson_events=1_000, rss_events=(1_000, 4_000), vw_events=500, repeats=1)

TARGETS = {"db_events_per_s": 300_000.0, "dsjson_vs_orjson": 0.5, "rss_mib": 500.0, "vw_vs_learn": 0.8}


# ------------------------------------------------------------------------------- the log


@dataclass(frozen=True)
class Shape:
    """A placement's size: its arms (each with ``arm_features`` features) and the context."""

    arms: int
    arm_features: int
    numeric: int  # context features that are numbers
    categorical: int  # ... and texts

    def arm_specs(self) -> list[dict[str, Any]]:
        out = []
        for j in range(self.arms):
            feats: dict[str, Any] = {"category": ("data", "voice", "tv", "device", "loyalty")[j % 5]}
            for k in range(1, self.arm_features):
                feats[f"f{k}"] = round(1.0 + 0.37 * j + k, 2)
            out.append({"id": f"arm{j:02d}", "features": feats})
        return out


SMALL = Shape(arms=3, arm_features=2, numeric=1, categorical=1)  # the scale scenarios
REALISTIC = Shape(arms=10, arm_features=3, numeric=6, categorical=6)  # the vw scenario


def make_database(path: Path, n: int, shape: Shape = SMALL, seed: int = 0) -> str:
    """A SQLite log of ``n`` decisions of placement ``offers``; rows are written by the driver
    in bulk (the service's own write path is not what is measured here)."""
    from nextbest.bandit.spec import PlacementSpec
    from nextbest.config.plans import plan
    from nextbest.storage.sql import open_store

    url = f"sqlite:///{path}"
    store = open_store(url)
    spec = PlacementSpec.model_validate({"id": PLACEMENT, "arms": shape.arm_specs()})
    p = plan({}, [spec], 1)
    store.save_placements(p.records, p.new_arm_versions)
    store.close()
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        block = 200_000
        for lo in range(0, n, block):
            conn.executemany(_INSERT, _rows(lo, min(n, lo + block), n, shape, seed))
            conn.commit()
    finally:
        conn.close()
    return url


_COLUMNS = (
    "event_id, placement_id, customer_id, created_at, deadline, features, arms, pmf, chosen, arm_id, "
    "probability, model_version, outcome, reward, learn_seq, slot, activated"
)
_INSERT = f"INSERT INTO decisions ({_COLUMNS}) VALUES ({', '.join('?' * len(_COLUMNS.split(',')))})"


def _rows(lo: int, hi: int, n: int, shape: Shape, seed: int) -> list[tuple[Any, ...]]:
    rng = np.random.default_rng(seed + lo)
    m, k = hi - lo, shape.arms
    scores = rng.normal(0.0, 1.0, (m, k))
    pmf = np.exp(scores)
    pmf /= pmf.sum(axis=1, keepdims=True)
    paced = (np.arange(lo, hi) % 97) == 0  # pacing could offer nothing: a last "no offer" entry
    u = rng.random(m)
    full = np.where(paced[:, None], pmf * 0.8, pmf)
    chosen = (u[:, None] > np.cumsum(full, axis=1)).sum(axis=1)  # == k: no offer
    best = scores.argmax(axis=1)
    reward = (rng.random(m) < np.where(chosen == best, 0.6, 0.2)).astype(float)
    numeric = np.round(rng.uniform(0, 100, (m, shape.numeric)), 3)
    categorical = rng.integers(0, 8, (m, shape.categorical))
    arms = orjson.dumps([[f"arm{j:02d}", 1] for j in range(k)]).decode()
    ids = [f"arm{j:02d}" for j in range(k)]
    t0 = 1_700_000_000.0
    out = []
    for i in range(m):
        g = lo + i
        c = int(chosen[i])
        p = full[i].tolist() + ([0.2] if paced[i] else [])
        feats = [["customer", f"n{j}", float(numeric[i, j])] for j in range(shape.numeric)]
        feats += [["customer", f"c{j}", f"v{int(categorical[i, j])}"] for j in range(shape.categorical)]
        is_open = g >= n - n // 50
        offered = c < k
        out.append(
            (
                f"e{g:09d}",
                PLACEMENT,
                f"c{g % 10_000}",
                t0 + g * 0.01,
                t0 + g * 0.01 + (600.0 if offered else 0.0),
                orjson.dumps(feats).decode(),
                arms,
                orjson.dumps(p).decode(),
                c if offered else None,
                ids[c] if offered else None,
                float(p[c]),
                g,
                0 if is_open and offered else (3 if not offered else (1 if reward[i] else 2)),
                None if is_open or not offered else float(reward[i]),
                None if is_open or not offered else g + 1,
                0,
                1,
            )
        )
    return out


# ------------------------------------------------------------------------------- scenarios


def _best(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t0)
    return min(times), n


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """BLAS limited to one thread, as ``nextbest replay`` starts it (OPENBLAS_NUM_THREADS=1):
    the estimators' vectors are too small for its threads, which only contend for the cores."""
    try:
        threadpoolctl = importlib.import_module("threadpoolctl")
    except ImportError:  # not a dependency: the replay then runs with the threads numpy started
        yield
        return
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


def _alternately(floor: Callable[[], int], run: Callable[[], int], repeats: int) -> tuple[float, int, float, int]:
    """The best of ``repeats`` runs of each, taken in turns, so that a busy spell of the machine
    weighs on both alike: (floor seconds, its count, run seconds, its count)."""
    floors, runs, a, b = [], [], 0, 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a = floor()
        floors.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = run()
        runs.append(time.perf_counter() - t0)
    return min(floors), a, min(runs), b


SIMPLE = ("logged", "uniform", "constant:arm00")


def _replay_db(url: str) -> int:
    from nextbest.bandit.offline.policies import parse_policy
    from nextbest.bandit.offline.replay import replay
    from nextbest.offline.log_source import replay_chunks

    with _one_blas_thread():
        return replay(replay_chunks(url, PLACEMENT), [parse_policy(p) for p in SIMPLE], ["ips", "snips"]).n


def _select(path: Path) -> int:
    """The rows the replay reads, in its order, with no decoding: the floor of any replay."""
    conn = sqlite3.connect(path)
    try:
        cur = conn.execute(
            "SELECT event_id, created_at, coalesce(reward, 0.0), probability, coalesce(chosen, -1), arms, pmf FROM decisions "
            "WHERE placement_id = ? AND (outcome IN (1, 2) AND chosen IS NOT NULL AND reward IS NOT NULL OR outcome = 3) "
            "ORDER BY created_at, event_id, slot",
            (PLACEMENT,),
        )
        n = 0
        while rows := cur.fetchmany(50_000):
            n += len(rows)
        return n
    finally:
        conn.close()


def db_speed(tmp: Path, n: int, repeats: int) -> dict[str, Any]:
    path = tmp / "speed.db"
    url = make_database(path, n)
    floor, rows, seconds, events = _alternately(lambda: _select(path), lambda: _replay_db(url), repeats)
    return {
        "events": events,
        "seconds": seconds,
        "events_per_s": events / seconds,
        "select_rows": rows,
        "select_seconds": floor,
        "select_rows_per_s": rows / floor,
        "db": url,
        "path": str(path),
    }


def rewrite(src: Path, dst: Path) -> int:
    """``src`` as another writer would give it: each line through ``json.dumps``, its keys in
    reverse order (``_nb``'s sorted) and the standard library's spacing."""
    n = 0
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            obj = json.loads(line)
            obj = dict(reversed(list(obj.items())))
            obj["_nb"] = dict(sorted(obj["_nb"].items()))
            out.write(json.dumps(obj) + "\n")
            n += 1
    return n


def dsjson_speed(tmp: Path, url: str, n: int, repeats: int) -> dict[str, Any]:
    from nextbest.bandit.offline.policies import parse_policy
    from nextbest.bandit.offline.replay import replay
    from nextbest.offline.log_source import dsjson_chunks, iter_decisions, write_dsjson

    rows, arm_features = iter_decisions(url, PLACEMENT)
    path = tmp / "log.json"
    written = write_dsjson(
        str(path), islice((d for d in rows if d.chosen is not None), n), arm_features
    )  # shown ones: DSJSON has no "no offer"
    other = tmp / "rewritten.json"
    rewrite(path, other)

    def measure(file: Path) -> dict[str, Any]:
        def parse() -> int:
            count = 0
            with open(file, "rb") as f:
                for line in f:
                    orjson.loads(line)
                    count += 1
            return count

        def run() -> int:
            with _one_blas_thread():
                return replay(dsjson_chunks(str(file), PLACEMENT), [parse_policy(p) for p in SIMPLE], ["ips", "snips"]).n

        floor, lines, seconds, events = _alternately(parse, run, repeats)
        return {
            "events": events,
            "lines": lines,
            "bytes": file.stat().st_size,
            "seconds": seconds,
            "events_per_s": events / seconds,
            "orjson_seconds": floor,
            "orjson_lines_per_s": lines / floor,
            "ratio": floor / seconds,
        }

    own, rewritten = measure(path), measure(other)
    return {**own, "lines": written, "rewritten": rewritten}


def peak_rss(url: str, tmp: Path, timeout: float = 1800) -> dict[str, Any]:
    """``nextbest replay`` of the simple policies in a process of its own: its peak RSS (from
    ``wait4``, this child's alone) and wall time (process start included)."""
    from nextbest.bench.procs import run_child

    cmd = [sys.executable, "-m", "nextbest.cli.main", "replay", "--db", url, "--placement", PLACEMENT, "--policy", *SIMPLE]
    cmd += ["--estimator", "ips", "snips", "--json"]
    run = run_child(cmd, tmp, "rss", timeout)
    result = json.loads(run.stdout) if run.returncode == 0 else []
    return {
        "returncode": run.returncode,
        "stderr": run.stderr,
        "rss_bytes": run.maxrss,
        "seconds": run.wall_seconds,
        "events": result[0]["n"] if result else 0,
    }


def rss_growth(tmp: Path, sizes: tuple[int, int], speed_db: tuple[int, Path] | None) -> dict[str, Any]:
    """Peak memory at both sizes; the larger log is the speed scenario's database repeated in
    time (SQL copies its rows), so it costs no Python per row to write."""
    out: dict[str, Any] = {}
    for n in sizes:
        path = tmp / f"rss{n}.db"
        if speed_db is not None and n % speed_db[0] == 0 and n > speed_db[0]:
            _repeat(speed_db[1], path, n // speed_db[0])
        elif speed_db is not None and n == speed_db[0]:
            path = speed_db[1]
        else:
            make_database(path, n)
        out[str(n)] = {"logged": n, **peak_rss(f"sqlite:///{path}", tmp)}
    return out


def _repeat(src: Path, dst: Path, times: int) -> None:
    """``dst``: ``src``'s log, then ``times - 1`` copies of it, each later than the last."""
    import shutil

    shutil.copyfile(src, dst)
    conn = sqlite3.connect(dst)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        span, seqs = conn.execute("SELECT max(created_at) - min(created_at) + 1, max(learn_seq) FROM decisions").fetchone()
        cols = _COLUMNS.replace(" ", "").split(",")
        shift = {
            "event_id": "event_id || '-{k}'",
            "created_at": "created_at + {t!r}",
            "deadline": "deadline + {t!r}",
            "learn_seq": "learn_seq + {s}",
        }
        for k in range(1, times):
            exprs = [shift[c].format(k=k, t=k * span, s=k * seqs) if c in shift else c for c in cols]
            conn.execute(
                f"INSERT INTO decisions ({', '.join(cols)}) SELECT {', '.join(exprs)} FROM decisions WHERE event_id NOT LIKE '%-%'"
            )
            conn.commit()
    finally:
        conn.close()


def vw_speed(tmp: Path, n: int, repeats: int, shape: Shape = REALISTIC) -> dict[str, Any]:
    """A ``vw:`` candidate's replay against VW learning the same examples alone, through VW's
    binding (parse + learn + finish, nothing else): from the database against the examples'
    text, and from the DSJSON export against VW reading that file's lines (``--dsjson``)."""
    import pylibvw
    from vowpalwabbit import Workspace

    from nextbest.bandit.offline.policies import parse_policy
    from nextbest.bandit.offline.replay import replay
    from nextbest.offline.log_source import dsjson_chunks, iter_decisions, read_replay_log, replay_chunks, write_dsjson

    args = "--cb_explore_adf --epsilon 0.1 -q UA"
    url = make_database(tmp / "vw.db", n, shape)
    texts = read_replay_log(url, PLACEMENT, with_features=True).vw_examples()
    rows, arm_features = iter_decisions(url, PLACEMENT)
    path = tmp / "vw.json"
    write_dsjson(str(path), (d for d in rows if d.chosen is not None), arm_features)
    lines = path.read_text().splitlines()

    def alone(examples: list[str], extra: list[str]) -> Callable[[], int]:
        def learn() -> int:
            ws = Workspace(arg_list=["--quiet", *args.split(), *extra])
            parse, learn, finish = pylibvw.vw._parse, pylibvw.vw.learn_multi, pylibvw.vw._finish_example_multi_ex
            try:
                for text in examples:
                    ex = parse(ws, text)
                    learn(ws, ex)
                    finish(ws, ex)
            finally:
                ws.finish()
            return len(examples)

        return learn

    def from_db() -> int:
        return replay(replay_chunks(url, PLACEMENT, with_features=True), [parse_policy(f"vw:{args}")], ["ips"]).n

    def from_dsjson() -> int:
        return replay(dsjson_chunks(str(path), PLACEMENT, with_features=True), [parse_policy(f"vw:{args}")], ["ips"]).n

    out: dict[str, Any] = {"shape": shape.__dict__, "vw_args": args}
    for name, run, floor in (("db", from_db, alone(texts, [])), ("dsjson", from_dsjson, alone(lines, ["--dsjson"]))):
        learn_s, examples = _best(floor, repeats)
        seconds, events = _best(run, repeats)
        out[name] = {
            "events": events,
            "seconds": seconds,
            "events_per_s": events / seconds,
            "learn_seconds": learn_s,
            "learn_per_s": examples / learn_s,
            "ratio": (events / seconds) / (examples / learn_s),
        }
    return out


def run(sizes: Sizes) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="nextbest-bench-replay-") as d:
        tmp = Path(d)
        db = db_speed(tmp, sizes.db_events, sizes.repeats)
        dsjson = dsjson_speed(tmp, db["db"], sizes.dsjson_events, sizes.repeats)
        rss = rss_growth(tmp, sizes.rss_events, (sizes.db_events, Path(db["path"])))
        vw = vw_speed(tmp, sizes.vw_events, sizes.repeats)
    return {"db": db, "dsjson": dsjson, "rss": rss, "vw": vw, "targets": TARGETS}


def format_table(report: dict[str, Any]) -> str:
    db, dsj, vw = report["db"], report["dsjson"], report["vw"]
    lines = [
        f"{'scenario':<44}{'value':>16}  ratio",
        f"{'db: ' + format(db['events'], ',') + ' events, IPS+SNIPS x 3 policies':<44}{db['events_per_s']:>14,.0f}/s  "
        + f"{db['events_per_s'] / db['select_rows_per_s']:.2f} x bare SELECT ({db['select_rows_per_s']:,.0f} rows/s)",
        f"{'dsjson: ' + format(dsj['events'], ',') + ' events (' + format(dsj['bytes'] / 1e6, '.0f') + ' MB)':<44}"
        + f"{dsj['events_per_s']:>14,.0f}/s  {dsj['ratio']:.2f} x orjson parse ({dsj['orjson_lines_per_s']:,.0f} lines/s)",
    ]
    if "rewritten" in dsj:
        rw = dsj["rewritten"]
        lines.append(
            f"{'dsjson by json.dumps: ' + format(rw['events'], ',') + ' events (' + format(rw['bytes'] / 1e6, '.0f') + ' MB)':<44}"
            + f"{rw['events_per_s']:>14,.0f}/s  {rw['ratio']:.2f} x orjson parse ({rw['orjson_lines_per_s']:,.0f} lines/s)"
        )
    for n, r in report["rss"].items():
        lines.append(
            f"{'peak RSS, ' + format(int(n), ',') + ' events logged':<44}{r['rss_bytes'] / MIB:>13,.0f} MiB  "
            + f"({r['events']:,} replayed in {r['seconds']:.1f} s, process start included)"
        )
    for source, floor in (("db", "the same text"), ("dsjson", "the same lines, --dsjson")):
        v = vw[source]
        lines.append(
            f"{'vw from ' + source + ': ' + format(v['events'], ',') + ' events, ' + str(vw['shape']['arms']) + ' arms':<44}"
            + f"{v['events_per_s']:>14,.0f}/s  {v['ratio']:.2f} x VW learning {floor} alone ({v['learn_per_s']:,.0f}/s)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from nextbest.bench.procs import print_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="small logs, quick, no targets")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    args = parser.parse_args(argv)
    report = run(SMOKE if args.smoke else FULL)
    report.update(smoke=args.smoke, python=platform.python_version(), machine=platform.machine())
    return print_report(report, format_table(report), args.json)


if __name__ == "__main__":
    sys.exit(main())
