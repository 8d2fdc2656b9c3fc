"""``nextbest conversions load``: purchases from a billing extract, reported to a server (#31).

A file is Parquet or CSV, one row per conversion: ``conversion_id``, ``customer_id``, ``arm_id``
or ``product`` (one of them per row), ``value`` and ``occurred_at`` (a timestamp, a date, epoch
seconds or ISO 8601 text). It is read as a stream (nextbest.offline.profile_file's reader) and
sent in ReportConversions calls of ``--batch`` rows; every row is checked before its batch is
sent, and a batch is all or nothing. On an error the command stops, names the file, row and
column, and says how far the load got. A reloaded file answers all DUPLICATE and changes nothing.

Only through a server (``--target``): a conversion's credits are rewards of decisions whose
reward windows a running server holds in memory and closes; a write beside it would miss the
learning and could be learned twice. Exit codes: 0 done, 1 the server failed or some rewards
must be sent again, 2 a bad file or bad arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nextbest.bandit.errors import InvalidInput, NextbestError
from nextbest.cli.args import positive_int
from nextbest.cli.profiles import Loaded, LoadStopped, Progress
from nextbest.cli.target import ENV, env_target

if TYPE_CHECKING:
    from nextbest.bandit.attribution import Conversion
    from nextbest.client import ConversionReport

DEFAULT_BATCH = 1_000  # rows per ReportConversions call: the server's default max_reward_batch
TEXTS = ("conversion_id", "customer_id", "arm_id", "product")
REQUIRED = ("conversion_id", "customer_id", "value", "occurred_at")
NO_DB = (
    "conversions are loaded through a running server (--target): their credits are rewards of "
    "decisions whose reward windows the server holds and closes, which a write beside it would miss"
)


@dataclass(frozen=True, slots=True)
class ConversionBatch:
    """Rows ``first_row`` to ``last_row`` of the file (1-based data rows), as conversions."""

    first_row: int
    last_row: int
    conversions: list[Conversion]


@dataclass
class Counted:
    """What the server answered, summed over the batches sent."""

    attributed: int = 0
    unattributed: int = 0
    duplicate: int = 0
    credits: int = 0  # of the conversions attributed now
    failed: list[str] = field(default_factory=list)  # "row N: <error>", of conversions to send again

    def add(self, reports: Sequence[ConversionReport], first_row: int) -> None:
        for i, r in enumerate(reports):
            if r.status == "error":
                self.failed.append(f"row {first_row + i:,}: {r.error}")
                continue
            setattr(self, r.status, getattr(self, r.status) + 1)
            if r.status == "attributed":  # a duplicate's credits were counted when it was new
                self.credits += len(r.credits)


def read_conversions(
    path: str, *, format: str | None = None, batch_rows: int = DEFAULT_BATCH, now: float | None = None
) -> Iterator[ConversionBatch]:
    """The file's conversions in batches of ``batch_rows`` rows, read lazily, each row checked as
    the server checks it (ProfileFileError naming the file, the row and the column)."""
    from nextbest.offline.profile_file import ProfileFileError, arrow_batches, detect_format

    fmt = detect_format(path, format)
    schema, batches = arrow_batches(path, fmt, batch_rows, TEXTS)
    for name in REQUIRED:
        if name not in schema.names:
            raise ProfileFileError(path, f"has no {name} column (it needs {', '.join(REQUIRED)} and arm_id or product)")
    if "arm_id" not in schema.names and "product" not in schema.names:
        raise ProfileFileError(path, "has neither an arm_id nor a product column")
    now = time.time() if now is None else now
    row0 = 0
    for batch in batches:
        for off in range(0, batch.num_rows, batch_rows):
            part = batch.slice(off, batch_rows)
            yield ConversionBatch(row0 + 1, row0 + part.num_rows, _convert(path, part, row0, now))
            row0 += part.num_rows


def _texts(path: str, batch: Any, name: str, row0: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.compute as pc

    from nextbest.offline.profile_file import ProfileFileError

    if name not in batch.schema.names:
        return [""] * batch.num_rows
    a = batch.column(name)
    if pa.types.is_dictionary(a.type):
        a = a.dictionary_decode()
    if pa.types.is_integer(a.type) or pa.types.is_null(a.type):
        a = pc.cast(a, pa.string())
    if not (pa.types.is_string(a.type) or pa.types.is_large_string(a.type)):
        raise ProfileFileError(path, f"must be text, not {a.type}", column=name)
    try:
        return [v or "" for v in a.to_pylist()]
    except UnicodeDecodeError:
        raise ProfileFileError(path, "is not valid UTF-8", row=row0 + 1, column=name) from None


def _convert(path: str, batch: Any, row0: int, now: float) -> list[Conversion]:
    import pyarrow as pa
    import pyarrow.compute as pc

    from nextbest.bandit.attribution import Conversion
    from nextbest.bandit.spec import MAX_ABS_REWARD_LIMIT
    from nextbest.engine.conversion_result import MAX_AGE
    from nextbest.offline.profile_file import ProfileFileError, epoch_seconds
    from nextbest.settings import Settings

    ids, customers, arms, products = (_texts(path, batch, n, row0) for n in TEXTS)
    value = batch.column("value")
    if not (pa.types.is_integer(value.type) or pa.types.is_floating(value.type) or pa.types.is_decimal(value.type)):
        raise ProfileFileError(path, f"must be a number, not {value.type}", column="value")
    values = pc.cast(value, pa.float64(), safe=False).to_pylist()
    times = epoch_seconds(path, "occurred_at", batch.column("occurred_at"), row0)
    max_id = Settings().max_id_length
    out = []
    for i, (cid, cust, arm, product, v, t) in enumerate(zip(ids, customers, arms, products, values, times, strict=True)):
        for name, x in (("value", v), ("occurred_at", t)):
            if x is None:
                raise ProfileFileError(path, "is empty", row=row0 + i + 1, column=name)
        c = Conversion(cid, cust, arm, product, v, t)
        try:
            c.check(now=now, max_id_length=max_id, max_abs_value=MAX_ABS_REWARD_LIMIT, max_age=MAX_AGE)
        except InvalidInput as e:
            raise ProfileFileError(path, e.message, row=row0 + i + 1, column=e.field) from None
        out.append(c)
    return out


def _row_of(path: str, details: str, batch: ConversionBatch) -> InvalidInput:
    """A server's refusal of ``conversions[12].product`` as the file's row and column."""
    from nextbest.offline.profile_file import ProfileFileError

    m = re.match(r"conversions\[(\d+)\]\.(\w+): (.*)", details, re.S)
    if m and int(m.group(1)) < len(batch.conversions):
        return ProfileFileError(path, f"the server refused it: {m.group(3)}", row=batch.first_row + int(m.group(1)), column=m.group(2))
    return InvalidInput(f"{path}, rows {batch.first_row:,}-{batch.last_row:,}", f"the server refused them: {details}")


def load(
    path: str,
    report: Callable[[list[Conversion]], list[ConversionReport]],
    *,
    format: str | None,
    batch_rows: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[Loaded, Counted]:
    """Read ``path`` and ``report`` each batch; LoadStopped (with how far it got) on the first error."""
    import grpc

    done, counted = Loaded(), Counted()
    try:
        for batch in read_conversions(path, format=format, batch_rows=batch_rows):
            try:
                reports = report(batch.conversions)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise LoadStopped(_row_of(path, e.details() or "", batch), done) from e
                raise LoadStopped(e, done) from e
            counted.add(reports, batch.first_row)
            done.rows, done.batches = batch.last_row, done.batches + 1
            if progress is not None:
                progress(done.rows)
    except NextbestError as e:
        raise LoadStopped(e, done) from e
    return done, counted


def _load(args: argparse.Namespace) -> int:
    from nextbest.client import NextbestClient
    from nextbest.offline.profile_file import count_rows, detect_format

    if args.db:
        raise InvalidInput("--db", NO_DB)
    fmt = detect_format(args.file, args.format)
    progress = Progress(args.file, count_rows(args.file, fmt)) if sys.stderr.isatty() else None
    started = time.perf_counter()
    with NextbestClient(args.target, timeout=args.timeout, token=args.token) as client:
        try:
            done, counted = load(args.file, client.report_conversions, format=fmt, batch_rows=args.batch, progress=progress)
        except LoadStopped as stop:
            return stop.report(progress)
    if progress is not None:
        progress.close()
    seconds = time.perf_counter() - started
    print(
        f"{done.rows:,} rows read from {args.file} in {done.batches:,} batch{'' if done.batches == 1 else 'es'}: "
        f"{counted.attributed:,} attributed ({counted.credits:,} credit{'' if counted.credits == 1 else 's'}), "
        f"{counted.unattributed:,} unattributed, "
        f"{counted.duplicate:,} duplicate; {seconds:.1f} s"
    )
    if counted.failed:
        print(f"{len(counted.failed):,} conversions failed; send the file again (the others answer duplicate):", file=sys.stderr)
        for line in counted.failed[:10]:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``conversions load`` to the nextbest command."""
    p = sub.add_parser("conversions", help="conversions from billing: load an extract, attributed to decisions and learned")
    verbs = p.add_subparsers(dest="conversions_command", required=True)
    ld = verbs.add_parser(
        "load",
        help="report a Parquet or CSV extract: conversion_id, customer_id, arm_id or product, value, occurred_at",
        description=f"Report a billing extract to a server. --db is not offered: {NO_DB}.",
    )
    ld.add_argument("file")
    ld.add_argument("--format", choices=["parquet", "csv"], help="default: from the file name (.parquet, .csv)")
    g = ld.add_mutually_exclusive_group(required=env_target() is None)  # $NEXTBEST_TARGET counts as --target
    g.add_argument(
        "--target",
        default=env_target(),
        help=f"server address HOST:PORT: report through its DecisionService.ReportConversions (default ${ENV})",
    )
    g.add_argument("--db", help=f"not offered: {NO_DB}")
    ld.add_argument(
        "--token",
        help="bearer token with the data or admin role; default $NEXTBEST_TOKEN, "
        "which is better: a command line is visible to every user of the machine",
    )
    ld.add_argument("--timeout", type=float, default=60.0, help="seconds per call (default 60)")
    ld.add_argument(
        "--batch",
        type=positive_int,
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"rows per call, each all or nothing (default {DEFAULT_BATCH}: at most the server's max_reward_batch)",
    )
    ld.set_defaults(func=_load)
