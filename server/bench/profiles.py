#!/usr/bin/env python3
"""Loading customer profiles from the warehouse (``nextbest profiles load``) at scale: its rate as
ratios to ceilings measured in the same run, and its peak memory as the file grows.

A Parquet extract of N rows is written in chunks (bounded memory) into a temporary directory:
``customer_id``, ``as_of`` and 10 feature columns (5 numbers, 5 low-cardinality texts), as a
telecom warehouse gives them. Then, for each size:

* ``load``: ``nextbest profiles load FILE --db URL`` in a process of its own into a fresh
  database (PostgreSQL where it answers, else SQLite): its rate (as the command reports it,
  process start excluded), wall time and peak RSS (its VmHWM, sampled every 50 ms until it exits);
* ``read``: pyarrow reading the same file's batches, nothing else (the floor of any loader);
* ``copy``: the same rows as CSV (pyarrow writes it) COPYed into an unindexed temporary table
  of one column per field (PostgreSQL; what the database takes at best), on the first 1 M rows.

Peak memory flat across sizes is what streaming means (1 M and 10 M rows in docs/configuration.md).

Usage::

    python -m nextbest.bench.profiles                              # 100 k and 1 M rows
    python -m nextbest.bench.profiles --rows 1000000,10000000      # the figures in docs/
    nextbest bench --phases profiles --profile-rows 1000000,10000000
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
FULL_ROWS = (100_000, 1_000_000)
SMOKE_ROWS = (2_000,)
CEILING_ROWS = 1_000_000  # the COPY ceiling is measured on at most this many rows
CHUNK = 100_000  # rows generated (and written as one row group) at a time
TARGETS = {"rows_per_s": 100_000.0, "rss_growth": 1.25}
PLANS = ("prepaid_basic", "prepaid_plus", "postpaid_s", "postpaid_m", "postpaid_l")
REGIONS = ("north", "south", "east", "west", "capital", "coast")
TIERS = ("2g", "3g", "4g", "5g")
SEGMENTS = ("youth", "family", "business", "senior", "value", "premium", "churn_risk")
CHANNELS = ("app", "web", "ussd", "ivr", "chatbot", "retail")


def write_chunks(path: Path, rows: int, chunk: int, table: Callable[[int, int], Any]) -> int:
    """A Parquet file of ``rows`` rows written ``chunk`` at a time (bounded memory, a row group
    each), ``table(lo, m)`` giving rows lo to lo + m as a pyarrow Table; returns its size in bytes."""
    import pyarrow.parquet as pq

    writer = None
    try:
        for lo in range(0, rows, chunk):
            t = table(lo, min(chunk, rows - lo))
            if writer is None:
                writer = pq.ParquetWriter(path, t.schema)
            writer.write_table(t)
    finally:
        if writer is not None:
            writer.close()
    return path.stat().st_size


def write_extract(path: Path, rows: int, seed: int = 0, chunk: int = CHUNK) -> int:
    """A warehouse extract of ``rows`` customers, written ``chunk`` rows at a time; returns its size in bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    texts = {
        "customer.plan": pa.array(PLANS),
        "customer.region": pa.array(REGIONS),
        "device.tier": pa.array(TIERS),
        "customer.segment": pa.array(SEGMENTS),
        "customer.channel": pa.array(CHANNELS),
    }
    as_of = 1_796_112_000_000_000  # 2026-12-01 UTC, microseconds

    def table(lo: int, m: int) -> Any:
        ids = pc.binary_join_element_wise("c", pc.utf8_lpad(pc.cast(pa.array(np.arange(lo, lo + m)), pa.string()), 9, "0"), "")
        cols: dict[str, Any] = {
            "customer_id": ids,
            "as_of": pa.array(as_of - rng.integers(0, 86_400_000_000, m), pa.timestamp("us", tz="UTC")),
            "customer.arpu": pa.array(np.round(rng.gamma(2.0, 8.0, m), 2)),
            "customer.tenure_months": pa.array(rng.integers(0, 240, m), pa.int32()),
            "usage.data_gb": pa.array(np.round(rng.exponential(6.0, m), 3)),
            "usage.voice_min": pa.array(rng.integers(0, 3000, m), pa.int32()),
            "customer.balance": pa.array(np.round(rng.normal(10.0, 5.0, m), 2)),
        }
        for name, values in texts.items():
            cols[name] = values.take(pa.array(rng.integers(0, len(values), m)))
        return pa.table(cols)

    return write_chunks(path, rows, chunk, table)


def read_rate(path: Path, batch_rows: int = 10_000) -> dict[str, Any]:
    """pyarrow reading every batch of the file, decoding nothing further: rows/s."""
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    n = sum(b.num_rows for b in pq.ParquetFile(path).iter_batches(batch_size=batch_rows))
    seconds = time.perf_counter() - t0
    return {"rows": n, "seconds": seconds, "rows_per_s": n / seconds}


def copy_rate(path: Path, url: str, limit: int = CEILING_ROWS) -> dict[str, Any]:
    """The file's first ``limit`` rows as CSV COPYed into an unindexed temporary table, one column
    per field, in transactions of 10,000 rows as the loader's: what PostgreSQL takes at best."""
    import psycopg
    import pyarrow.csv as pv
    import pyarrow.parquet as pq

    from nextbest.storage.scratch import PG_DSN

    schema = url.split("search_path%3D", 1)[1] if "search_path%3D" in url else "public"
    pf = pq.ParquetFile(path)
    cols = ", ".join(
        f'"{f.name}" '
        + ("text" if f.name == "customer_id" or str(f.type) == "string" else "timestamptz" if f.name == "as_of" else "float8")
        for f in pf.schema_arrow
    )
    n = 0
    with psycopg.connect(PG_DSN, options=f"-csearch_path={schema}") as c:
        c.execute(f"CREATE TEMPORARY TABLE ceiling ({cols})")
        c.commit()
        t0 = time.perf_counter()
        for batch in pf.iter_batches(batch_size=10_000):
            if n >= limit:
                break
            buf = io.BytesIO()
            pv.write_csv(batch, buf, pv.WriteOptions(include_header=False))
            with c.cursor() as cur, cur.copy("COPY ceiling FROM STDIN (FORMAT csv)") as copy:
                copy.write(buf.getvalue())
            c.commit()
            n += batch.num_rows
        seconds = time.perf_counter() - t0
    return {"rows": n, "seconds": seconds, "rows_per_s": n / seconds}


def load(path: Path, url: str, out_dir: Path, timeout: float = 3600) -> dict[str, Any]:
    """``nextbest profiles load`` in a process of its own: its reported rate, wall time and peak RSS."""
    from nextbest.bench.procs import run_child

    cmd = [sys.executable, "-m", "nextbest.cli.main", "profiles", "load", str(path), "--db", url]
    run = run_child(cmd, out_dir, "load", timeout)
    text = run.stdout.decode(errors="replace")
    m = re.search(r"([\d,]+) rows read .*?: ([\d,]+) stored, ([\d,]+) stale.*?; ([\d.]+) s, ([\d,]+) rows/s", text)

    def num(s: str) -> float:
        return float(s.replace(",", ""))

    return {
        "returncode": run.returncode,
        "stderr": run.stderr,
        "rows": int(num(m.group(1))) if m else 0,
        "stored": int(num(m.group(2))) if m else 0,
        "seconds": num(m.group(4)) if m else run.wall_seconds,
        "rows_per_s": num(m.group(5)) if m else 0.0,
        "wall_seconds": run.wall_seconds,
        "rss_bytes": run.peak_rss or run.maxrss,
        "rusage_maxrss_bytes": run.maxrss,  # the spawning process's memory too (procs.ChildRun)
    }


@contextmanager
def _database(postgres: bool, tmp: Path, n: int) -> Iterator[str]:
    if postgres:
        from nextbest.storage.scratch import postgres_schema

        with postgres_schema("nbbench") as url:
            yield url
    else:
        yield f"sqlite:///{tmp / f'profiles{n}.db'}"


def run(sizes: Sequence[int], postgres: bool | None = None) -> dict[str, Any]:
    """Every size: write the file, read it, COPY it (PostgreSQL), load it in a child process."""
    from nextbest.storage.scratch import postgres_available

    if postgres is None:
        postgres = postgres_available()
    out: dict[str, Any] = {"backend": "postgres" if postgres else "sqlite", "feature_columns": 10, "sizes": {}, "targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="nextbest-bench-profiles-") as d:
        tmp = Path(d)
        for n in sizes:
            path = tmp / f"profiles{n}.parquet"
            t0 = time.perf_counter()
            size = write_extract(path, n)
            r: dict[str, Any] = {"rows": n, "file_bytes": size, "write_seconds": time.perf_counter() - t0}
            r["read"] = read_rate(path)
            with _database(postgres, tmp, n) as url:
                if postgres:
                    r["copy"] = copy_rate(path, url)
                r["load"] = load(path, url, tmp)
            path.unlink()
            out["sizes"][str(n)] = r
    return out


def format_table(report: dict[str, Any]) -> str:
    lines = [f"profiles load from Parquet ({report['feature_columns']} feature columns) into {report['backend']}"]
    for n, r in report["sizes"].items():
        ld = r["load"]
        ceilings = f"pyarrow read {r['read']['rows_per_s']:,.0f}/s"
        if "copy" in r:
            ceilings += f", plain COPY {r['copy']['rows_per_s']:,.0f}/s ({ld['rows_per_s'] / r['copy']['rows_per_s']:.2f} x)"
        lines.append(
            f"  {int(n):>12,} rows ({r['file_bytes'] / MIB:,.0f} MiB): {ld['rows_per_s']:>10,.0f} rows/s, "
            f"peak RSS {ld['rss_bytes'] / MIB:,.0f} MiB; {ceilings}" + (f"; exit {ld['returncode']}" if ld["returncode"] else "")
        )
    return "\n".join(lines)


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s.replace("_", "").replace(",", "")) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give row counts separated by commas, e.g. 1000000,10000000") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("give at least one positive row count")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    from nextbest.bench.procs import print_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=parse_sizes, default=FULL_ROWS, help="file sizes, e.g. 1000000,10000000")
    parser.add_argument("--smoke", action="store_true", help="tiny files")
    parser.add_argument("--no-postgres", dest="no_postgres", action="store_true", help="SQLite even if PostgreSQL answers")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    args = parser.parse_args(argv)
    report = run(SMOKE_ROWS if args.smoke else args.rows, False if args.no_postgres else None)
    return print_report(report, format_table(report), args.json)


if __name__ == "__main__":
    sys.exit(main())
