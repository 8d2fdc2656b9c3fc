"""What every part of the SQL store shares: the connection helpers and the row mapping."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import Engine
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from nextbest.bandit.decision_log import DecisionContext, Explanation, LoggedDecision, Outcome
from nextbest.bandit.errors import Unavailable
from nextbest.storage.base import features_of


class SqlBase:
    """The state the SQL store's parts share."""

    engine: Engine
    _postgres: bool
    _lock: Any  # the learner lock, while this process holds it
    owner: str | None  # this server's id once registered

    def _begin(self) -> _Tx:
        return _Tx(self.engine, begin=True)

    def _connect(self) -> _Tx:
        return _Tx(self.engine, begin=False)


class _Tx:
    """A connection (in a transaction when begin) whose database errors become Unavailable."""

    def __init__(self, engine: Engine, begin: bool) -> None:
        self._engine = engine
        self._begin = begin
        self._cm: Any = None

    def __enter__(self) -> Connection:
        try:
            self._cm = self._engine.begin() if self._begin else self._engine.connect()
            conn: Connection = self._cm.__enter__()
            return conn
        except SQLAlchemyError as e:
            raise Unavailable(f"database unavailable: {e.__class__.__name__}") from e

    def __exit__(self, *exc: Any) -> None:
        try:
            self._cm.__exit__(*exc)
        except SQLAlchemyError as e:
            raise Unavailable(f"database unavailable: {e.__class__.__name__}") from e
        if exc[0] is not None and isinstance(exc[1], SQLAlchemyError):
            raise Unavailable(f"database error: {exc[0].__name__}") from exc[1]


# The decision log's hot write goes to the driver directly, JSON pre-serialized by orjson:
# through SQLAlchemy's JSON type it cost 90-140 µs a row at 20 arms, this about a fifth (measured
# by `nextbest bench --phases server_time`). ``decision_from_row`` reads it back.
_DECISION_COLUMNS = (
    "event_id",
    "placement_id",
    "customer_id",
    "created_at",
    "deadline",
    "features",
    "arms",
    "pmf",
    "chosen",
    "arm_id",
    "probability",
    "model_version",
    "outcome",
    "reward",
    "learn_seq",
    "cost",
    "reward_cost",
    "budgets",
    "ineligible",
    "variant",
    "slot",
    "activated",
    "owner",
    "explain",
    "context",
)


def insert_decisions_sql(postgres: bool, rows: int) -> str:
    """INSERT of ``rows`` decision rows (run it with ``exec_numbered``), returning the keys it
    inserted: a reused (event_id, slot) keeps its first decision, the newcomer is left out (and
    told so) instead of failing the batch. PostgreSQL's own placeholders, ``$1``, ``$2``, ..."""
    n = len(_DECISION_COLUMNS)
    cols = ", ".join(_DECISION_COLUMNS)
    if postgres:
        values = ", ".join(f"({', '.join(f'${r * n + k}' for k in range(1, n + 1))})" for r in range(rows))
    else:
        values = ", ".join([f"({', '.join('?' * n)})"] * rows)
    return f"INSERT INTO decisions ({cols}) VALUES {values} ON CONFLICT DO NOTHING RETURNING event_id, slot"


def exec_numbered(c: Connection, sql: str, params: tuple[Any, ...], postgres: bool) -> Sequence[Any]:
    """Run a statement with ``$n`` placeholders on PostgreSQL (``?`` on SQLite), and fetch its
    rows. On PostgreSQL through psycopg's RawCursor, which sends ``$n`` as they are: the default
    cursor rewrites ``%s`` ones with a regular expression on every call and caches none of more
    than 50 parameters, so a group commit's multi-row INSERT of decisions cost the log writer's
    thread ~230 us per decision (in process, plain placement: 248 us against 16 with this).
    SQLAlchemy still runs it: its errors and their wrapping are unchanged."""
    if not postgres:
        return c.exec_driver_sql(sql, params).all()
    import psycopg

    raw: Any = c.connection.driver_connection
    factory = raw.cursor_factory
    raw.cursor_factory = psycopg.RawCursor
    try:
        return c.exec_driver_sql(sql, params).all()
    finally:
        raw.cursor_factory = factory


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def decision_params(d: LoggedDecision, owner: str | None) -> tuple[Any, ...]:
    """The row of ``insert_decisions_sql`` for one decision, whose window ``owner`` holds."""
    return (
        d.event_id,
        d.placement,
        d.customer_id,
        d.timestamp,
        d.deadline,
        _json(d.features),
        _json(d.arms),
        _json(d.pmf),
        d.chosen,
        d.arm_id,
        d.probability,
        d.model_version,
        int(d.outcome),
        d.reward,
        d.learn_seq,
        d.cost,
        d.reward_cost,
        _json(d.budgets) if d.budgets else None,
        _json(d.ineligible) if d.ineligible else None,
        d.variant,
        d.slot,
        d.activated,
        owner,
        _explain(d),
        _json(d.context.serializable()) if d.context is not None and not d.context.empty else None,
    )


def _explain(d: LoggedDecision) -> str | None:
    """The ``explain`` column: the explanation, and the reason when no arm or the fallback was
    served (which the rest of the row does not say)."""
    if d.explanation is None and not d.reason:
        return None
    out = d.explanation.to_json() if d.explanation is not None else {}
    if d.reason:
        out["reason"] = d.reason
    return _json(out)


def decision_from_row(r: Any) -> LoggedDecision:
    return LoggedDecision(
        event_id=r.event_id,
        placement=r.placement_id,
        customer_id=r.customer_id,
        timestamp=r.created_at,
        features=features_of(r.features),
        arms=tuple((a, int(v)) for a, v in r.arms),
        pmf=tuple(r.pmf),
        chosen=r.chosen,
        probability=r.probability,
        model_version=r.model_version,
        deadline=r.deadline,
        outcome=Outcome(r.outcome),
        reward=r.reward,
        learn_seq=r.learn_seq,
        cost=r.cost,
        reward_cost=r.reward_cost,
        budgets=tuple((k, p) for k, p in r.budgets or ()),
        ineligible=tuple((a, why) for a, why in r.ineligible or ()),
        variant=r.variant,
        slot=r.slot,
        activated=bool(r.activated),
        reason=(r.explain or {}).get("reason", ""),
        explanation=Explanation.from_json(r.explain) if r.explain and r.explain.get("policy") else None,
        context=DecisionContext.from_json(getattr(r, "context", None)),
    )
