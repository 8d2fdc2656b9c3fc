"""Customer profiles from a data-warehouse extract as Arrow tables, for the store's bulk path
(``Store.put_profile_table``: ``nextbest profiles load --db``).

The same file, checks and errors as :func:`nextbest.offline.profile_file.read_profiles` (its
validation, by pyarrow compute over a batch), but no Python object per row: each row's features
become the JSON text the store keeps (``[["customer","plan","prepaid"],["customer","arpu",12.5]]``,
in column order, a null leaving its feature out) by pyarrow's string kernels, each distinct text
encoded once through its dictionary. Read, checked and encoded this way a row costs the loader
well under a microsecond of Python; as profiles (then JSON, then COPY rows) it cost about five, on
a machine whose other core is PostgreSQL's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from nextbest.offline.profile_file import Limits, _Batches, converted

COLUMNS = ("customer_id", "features", "as_of", "expires_at")


@dataclass(frozen=True, slots=True)
class TableBatch:
    """Rows ``first_row`` to ``last_row`` of the file (1-based data rows) as a table of
    :data:`COLUMNS`: customer_id (string), features (JSON text), as_of and expires_at (float64
    epoch seconds; expires_at null: never)."""

    first_row: int
    last_row: int
    table: pa.Table


def _json_text(value: str) -> str:
    return orjson.dumps(value).decode()


def encode(conv: _Batches, batch: Any, row0: int) -> pa.Table:
    """``batch`` (an arrow RecordBatch) as a table of :data:`COLUMNS`; ``row0``: rows of the file
    before it. Raises ProfileFileError as ``conv.convert`` does, for the same rows."""
    ids = conv.ids(batch, row0)
    as_of, expires = conv.stamps(batch, row0)
    pieces = []
    for fc in conv.plan.features:
        if fc.kind == "null":
            continue
        a = batch.column(fc.column)
        if isinstance(a, pa.ChunkedArray):
            a = a.combine_chunks()
        if fc.kind != "text" and pa.types.is_dictionary(a.type):
            a = a.dictionary_decode()
        if fc.kind == "number":
            values = pc.cast(conv.number_array(a, row0, fc.column), pa.string())  # shortest round trip: valid JSON
        elif fc.kind == "bool":
            values = pc.if_else(a, '"true"', '"false"')
        else:
            texts, indices = conv.text_dictionary(a, row0, fc)
            values = pa.array([None if t is None else _json_text(t) for t in texts], pa.string()).take(indices)
        head = f"[{_json_text(fc.namespace)},{_json_text(fc.name)},"
        pieces.append(pc.binary_join_element_wise(head, values, "]", ""))  # null where the value is
    n = batch.num_rows
    if pieces:
        inner = pc.binary_join_element_wise(*pieces, ",", null_handling="skip")
        features = pc.binary_join_element_wise("[", inner, "]", "")
    else:
        features = pa.array(["[]"] * n, pa.string())
    return pa.table([ids, features, as_of, expires], names=list(COLUMNS))


def read_profile_tables(
    path: str | Path,
    *,
    format: str | None = None,
    batch_rows: int = 10_000,
    limits: Limits | None = None,
    now: float | None = None,
    ttl: float | None = None,
) -> Iterator[TableBatch]:
    """The file's profiles as read_profiles reads them (the same arguments, batches and errors),
    each batch a table of :data:`COLUMNS`."""
    for first, last, parts in converted(path, encode, format=format, batch_rows=batch_rows, limits=limits, now=now, ttl=ttl):
        yield TableBatch(first, last, parts[0] if len(parts) == 1 else pa.concat_tables(parts))
