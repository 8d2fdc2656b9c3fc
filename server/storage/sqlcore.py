"""What every part of the SQL store shares: the connection helpers and the row mapping."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from bandit.errors import Unavailable
from bandit.features import Feature
from bandit.log import LoggedDecision, Outcome


class SqlBase:
    """The state the SQL store's parts share."""

    engine: Engine
    _postgres: bool
    _lock: Any  # the learner lock, while this process holds it

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


def decision_row(d: LoggedDecision) -> dict[str, Any]:
    return {
        "event_id": d.event_id,
        "placement_id": d.placement,
        "customer_id": d.customer_id,
        "created_at": d.timestamp,
        "deadline": d.deadline,
        "features": [[f.namespace, f.name, f.value] for f in d.features],
        "arms": [list(a) for a in d.arms],
        "pmf": list(d.pmf),
        "chosen": d.chosen,
        "arm_id": d.arm_id,
        "probability": d.probability,
        "model_version": d.model_version,
        "outcome": int(d.outcome),
        "reward": d.reward,
        "learn_seq": d.learn_seq,
        "cost": d.cost,
        "reward_cost": d.reward_cost,
        "budgets": [list(b) for b in d.budgets] or None,
        "ineligible": [list(x) for x in d.ineligible] or None,
        "variant": d.variant,
        "slot": d.slot,
        "activated": d.activated,
    }


def decision_from_row(r: Any) -> LoggedDecision:
    return LoggedDecision(
        event_id=r.event_id,
        placement=r.placement_id,
        customer_id=r.customer_id,
        timestamp=r.created_at,
        features=tuple(Feature(ns, name, v if isinstance(v, str) else float(v)) for ns, name, v in r.features),
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
    )
