"""Where replay gets its log: a database (read-only) or a DSJSON file.

The database path reads only the columns a policy needs and decodes the JSON columns in
bulk, because a replay of a few million events must not take longer than the evaluation;
the context features are read only when a VW policy or the DR reward model needs them. They
are the context as used (issue #30): the logged features include the stored profile's values
of decision time, and a decision's own arm features (interaction history, in its ``context``
column) go on its arm lines, so replay never sees today's profile or history.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from itertools import chain, repeat
from operator import itemgetter
from typing import IO, Any

import numpy as np
import orjson
from numpy.typing import NDArray
from sqlalchemy import Engine, Text, and_, cast, create_engine, event, func, or_, select
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from nextbest.bandit.decision_log import LoggedDecision, Outcome, logged_arm_rows
from nextbest.bandit.errors import InvalidInput, NotFound, Unavailable
from nextbest.bandit.features import Feature, features_from_mapping
from nextbest.bandit.offline.dsjson import ArmKey, from_dsjson, to_ccb_dsjson, to_dsjson
from nextbest.bandit.offline.replay_log import ReplayLog
from nextbest.offline.dsjson_reader import MAX_LINE, DsjsonReader
from nextbest.storage import tables as t
from nextbest.storage.sqlcore import decision_from_row
from nextbest.telemetry.gc_pauses import gc_paused

CLOSED = (int(Outcome.REWARD), int(Outcome.DEFAULT))
ArmFeatureRows = dict[ArmKey, dict[str, float | str | bool]]


def _sqlite_read_only(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA query_only=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


@contextmanager
def _connect(url: str) -> Iterator[Connection]:
    """A read-only connection: replay must never change the log it evaluates."""
    if "://" not in url:
        url = f"sqlite:///{url}"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidInput("--db", f"not a database URL: {url!r}") from None
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite and parsed.database and parsed.database != ":memory:" and not os.path.exists(parsed.database):
        raise NotFound(f"no SQLite database at {parsed.database}")  # connecting would create one
    engine: Engine | None = None
    try:
        engine = create_engine(url)
        if sqlite:
            event.listen(engine, "connect", _sqlite_read_only)
        with engine.connect() as conn:
            if not sqlite:
                conn = conn.execution_options(postgresql_readonly=True)
            yield conn
    except SQLAlchemyError as e:
        raise Unavailable(f"cannot read the database: {e.__class__.__name__}: {e.args[0] if e.args else ''}") from e
    finally:
        if engine is not None:
            engine.dispose()


def read_snapshot(url: str, placement: str, model: str) -> bytes:
    """A placement's saved model ("" its own, a variant id, or "shadow:<id>"), as VW model bytes."""
    s = t.snapshots.c
    with _connect(url) as conn:
        row = conn.execute(select(s.model).where(s.placement_id == placement, s.model_name == model)).first()
    if row is None:
        raise NotFound(f"placement {placement!r} has no saved model {model or '(its own)'!r}")
    return bytes(row.model)


def _where(placement: str, since: float | None, until: float | None, no_offer: bool = False) -> list[Any]:
    """Closed decisions with an arm; with ``no_offer`` also pacing's "no offer" decisions
    (no arm, but a positive logged probability: the replay counts them with reward 0) whose
    reward window would have closed by now, like the shown ones beside them."""
    d = t.decisions.c
    shown = and_(d.outcome.in_(CLOSED), d.chosen.is_not(None), d.reward.is_not(None))
    if no_offer:
        none = and_(
            d.outcome == int(Outcome.NO_ARM), d.chosen.is_(None), d.probability > 0.0, d.activated.is_(True), d.deadline <= time.time()
        )
        shown = or_(shown, none)
    out = [d.placement_id == placement, shown]
    if since is not None:
        out.append(d.created_at >= since)
    if until is not None:
        out.append(d.created_at < until)
    return out


def _arm_features(conn: Connection, placement: str) -> ArmFeatureRows:
    a = t.arm_versions.c
    rows = conn.execute(select(a.arm_id, a.version, a.features).where(a.placement_id == placement)).all()
    return {(r.arm_id, int(r.version)): dict(r.features) for r in rows}


def _bulk_json(texts: Sequence[str]) -> list[Any]:
    """One json.loads over all rows; identical texts (the same arm set) share one object."""
    distinct: dict[str, int] = {}
    idx = [distinct.setdefault(s, len(distinct)) for s in texts]
    values: list[Any] = json.loads("[" + ",".join(distinct) + "]")
    return [values[i] for i in idx]


def _replay_query(placement: str, since: float | None, until: float | None, with_features: bool) -> Any:
    """The columns the replay reads, of the closed decisions of a placement, oldest first (ties
    by event id, then slot)."""
    d = t.decisions.c
    cols = [
        d.event_id,
        d.created_at,
        func.coalesce(d.reward, 0.0),
        d.probability,
        func.coalesce(d.chosen, -1),
        cast(d.arms, Text),
        cast(d.pmf, Text),
    ]
    if with_features:  # the context as used: the features, and each arm's of that decision (history)
        cols += [cast(d.features, Text), cast(d.context, Text)]
    return select(*cols).where(*_where(placement, since, until, no_offer=True)).order_by(d.created_at, d.event_id, d.slot)


def _numbers(texts: Sequence[str]) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """JSON arrays of numbers (the pmf column), all values in one array and each one's length.

    Arrow's CSV reader parses the numbers of all rows in one call, 4 times as fast as numpy's text
    parser and 6 times a JSON parser that makes a Python list per row (the PMF column was the
    largest cost of a replay from the database); a text it cannot read that way goes to orjson."""
    n = len(texts)
    sizes = np.fromiter(map(str.count, texts, repeat(",", n)), np.int64, n)
    sizes += np.fromiter(map(len, texts), np.int64, n) > 2  # "[x]" has 1 value, "[]" none
    body = "".join(texts).replace(" ", "").replace("[]", "").replace("][", ",").replace("[", "").replace("]", "")
    values = np.zeros(0)
    if body:
        with suppress(ValueError):  # pyarrow's ArrowInvalid is one
            values = _parse_floats(body.replace(",", "\n"))
    if len(values) != int(sizes.sum()):  # e.g. "[ 1e400 ]": decode row by row
        rows: list[list[float]] = orjson.loads("[" + ",".join(texts) + "]")
        sizes = np.fromiter(map(len, rows), np.int64, n)
        values = np.fromiter(chain.from_iterable(rows), np.float64, int(sizes.sum()))
    return values, sizes


def _parse_floats(lines: str) -> NDArray[np.float64]:
    """One number per line, as float64 (correctly rounded, as Python's float())."""
    import pyarrow as pa
    from pyarrow import csv

    table = csv.read_csv(
        io.BytesIO(lines.encode()),
        read_options=csv.ReadOptions(column_names=["v"]),
        convert_options=csv.ConvertOptions(column_types={"v": pa.float64()}, strings_can_be_null=False),
    )
    column = table.column("v")
    if column.null_count:
        raise ValueError("empty value")
    return np.asarray(column.to_numpy(), dtype=np.float64)


def _replay_chunk(rows: Sequence[Any], arm_features: Mapping[ArmKey, tuple[Feature, ...]], with_features: bool) -> ReplayLog:
    """Rows of ``_replay_query`` as a ReplayLog. Per row, Python only takes the columns apart and
    looks up the arm set's text; the JSON columns are decoded in bulk, the rest is numpy."""
    n = len(rows)
    event_ids, created, rewards, probs, chosen_col, arm_texts, pmf_texts, *more = (
        list(map(itemgetter(k), rows)) for k in range(len(rows[0]))
    )
    distinct: dict[str, int] = dict.fromkeys(arm_texts, 0)  # a log has few arm sets: code each once
    for i, key in enumerate(distinct):
        distinct[key] = i
    list_ids = np.fromiter(map(distinct.__getitem__, arm_texts), np.int64, n)
    lists: list[list[Any]] = orjson.loads("[" + ",".join(distinct) + "]")
    pmf, pmf_sizes = _numbers(pmf_texts)
    chosen = np.fromiter(chosen_col, np.int64, n)
    contexts = own = None
    if with_features:  # kept as logged: VW's text is made of them when it is needed
        contexts = orjson.loads("[" + ",".join(more[0]) + "]")
        own = _own_arm_features(more[1])
    # A decision without an arm is pacing's "no offer" only if its PMF has that extra entry.
    sizes = np.fromiter(map(len, lists), np.int64, len(lists))[list_ids]
    keep = (chosen >= 0) | (pmf_sizes == sizes + 1)
    times, values, probabilities = (np.fromiter(c, np.float64, n) for c in (created, rewards, probs))
    if not keep.all():
        idx = np.flatnonzero(keep).tolist()
        event_ids = [event_ids[i] for i in idx]
        contexts = None if contexts is None else [contexts[i] for i in idx]
        own = None if own is None else [own[i] for i in idx]
        pmf = pmf[np.repeat(keep, pmf_sizes)]
        times, values, probabilities, chosen, list_ids, pmf_sizes = (
            c[keep] for c in (times, values, probabilities, chosen, list_ids, pmf_sizes)
        )
    return ReplayLog.from_columns(
        event_ids,
        times,
        values,
        probabilities,
        chosen,
        list_ids,
        lists,
        pmf,
        pmf_sizes,
        arm_features=arm_features,
        contexts=contexts,
        event_arm_features=own,
    )


def _own_arm_features(texts: Sequence[str | None]) -> list[Any] | None:
    """Each row's logged arm features of its own (the ``context`` column's arm features,
    interaction history, compact or not: ``logged_arm_rows``), or None for a chunk without any:
    a NULL context is not parsed, and a log without contexts costs one pass over the column."""
    if not any(texts):
        return None
    at = [i for i, text in enumerate(texts) if text]
    parsed: list[Any] = orjson.loads("[" + ",".join([text for text in texts if text]) + "]")
    out: list[Any] = [None] * len(texts)
    for i, ctx in zip(at, parsed, strict=True):
        if isinstance(ctx, dict):  # a JSON null is no context
            out[i] = logged_arm_rows(ctx)
    return out if any(out) else None


def _driver_rows(conn: Connection, stmt: Any, chunk: int) -> Generator[list[tuple[Any, ...]], None, None]:
    """The statement's rows, ``chunk`` at a time, straight from the driver's cursor: plain
    tuples, without a Row object per row (every column is a number or a text already), through
    a server-side cursor on PostgreSQL so that the client holds one chunk. SQLAlchemy compiles
    the statement and, by running a first statement, opens the (read-only) transaction."""
    compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    params = compiled.construct_params()
    args: Any = tuple(params[k] for k in compiled.positiontup or ()) if conn.dialect.positional else params
    conn.execute(select(1))
    raw: Any = conn.connection.driver_connection
    cursor = raw.cursor(name="nextbest_replay") if conn.dialect.name == "postgresql" else raw.cursor()
    try:
        cursor.execute(str(compiled), args)
        while rows := cursor.fetchmany(chunk):
            yield rows
    finally:
        cursor.close()


def replay_chunks(
    url: str,
    placement: str,
    *,
    since: float | None = None,
    until: float | None = None,
    with_features: bool = False,
    chunk: int = 50_000,
) -> Callable[[], Iterator[ReplayLog]]:
    """The closed decisions of a placement as ReplayLog chunks of ``chunk`` rows, oldest first,
    read afresh at each call through a cursor (server-side on PostgreSQL), so that a replay
    holds one chunk, not the log. The first call raises NotFound for an empty period."""
    stmt = _replay_query(placement, since, until, with_features)
    arm_features: dict[ArmKey, tuple[Feature, ...]] = {}
    if with_features:
        with _connect(url) as conn:
            arm_features = {k: features_from_mapping(v) for k, v in _arm_features(conn, placement).items()}

    def chunks() -> Iterator[ReplayLog]:
        empty = True
        with _connect(url) as conn:
            fetched = _driver_rows(conn, stmt, chunk)
            try:
                while True:
                    with gc_paused():  # the fetch too: it makes a tuple per row
                        rows = next(fetched, None)
                        log = _replay_chunk(rows, arm_features, with_features) if rows is not None else None
                    if log is None:
                        break
                    if log.n:
                        empty = False
                        yield log
            finally:
                fetched.close()  # the cursor, before the connection
        if empty:
            raise NotFound(f"placement {placement!r} has no closed decisions in the chosen period")

    return chunks


def count_replay_events(url: str, placement: str, *, since: float | None = None, until: float | None = None) -> int:
    """How many rows ``replay_chunks`` will read (for a progress bar)."""
    with _connect(url) as conn:
        return int(
            conn.execute(select(func.count()).select_from(t.decisions).where(*_where(placement, since, until, no_offer=True))).scalar_one()
        )


def read_replay_log(
    url: str, placement: str, *, since: float | None = None, until: float | None = None, with_features: bool = False
) -> ReplayLog:
    """The closed decisions of a placement, oldest first, as one ReplayLog in memory (a notebook's view)."""
    with _connect(url) as conn:
        rows = conn.execute(_replay_query(placement, since, until, with_features)).all()
        arm_rows = _arm_features(conn, placement) if with_features else {}
    if not rows:
        raise NotFound(f"placement {placement!r} has no closed decisions in the chosen period")
    return _replay_chunk(rows, {k: features_from_mapping(v) for k, v in arm_rows.items()}, with_features)


def read_decisions(
    url: str, placement: str, *, since: float | None = None, until: float | None = None
) -> tuple[list[LoggedDecision], ArmFeatureRows]:
    """Whole closed decisions (for export), oldest first, and their placement's arm features."""
    d = t.decisions.c
    stmt = select(t.decisions).where(*_where(placement, since, until)).order_by(d.created_at, d.event_id, d.slot)
    with _connect(url) as conn:
        decisions = [decision_from_row(r) for r in conn.execute(stmt)]
        arm_rows = _arm_features(conn, placement)
    if not decisions:
        raise NotFound(f"placement {placement!r} has no closed decisions in the chosen period")
    return decisions, arm_rows


def iter_decisions(
    url: str, placement: str, *, since: float | None = None, until: float | None = None, chunk: int = 10_000
) -> tuple[Iterator[LoggedDecision], ArmFeatureRows]:
    """Closed decisions oldest first, pacing's "no offer" ones included (as the replay reads
    them), fetched ``chunk`` rows at a time (a server-side cursor on PostgreSQL), so that an
    export holds one chunk, not the log; and the placement's arm features. Raises NotFound for
    an empty period before anything is written."""
    d = t.decisions.c
    stmt = select(t.decisions).where(*_where(placement, since, until, no_offer=True)).order_by(d.created_at, d.event_id, d.slot)
    with _connect(url) as conn:
        arm_rows = _arm_features(conn, placement)
        if conn.execute(stmt.limit(1)).first() is None:
            raise NotFound(f"placement {placement!r} has no closed decisions in the chosen period")

    def rows() -> Iterator[LoggedDecision]:
        with _connect(url) as conn:
            for r in conn.execution_options(yield_per=chunk).execute(stmt):
                yield decision_from_row(r)

    return rows(), arm_rows


@contextmanager
def _open(path: str, mode: str) -> Iterator[IO[str]]:
    if path == "-":
        yield sys.stdout if "w" in mode else sys.stdin
        return
    try:
        with open(path, mode, encoding="utf-8") as f:
            yield f
    except OSError as e:
        raise InvalidInput(
            "--out" if "w" in mode else "--log", f"cannot {'write' if 'w' in mode else 'read'} {path}: {e.strerror}"
        ) from None


def write_dsjson(path: str, decisions: Iterable[LoggedDecision], arm_features: ArmFeatureRows, ccb: bool = False) -> int:
    """Write one DSJSON line per decision ("-" is standard output), or with ``ccb`` one CCB line
    per multi-slot event whose every slot is closed; returns how many lines."""
    n = 0
    with _open(path, "w") as f:
        if ccb:
            events: dict[str, list[LoggedDecision]] = {}
            for dec in decisions:
                events.setdefault(dec.event_id, []).append(dec)
            for rows in events.values():
                if any(r.slot == 0 for r in rows):
                    f.write(to_ccb_dsjson(rows, arm_features))
                    f.write("\n")
                    n += 1
            return n
        for dec in decisions:
            f.write(to_dsjson(dec, arm_features))
            f.write("\n")
            n += 1
    return n


def _dsjson_lines(
    path: str, placement: str | None, since: float | None, until: float | None
) -> Iterator[tuple[int, LoggedDecision, dict[ArmKey, dict[str, float | str | bool]]]]:
    """The file's decisions of ``placement`` in the period, with their line numbers."""
    with _open(path, "r") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                dec, arms = from_dsjson(line)
            except InvalidInput as e:
                raise InvalidInput("--log", f"{path}, line {number}: {e}") from None
            if placement and dec.placement and dec.placement != placement:
                continue
            if (since is not None and dec.timestamp < since) or (until is not None and dec.timestamp >= until):
                continue
            yield number, dec, arms


def _no_events(path: str, placement: str | None) -> NotFound:
    return NotFound(f"{path} has no closed decisions{f' of {placement!r}' if placement else ''} in the chosen period")


def read_dsjson(path: str, placement: str | None = None, *, since: float | None = None, until: float | None = None) -> ReplayLog:
    """A replay log from a DSJSON file, whole in memory, ordered like the database path."""
    decisions: list[LoggedDecision] = []
    arm_rows: ArmFeatureRows = {}
    for _, dec, arms in _dsjson_lines(path, placement, since, until):
        decisions.append(dec)
        arm_rows.update(arms)
    decisions.sort(key=lambda x: (x.timestamp, x.event_id))
    log = ReplayLog.from_decisions(decisions, arm_rows)
    if log.n == 0:
        raise _no_events(path, placement)
    return log


def dsjson_chunks(
    path: str,
    placement: str | None = None,
    *,
    since: float | None = None,
    until: float | None = None,
    with_features: bool = False,
    chunk: int = 50_000,
    time_order: bool = True,
    max_line: int = MAX_LINE,
) -> DsjsonReader:
    """A DSJSON file as ReplayLog chunks, read afresh at each call, so that a replay holds one
    chunk. Standard input ("-") is first copied to a temporary file, as DR reads the log twice.
    With ``time_order`` (VW candidates learn the log in it) an event older than the one before
    it raises LogOutOfOrder; without, the file streams in any order (IPS, SNIPS, DR and the
    policies that do not learn need none). A line longer than ``max_line`` bytes, or one whose
    probabilities are not a distribution that agrees with its label, is refused naming its line;
    a pass that found nothing raises NotFound. The context features are decoded only
    ``with_features`` (VW candidates and DR need them). The reader's ``first`` and ``last`` are
    the time span of the events of its last pass."""
    shown = path
    if path == "-":
        spool = tempfile.NamedTemporaryFile("wb", prefix="nextbest-replay-", suffix=".json", delete=False)
        with spool:
            shutil.copyfileobj(sys.stdin.buffer, spool)
        atexit.register(os.unlink, spool.name)
        path, shown = spool.name, "standard input"
    return DsjsonReader(path, shown, placement, since, until, with_features, chunk, time_order=time_order, max_line=max_line)
