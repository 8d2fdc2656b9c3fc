"""A profile file's columns (offline/profile_file.py): the format, the limits a profile is held
to, what each column is (:func:`plan_columns`), and the error naming the file, row and column."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.text import QUOTE_LIMIT, storable

Format = Literal["parquet", "csv"]
RESERVED = ("customer_id", "as_of", "expires_at")
_QUOTE = 40  # characters of an offending value quoted in a message


@dataclass(frozen=True, slots=True)
class Limits:
    """What a profile may hold: the server's limits on a ChooseRequest (Settings of the same names)."""

    max_features: int = 512
    max_name_length: int = 128
    max_text_length: int = 1024
    max_abs_number: float = 1e12
    max_id_length: int = 256

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(
            max_features=settings.max_features,
            max_name_length=settings.max_name_length,
            max_text_length=settings.max_text_length,
            max_abs_number=settings.max_abs_number,
            max_id_length=settings.max_id_length,
        )


class ProfileFileError(InvalidInput):
    """A file that cannot be loaded, with where: the file, the data row and the column when known."""

    def __init__(self, path: str, message: str, row: int | None = None, column: str | None = None) -> None:
        where = [path]
        if row is not None:
            where.append(f"row {row:,}")
        if column is not None:
            where.append(f"column {_quote(column)}")
        super().__init__(", ".join(where), message)
        self.path, self.row, self.column = path, row, column


def _quote(text: str, limit: int = _QUOTE) -> str:
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


def detect_format(path: str, format: str | None) -> Format:
    if format in ("parquet", "csv"):
        return format  # type: ignore[return-value]
    if format is not None:
        raise InvalidInput("--format", f"{format!r}: choose parquet or csv")
    name = path.lower()
    for suffix in (".gz", ".bz2", ".zst", ".lz4"):  # compressed CSV: pyarrow decompresses by suffix
        name = name.removesuffix(suffix)
    if name.endswith((".parquet", ".pq", ".parq")):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    raise ProfileFileError(path, "cannot tell the format from the file name: give --format parquet or --format csv")


# -- the columns ----------------------------------------------------------------------------------

_Kind = Literal["number", "text", "bool", "null"]
_TimeKind = Literal["timestamp", "date", "number", "text", "null"]


@dataclass(frozen=True, slots=True)
class _FeatureColumn:
    column: str
    namespace: str
    name: str
    kind: _Kind


@dataclass(frozen=True, slots=True)
class _Plan:
    id_integer: bool
    as_of: _TimeKind | None
    expires_at: _TimeKind | None
    features: tuple[_FeatureColumn, ...]


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_text(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t))


def _is_number(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t))


def _time_kind(path: str, column: str, t: pa.DataType) -> _TimeKind:
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_date(t):
        return "date"
    if _is_number(t):
        return "number"
    if _is_text(t):
        return "text"  # ISO 8601 (CSV columns whose values differ in form, some with an offset, some without)
    if pa.types.is_null(t):
        return "null"
    raise ProfileFileError(path, f"must be a timestamp, a date or a number of epoch seconds, not {t}", column=column)


_NAME = re.compile(r"^[^.]+\.[^.]+$")


def plan_columns(path: str, schema: pa.Schema, limits: Limits) -> _Plan:
    """What each column of the file is, or ProfileFileError naming the first column that cannot be loaded."""
    names = list(schema.names)
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ProfileFileError(path, "appears twice in the header", column=n)
        seen.add(n)
    if "customer_id" not in seen:
        shown = ", ".join(_quote(n) for n in names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise ProfileFileError(path, f"has no customer_id column (its columns: {shown or 'none'})")
    id_type = _value_type(schema.field("customer_id").type)
    if not (_is_text(id_type) or pa.types.is_integer(id_type)):
        raise ProfileFileError(path, f"must be text or an integer, not {id_type}", column="customer_id")
    times = {k: _time_kind(path, k, _value_type(schema.field(k).type)) for k in ("as_of", "expires_at") if k in seen}
    features = []
    for n in names:
        if n in RESERVED:
            continue
        if not _NAME.match(n):
            raise ProfileFileError(
                path, "a feature column is named namespace.name, with exactly one dot, e.g. customer.plan", column=n[:QUOTE_LIMIT]
            )
        namespace, name = n.split(".")
        for part in (namespace, name):
            if len(part) > limits.max_name_length:
                raise ProfileFileError(path, f"a feature's namespace and name are at most {limits.max_name_length} characters", column=n)
            if not storable(part):
                raise ProfileFileError(path, "contains a NUL character or a lone surrogate, which cannot be stored", column=n)
        t = _value_type(schema.field(n).type)
        kind: _Kind
        if _is_number(t):
            kind = "number"
        elif _is_text(t):
            kind = "text"
        elif pa.types.is_boolean(t):
            kind = "bool"
        elif pa.types.is_null(t):
            kind = "null"  # no value in any row (a CSV column left empty)
        else:
            raise ProfileFileError(
                path,
                f"has type {str(t)[:60]}; a feature is a number, a text or a boolean (give dates as numbers, e.g. days since)",
                column=n,
            )
        features.append(_FeatureColumn(n, namespace, name, kind))
    if len(features) > limits.max_features:
        raise ProfileFileError(path, f"has {len(features)} feature columns, more than the server's max_features ({limits.max_features})")
    return _Plan(pa.types.is_integer(id_type), times.get("as_of"), times.get("expires_at"), tuple(features))
