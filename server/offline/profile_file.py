"""Customer profiles from a data-warehouse extract (``nextbest profiles load``), read as a stream.

A file is Parquet or CSV, one row per customer: ``customer_id`` (text; an integer column is taken
as its decimal text), optional ``as_of`` and ``expires_at`` (timestamps, dates or epoch seconds),
and one column per feature named ``namespace.name`` (``customer.plan``): numbers become number
features, texts text features, booleans the texts ``true``/``false`` (as arm features do), and a
null leaves the feature out for that row. Every value is checked as a ChooseRequest's feature is
(the same limits, from the server's Settings), by pyarrow compute over a whole batch at once; only
the values that pass are turned into Python objects, one column at a time.

Memory holds one batch of ``batch_rows`` rows (and the reader's block or row group), whatever the
file's size: :func:`read_profiles` is a generator, each batch read when the previous one has
been taken. An error names the file, the 1-based data row (the header is not a row) and the
column, quoting at most a bounded prefix of the offending value.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from nextbest.bandit.errors import InvalidInput
from nextbest.offline.profile_columns import RESERVED as RESERVED
from nextbest.offline.profile_columns import Format as Format
from nextbest.offline.profile_columns import Limits as Limits
from nextbest.offline.profile_columns import ProfileFileError as ProfileFileError
from nextbest.offline.profile_columns import _FeatureColumn, _is_text, _Plan, _quote, _time_kind, _TimeKind, _value_type, plan_columns
from nextbest.offline.profile_columns import detect_format as detect_format
from nextbest.storage.base import Profile
from nextbest.telemetry.gc_pauses import gc_paused

T = TypeVar("T")
_MESSAGE = 300  # characters of a reader's (pyarrow's) own message quoted


@dataclass(frozen=True, slots=True)
class ProfileBatch:
    """Rows ``first_row`` to ``last_row`` of the file (1-based data rows), as profiles."""

    first_row: int
    last_row: int
    profiles: list[Profile]


# -- one batch ------------------------------------------------------------------------------------


def _first(mask: Any) -> int | None:
    """Index of the first true of a boolean array (nulls are false), or None."""
    mask = pc.fill_null(mask, False)
    if not pc.any(mask).as_py():
        return None
    return int(pc.index(mask, True).as_py())


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _decoded(a: Any) -> Any:
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()
    if pa.types.is_dictionary(a.type):
        a = a.dictionary_decode()
    return a


class _Batches:
    """Checks and converts arrow batches of one file, counting rows."""

    def __init__(self, path: str, plan: _Plan, limits: Limits, now: float, ttl: float | None) -> None:
        self.path, self.plan, self.limits, self.now, self.ttl = path, plan, limits, now, ttl

    def _fail(self, message: str, row0: int, index: int | None, column: str | None) -> ProfileFileError:
        return ProfileFileError(self.path, message, row=None if index is None else row0 + index + 1, column=column)

    @staticmethod
    def _faults(values: Any, limit: int) -> tuple[Any, list[bool] | None]:
        """Which texts cannot be stored (a boolean array), and which of them are not even valid
        UTF-8 (the bytes of a lone surrogate, say; None: all are valid)."""
        try:
            values.validate(full=True)
        except pa.ArrowInvalid:
            invalid = [raw is not None and not _is_utf8(raw) for raw in values.cast(pa.binary()).to_pylist()]
            return pa.array(invalid, pa.bool_()), invalid
        return pc.or_(pc.greater(pc.utf8_length(values), limit), pc.match_substring(values, "\x00")), None

    def _fault(self, values: Any, j: int, invalid: list[bool] | None, limit: int, what: str) -> str:
        if invalid is not None and invalid[j]:
            return f"{what} is not valid UTF-8 (a lone surrogate?), which cannot be stored"
        text = values[j].as_py()
        if len(text) > limit:
            return f"{what} longer than {limit:,} characters: {_quote(text)}"
        return f"{what} contains a NUL character, which cannot be stored: {_quote(text)}"

    def _texts(self, a: Any, row0: int, column: str, limit: int, what: str) -> list[Any]:
        """The texts of a column, one per row (None where null), or the error of the first that cannot be stored."""
        bad, invalid = self._faults(a, limit)
        if (i := _first(bad)) is not None:
            raise self._fail(self._fault(a, i, invalid, limit, what), row0, i, column)
        return a.to_pylist()  # type: ignore[no-any-return]

    def _text_features(self, a: Any, row0: int, fc: _FeatureColumn) -> list[Any]:
        """A text column's features, one per row (None where null). Through its dictionary: each
        distinct text is checked and becomes a feature once, and rows share it (a warehouse's
        texts are categories: plan, region, segment), so no Python object is made per row."""
        texts, indices = self.text_dictionary(a, row0, fc)
        ns, name = fc.namespace, fc.name
        lookup: list[Any] = [None if v is None else (ns, name, v) for v in texts]
        lookup.append(None)  # a null row
        return list(map(lookup.__getitem__, indices.fill_null(len(texts)).to_numpy(zero_copy_only=False).tolist()))

    def text_dictionary(self, a: Any, row0: int, fc: _FeatureColumn) -> tuple[list[Any], Any]:
        """A text column's distinct texts (None for one no row uses that cannot be stored) and
        each row's index into them (null where null); the error of the first row whose text
        cannot be stored."""
        d = a if pa.types.is_dictionary(a.type) else pc.dictionary_encode(a)
        values, indices = d.dictionary, d.indices
        limit, what = self.limits.max_text_length, "a text"
        bad, invalid = self._faults(values, limit)
        if pc.any(bad).as_py():  # a bad text in the dictionary: refused if a row of this batch uses it
            used = pc.is_in(indices, value_set=pc.cast(pc.indices_nonzero(bad), indices.type))
            if (i := _first(used)) is not None:
                raise self._fail(self._fault(values, indices[i].as_py(), invalid, limit, what), row0, i, fc.column)
        if invalid is None:
            texts = values.to_pylist()
        else:  # the invalid entries are used by no row (else refused above): never looked up
            raws = values.cast(pa.binary()).to_pylist()
            texts = [None if raw is None or inv else raw.decode("utf-8") for raw, inv in zip(raws, invalid, strict=True)]
        return texts, indices

    def _numbers(self, a: Any, row0: int, column: str) -> list[Any]:
        return self.number_array(a, row0, column).to_pylist()  # type: ignore[no-any-return]

    def number_array(self, a: Any, row0: int, column: str) -> Any:
        """A number column as float64, or the error of its first value out of bounds."""
        f = pc.cast(a, pa.float64(), safe=False)
        limit = self.limits.max_abs_number
        if (i := _first(pc.invert(pc.less_equal(pc.abs(f), limit)))) is not None:  # NaN compares false: refused too
            x = f[i].as_py()
            why = "must be a finite number" if not math.isfinite(x) else f"magnitude above {limit:g}; scale the feature"
            raise self._fail(f"{why}, got {x!r}", row0, i, column)
        return f

    def _times(self, a: Any, kind: _TimeKind, row0: int, column: str) -> list[Any]:
        """Epoch seconds (floats, None where null) of a timestamp, date or number column."""
        return self._time_array(a, kind, row0, column).to_pylist()  # type: ignore[no-any-return]

    def _time_array(self, a: Any, kind: _TimeKind, row0: int, column: str) -> Any:
        if kind == "null":
            return pa.nulls(len(a), pa.float64())
        if kind == "timestamp":
            factor = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}[a.type.unit]
            seconds = pc.divide(pc.cast(a.cast(pa.int64()), pa.float64()), factor)  # timezone-aware or naive: UTC
        elif kind == "date":
            seconds = pc.multiply(pc.cast(a.cast(pa.date32()).cast(pa.int32()), pa.float64()), 86400.0)
        elif kind == "text":
            return pa.array(self._iso_times(a, row0, column), pa.float64())
        else:
            seconds = pc.cast(a, pa.float64(), safe=False)
            if (i := _first(pc.invert(pc.is_finite(seconds)))) is not None:
                raise self._fail(f"must be a finite number of epoch seconds, got {seconds[i].as_py()!r}", row0, i, column)
        return seconds

    def _iso_times(self, a: Any, row0: int, column: str) -> list[Any]:
        texts = self._texts(a, row0, column, 100, "a time")  # valid text, bounded: quoted in an error
        out: list[Any] = []
        for i, text in enumerate(texts):
            if text is None:
                out.append(None)
                continue
            try:
                t = datetime.fromisoformat(text.strip())
            except ValueError:
                raise self._fail(f"is not an ISO 8601 time (2026-12-01T06:00:00Z) or date: {_quote(text)}", row0, i, column) from None
            out.append((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp())
        return out

    def ids(self, batch: Any, row0: int) -> Any:
        """The batch's customer ids as a string array, or the error of the first that cannot be stored."""
        ids = _decoded(batch.column("customer_id"))
        if self.plan.id_integer:
            ids = pc.cast(ids, pa.string())
        if (i := _first(pc.is_null(ids))) is not None:
            raise self._fail("customer_id is empty", row0, i, "customer_id")
        if (i := _first(pc.equal(pc.utf8_length(ids), 0))) is not None:
            raise self._fail("customer_id is empty", row0, i, "customer_id")
        bad, invalid = self._faults(ids, self.limits.max_id_length)
        if (i := _first(bad)) is not None:
            raise self._fail(self._fault(ids, i, invalid, self.limits.max_id_length, "customer_id"), row0, i, "customer_id")
        return ids

    def stamps(self, batch: Any, row0: int) -> tuple[Any, Any]:
        """The batch's as_of (``now`` where none) and expires_at (``as_of + ttl`` where none;
        null: never) as float64 arrays of epoch seconds."""
        plan, n = self.plan, batch.num_rows
        as_of: Any = pa.nulls(n, pa.float64())
        if plan.as_of is not None:
            as_of = self._time_array(_decoded(batch.column("as_of")), plan.as_of, row0, "as_of")
        as_of = pc.fill_null(as_of, self.now)
        expires: Any = pa.nulls(n, pa.float64())
        if plan.expires_at is not None:
            expires = self._time_array(_decoded(batch.column("expires_at")), plan.expires_at, row0, "expires_at")
        if self.ttl is not None:
            expires = pc.coalesce(expires, pc.add(as_of, self.ttl))
        return as_of, expires

    def convert(self, batch: Any, row0: int) -> list[Profile]:
        """``batch`` (an arrow RecordBatch) as profiles; ``row0``: rows of the file before it."""
        n, plan = batch.num_rows, self.plan
        id_list = self.ids(batch, row0).to_pylist()
        as_of_a, expires_a = self.stamps(batch, row0)
        as_of, expires = as_of_a.to_pylist(), expires_a.to_pylist()

        columns: list[list[Any]] = []
        sparse = False
        for fc in plan.features:
            if fc.kind == "null":
                sparse = True
                continue
            a = batch.column(fc.column)
            if isinstance(a, pa.ChunkedArray):
                a = a.combine_chunks()
            if fc.kind != "text" and pa.types.is_dictionary(a.type):
                a = a.dictionary_decode()
            if fc.kind == "number":
                values = self._numbers(a, row0, fc.column)
            elif fc.kind == "bool":
                values = pc.if_else(a, "true", "false").to_pylist()
            else:
                columns.append(self._text_features(a, row0, fc))
                sparse = sparse or a.null_count > 0
                continue
            ns, name = fc.namespace, fc.name
            if a.null_count:
                sparse = True
                columns.append([None if v is None else (ns, name, v) for v in values])
            else:
                columns.append(list(zip(repeat(ns), repeat(name), values)))
        rows: Any = zip(*columns, strict=True) if columns else ((),) * n
        if sparse:
            rows = (tuple(f for f in r if f is not None) for r in rows)
        return list(map(Profile, id_list, rows, as_of, expires))


# -- reading a file -------------------------------------------------------------------------------


def _arrow_error(path: str, e: BaseException, schema: pa.Schema | None, row0: int | None) -> ProfileFileError:
    """pyarrow's own message (bounded), with the column it names where it names one."""
    text = str(e).strip().replace("\n", " ")
    column = None
    m = re.search(r"column #(\d+)", text)
    if m and schema is not None and int(m.group(1)) < len(schema.names):
        column = schema.names[int(m.group(1))]
    if len(text) > _MESSAGE:
        text = text[:_MESSAGE] + "..."
    where = f" (reading on from row {row0 + 1:,})" if row0 is not None else ""
    hint = ""
    if "conversion error" in text:
        hint = "; a CSV column's type is taken from the file's first block: a column of numbers must hold only numbers"
    return ProfileFileError(path, f"cannot be read{where}: {text}{hint}", column=column)


def _open(path: str, fmt: Format, batch_rows: int, texts: Sequence[str] = ("customer_id",)) -> tuple[pa.Schema, Iterator[Any]]:
    """The file's arrow schema and a stream of its record batches; ``texts``: CSV columns read
    as text whatever they look like (ids)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        # One column page at a time, not a whole row group; text features as Parquet keeps them
        # (dictionary-encoded): each distinct text is checked and made a Python object once.
        options: dict[str, Any] = {"buffer_size": 1 << 20, "pre_buffer": False}
        schema = pq.read_schema(path)
        texts = [f.name for f in schema if f.name not in RESERVED and _is_text(f.type)]
        pf = pq.ParquetFile(path, read_dictionary=texts or None, **options)
        return pf.schema_arrow, pf.iter_batches(batch_size=batch_rows, use_threads=False)
    import pyarrow.csv as pv

    reader = pv.open_csv(
        path,
        read_options=pv.ReadOptions(block_size=4 << 20),
        # Only an empty cell is missing: "NaN" and "NA" are values (NaN is then refused, "NA" a text).
        convert_options=pv.ConvertOptions(
            column_types=dict.fromkeys(texts, pa.string()), null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=True
        ),
    )
    return reader.schema, iter(reader)


def _stream(path: str, fmt: Format, batch_rows: int, texts: Sequence[str] | None = None) -> Iterator[Any]:
    """The schema first, then the arrow batches; reading errors as ProfileFileError. ``texts``:
    CSV columns read as text (default: a profile file's customer_id)."""
    try:
        schema, batches = _open(path, fmt, batch_rows) if texts is None else _open(path, fmt, batch_rows, texts)
    except FileNotFoundError:
        raise ProfileFileError(path, "no such file") from None
    except (OSError, pa.ArrowException) as e:
        raise _arrow_error(path, e, None, None) from None
    yield schema
    row0 = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as e:
            raise _arrow_error(path, e, schema, row0) from None
        row0 += batch.num_rows
        yield batch


def read_profiles(
    path: str | Path,
    *,
    format: str | None = None,
    batch_rows: int = 10_000,
    limits: Limits | None = None,
    now: float | None = None,
    ttl: float | None = None,
) -> Iterator[ProfileBatch]:
    """The file's profiles in batches of ``batch_rows`` rows (the last one shorter), read lazily.

    ``format``: "parquet" or "csv", or None to go by the file's suffix. ``now``: the ``as_of``
    of rows without one (default: the time of the call). ``ttl``: seconds after its ``as_of``
    that a profile without an ``expires_at`` expires (None: it does not). Raises ProfileFileError
    at the first row or column that cannot be loaded; the batches yielded before it are good."""
    for first, last, parts in converted(path, _Batches.convert, format=format, batch_rows=batch_rows, limits=limits, now=now, ttl=ttl):
        yield ProfileBatch(first, last, parts[0] if len(parts) == 1 else [p for part in parts for p in part])


def converted(
    path: str | Path,
    convert: Callable[[_Batches, Any, int], T],
    *,
    format: str | None,
    batch_rows: int,
    limits: Limits | None,
    now: float | None,
    ttl: float | None,
) -> Iterator[tuple[int, int, list[T]]]:
    """read_profiles' batches, each as ``convert`` makes its parts (a CSV block or a row group
    holds any number of batches, a batch may span two): its first and last row and the parts."""
    if batch_rows < 1:
        raise InvalidInput("batch_rows", "must be at least 1")
    if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
        raise InvalidInput("ttl", "must be a positive number of seconds")
    p = str(path)
    fmt = detect_format(p, format)
    limits = limits or Limits()
    stream = _stream(p, fmt, batch_rows)
    schema = next(stream)
    conv = _Batches(p, plan_columns(p, schema, limits), limits, time.time() if now is None else now, ttl)
    pending: list[T] = []
    rows = 0  # rows pending
    done = 0  # rows yielded
    for batch in stream:
        # Converted a batch's worth at a time: a bad row fails its own batch, after every earlier
        # batch has been yielded.
        off = 0
        while off < batch.num_rows:
            take = min(batch.num_rows - off, batch_rows - rows)
            with gc_paused():  # a batch is many small containers and no cycle (a 5x slower load with the collector)
                pending.append(convert(conv, batch.slice(off, take), done + rows))
            rows += take
            off += take
            if rows == batch_rows:
                yield done + 1, done + rows, pending
                done, rows, pending = done + rows, 0, []
    if rows:
        yield done + 1, done + rows, pending


def arrow_batches(path: str, fmt: Format, batch_rows: int, texts: Sequence[str]) -> tuple[pa.Schema, Iterator[Any]]:
    """Another extract's schema and record batches, read as profiles are (``texts``: CSV columns
    read as text); errors as ProfileFileError naming the file (and the column, the row read on from)."""
    stream = _stream(path, fmt, batch_rows, texts)
    return next(stream), stream


def epoch_seconds(path: str, column: str, a: Any, row0: int) -> list[Any]:
    """A column of timestamps, dates, epoch seconds or ISO 8601 texts as epoch seconds (None
    where null), as a profile's ``as_of``; ProfileFileError naming the row (``row0``: rows of the
    file before the batch) and the column for a value that is none of these."""
    a = _decoded(a)
    kind = _time_kind(path, column, _value_type(a.type))
    return _Batches(path, _Plan(False, None, None, ()), Limits(), 0.0, None)._times(a, kind, row0, column)


def count_rows(path: str, format: Format) -> int | None:
    """The rows of a Parquet file, from its footer; None for CSV (or a file that cannot say)."""
    if format != "parquet":
        return None
    try:
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    except (OSError, pa.ArrowException):
        return None


def batch_slices(profiles: Sequence[Profile], size: int) -> Iterator[Sequence[Profile]]:
    """``profiles`` in slices of at most ``size`` (PutProfiles' max_profile_batch)."""
    for i in range(0, len(profiles), size):
        yield profiles[i : i + size]
