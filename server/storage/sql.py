"""The SQL store: SQLite (default, WAL) and PostgreSQL through SQLAlchemy."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson
from sqlalchemy import (
    Engine,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from nextbest.bandit.decision_log import LoggedDecision, Outcome, aggregate
from nextbest.bandit.errors import Unavailable
from nextbest.bandit.spec import ArmSpec, CampaignSpec, PlacementSpec
from nextbest.storage import migrate
from nextbest.storage import tables as t
from nextbest.storage.base import (
    FIRST,
    Activation,
    Close,
    LearnRow,
    PlacementRecord,
    RecentImpression,
    Recorded,
    RewardEvent,
    Snapshot,
    WriteResult,
)
from nextbest.storage.contacts import ContactQueries
from nextbest.storage.conversions import ConversionQueries
from nextbest.storage.coordination import Coordination
from nextbest.storage.profiles import ProfileQueries
from nextbest.storage.secrets import Secrets
from nextbest.storage.sqlcore import decision_from_row, decision_params, exec_numbered, insert_decisions_sql
from nextbest.storage.tallies import StatsQueries

_CLOSE_CHUNK = 400  # rows per UPDATE: 2,800 parameters, far below SQLite's and PostgreSQL's limits
_INSERT_CHUNK = 500  # decisions per INSERT: 12,000 parameters (SQLite's limit is 32,766, PostgreSQL's 65,535)


def open_store(url: str) -> SqlStore:
    """A store for a SQLAlchemy URL; a plain path means a SQLite file."""
    if "://" not in url:
        url = f"sqlite:///{url}"
    return SqlStore(url)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # The wait first: switching a fresh database to WAL takes its write lock, and two servers
    # starting at once on one (--workers) had the second fail at once with "database is locked".
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # an acknowledged reward survives power loss
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class SqlStore(Coordination, StatsQueries, ContactQueries, ProfileQueries, ConversionQueries, Secrets):
    """Store on any SQLAlchemy URL; the schema is created or migrated to head on opening."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._postgres = url.startswith("postgresql")
        self._lock: Any = None  # the learner lock, while this process holds it
        self._init_held()  # PostgreSQL: worker threads' own connections (storage/contacts.py)
        self.owner: str | None = None  # this server's id (register_server), written with its decisions
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=8, max_overflow=8)
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        mark = "%s" if self._postgres else "?"
        self._insert_sql: dict[int, str] = {}  # decision INSERTs by rows
        self._insert_events = (
            "INSERT INTO reward_events (event_id, slot, reward, received_at, kind, reward_id) "
            f"VALUES ({', '.join([mark] * 6)}) ON CONFLICT DO NOTHING RETURNING id"  # a retried key is stored once
        )
        # An "agg" reward once its window was found open (and locked): a retried key is stored once.
        self._insert_agg = (
            "INSERT INTO reward_events (event_id, slot, reward, received_at, kind, reward_id) "
            f"VALUES ({mark}, {mark}, {mark}, {mark}, 'agg', {mark}) ON CONFLICT DO NOTHING RETURNING id"
        )
        self._set_learn_seq = f"UPDATE decisions SET learn_seq = {mark} WHERE event_id = {mark} AND slot = {mark} AND learn_seq IS NULL"
        try:
            migrate.upgrade(self.engine)  # creates or migrates the schema (server/storage/migrations)
        except SQLAlchemyError as e:
            raise Unavailable(f"cannot open the database: {e.__class__.__name__}") from e

    # -- configuration ------------------------------------------------------------------

    def load_placements(self) -> list[PlacementRecord]:
        with self.engine.connect() as c:
            arm_rows = c.execute(select(t.arms).order_by(t.arms.c.placement_id, t.arms.c.position)).all()
            features = {(r.placement_id, r.arm_id, r.version): r.features for r in c.execute(select(t.arm_versions)).all()}
            out = []
            for p in c.execute(select(t.placements).order_by(t.placements.c.id)).all():
                mine = [a for a in arm_rows if a.placement_id == p.id]
                raw = dict(p.spec)
                settings = raw.pop("arm_settings", None) or {}  # costs, budget, campaign, ... by arm id
                arms = [
                    ArmSpec.model_validate(
                        {
                            **settings.get(a.arm_id, {}),
                            "id": a.arm_id,
                            "features": features[(p.id, a.arm_id, a.version)],
                            "active": a.active,
                        }
                    )
                    for a in mine
                ]
                spec = PlacementSpec.model_validate({**raw, "id": p.id, "arms": arms})
                out.append(PlacementRecord(spec, {a.arm_id: a.version for a in mine}, p.generation, p.model_since_seq))
            return out

    def arm_features(self) -> dict[tuple[str, str, int], dict[str, float | str | bool]]:
        with self.engine.connect() as c:
            return {(r.placement_id, r.arm_id, r.version): r.features for r in c.execute(select(t.arm_versions)).all()}

    def save_placements(
        self,
        records: Sequence[PlacementRecord],
        new_arm_versions: Sequence[tuple[str, str, int, dict[str, float | str | bool]]],
        campaigns: Sequence[CampaignSpec] = (),
        snapshots: Sequence[Snapshot] = (),
    ) -> None:
        now = time.time()
        with self._begin() as c:
            for snap in snapshots:
                self._put_snapshot(c, snap)
            for camp in campaigns:
                spec = camp.model_dump(mode="json", by_alias=True, exclude={"id"})
                values = {"spec": spec, "updated_at": now}
                if c.execute(update(t.campaigns).where(t.campaigns.c.id == camp.id).values(**values)).rowcount == 0:
                    c.execute(insert(t.campaigns).values(id=camp.id, **values))
            if new_arm_versions:
                c.execute(
                    insert(t.arm_versions),
                    [{"placement_id": p, "arm_id": a, "version": v, "features": f} for p, a, v, f in new_arm_versions],
                )
            for rec in records:
                spec = rec.spec.model_dump(mode="json", by_alias=True, exclude={"id", "arms"})
                spec["arm_settings"] = {
                    a.id: a.model_dump(mode="json", by_alias=True, exclude={"id", "features", "active"}, exclude_defaults=True)
                    for a in rec.spec.arms
                }
                row = {"spec": spec, "generation": rec.generation, "model_since_seq": rec.model_since_seq, "updated_at": now}
                if c.execute(update(t.placements).where(t.placements.c.id == rec.spec.id).values(**row)).rowcount == 0:
                    c.execute(insert(t.placements).values(id=rec.spec.id, **row))
                c.execute(delete(t.arms).where(t.arms.c.placement_id == rec.spec.id))
                if rec.spec.arms:
                    c.execute(
                        insert(t.arms),
                        [
                            {
                                "placement_id": rec.spec.id,
                                "arm_id": a.id,
                                "position": i,
                                "version": rec.arm_versions[a.id],
                                "active": a.active,
                            }
                            for i, a in enumerate(rec.spec.arms)
                        ],
                    )
            self.config_changed(c, records, campaigns)  # budget limits, the serial, the notification

    def load_campaigns(self) -> list[CampaignSpec]:
        with self._connect() as c:
            rows = c.execute(select(t.campaigns).order_by(t.campaigns.c.id)).all()
        return [CampaignSpec.model_validate({**r.spec, "id": r.id}) for r in rows]

    def recent_impressions(self, since: float) -> list[RecentImpression]:
        d = t.decisions.c
        with self._connect() as c:
            rows = c.execute(
                select(d.customer_id, d.arm_id, d.placement_id, d.event_id, d.created_at, d.outcome, d.reward)
                .where(d.created_at >= since, d.arm_id.is_not(None), d.customer_id != "")
                .order_by(d.created_at)
            ).all()
        return [RecentImpression(r[0], r[1], r[2], r[3], r[4], Outcome(r[5]), r[6]) for r in rows]

    # -- the decision log -----------------------------------------------------------------

    def write(
        self,
        decisions: Sequence[LoggedDecision],
        closes: Sequence[Close],
        activations: Sequence[Activation] = (),
        events: Sequence[RewardEvent] = (),
        assign: bool = False,
    ) -> WriteResult:
        """Insert decisions, then activate, store reward events and close windows, in one
        transaction (group commit).

        Decisions go first so that a reward in the same batch finds its decision: a decision
        is durable no later than any reward acknowledged for it. Budget spend moves with them:
        an impression cost is spent at the decision (held until activation if deferred), a
        reward cost is held until the window closes; a decision not inserted (its id is taken)
        moves nothing. Every write acting on a decision is bound to it (its placement, and its
        owner where the writer holds the window): see Close.placement.
        """
        spend: dict[tuple[str, str], list[float]] = {}  # (key, period) -> [spent, reserved] deltas

        def add(keys: Sequence[tuple[str, str]], spent: float, reserved: float) -> None:
            for kp in keys:
                acc = spend.setdefault(kp, [0.0, 0.0])
                acc[0] += spent
                acc[1] += reserved

        closed: list[bool] = []
        stored: list[Close | None] = []
        activated: list[bool] = []
        learnable: list[tuple[str, int]] = []
        with self._begin() as c:
            inserted = self._insert(c, decisions) if decisions else []
            for d, ok in zip(decisions, inserted, strict=True):
                if not ok:
                    continue
                if d.activated:
                    add(d.budgets, d.cost, d.reward_cost)
                else:
                    add(d.budgets, 0.0, d.cost + d.reward_cost)
            for act in activations:
                activated.append(self._activate(c, act))
                if activated[-1]:
                    add(act.budgets, act.cost, -act.cost)
            firsts = self._set_firsts(c, [e for e in events if e.kind == FIRST])
            recorded: list[Recorded] = []
            for e in events:
                if e.kind == FIRST:
                    recorded.append(firsts.pop((e.event_id, e.slot), Recorded.DUPLICATE))  # later twins: DUPLICATE
                elif e.kind == "agg":
                    recorded.append(self._store_agg(c, e))
                else:  # late: kept whatever the window's state, a key once
                    row = (e.event_id, e.slot, e.reward, e.at, e.kind, e.reward_id)
                    recorded.append(Recorded.STORED if c.exec_driver_sql(self._insert_events, row).all() else Recorded.DUPLICATE)
            done = self._close_all(c, closes)
            for close in closes:
                got = done.pop((close.event_id, close.slot), None)  # a second close of one window fails
                if got is not None and got != (close.outcome, close.reward if close.learnable else None):
                    close = replace(close, outcome=got[0], reward=got[1] if got[1] is not None else close.reward)
                closed.append(got is not None)
                stored.append(close if got is not None else None)
                if got is None:
                    continue
                if close.learnable:
                    add(close.budgets, close.reward_cost if close.incurred else 0.0, -close.reward_cost)
                    if assign:
                        learnable.append((close.event_id, close.slot))
                else:  # never activated: release everything it held
                    add(close.budgets, 0.0, -(close.cost + close.reward_cost))
            if learnable:  # the learner's own closes get their learn positions in the same commit
                self._assign(c, learnable)
            a, lc = t.budget_accounts.c, t.budget_leases.c
            for (key, period), (ds, dr) in spend.items():
                c.execute(
                    update(t.budget_accounts).where(a.key == key, a.period == period).values(spent=a.spent + ds, reserved=a.reserved + dr)
                )
                if self.owner is not None and ds + dr != 0.0:  # from this server's own lease
                    mine = (lc.key == key, lc.period == period, lc.server_id == self.owner)
                    c.execute(update(t.budget_leases).where(*mine).values(used=lc.used + (ds + dr)))
        return WriteResult(closed, activated, stored, recorded, inserted)

    def _insert(self, c: Connection, decisions: Sequence[LoggedDecision]) -> list[bool]:
        """Insert the decisions, a multi-row INSERT ... RETURNING per chunk; per decision whether
        it was inserted (the first of twins in a batch is; a key taken before is not)."""
        owner = self.owner
        taken: set[tuple[str, int]] = set()
        for start in range(0, len(decisions), _INSERT_CHUNK):
            chunk = decisions[start : start + _INSERT_CHUNK]
            sql = self._insert_sql.get(len(chunk))
            if sql is None:
                sql = self._insert_sql[len(chunk)] = insert_decisions_sql(self._postgres, len(chunk))
            params = tuple(v for d in chunk for v in decision_params(d, owner))
            taken.update((e, int(s)) for e, s in exec_numbered(c, sql, params, self._postgres))
        out = []
        for d in decisions:
            key = (d.event_id, d.slot)
            out.append(key in taken)
            taken.discard(key)  # a later twin in the batch was not inserted
        return out

    @staticmethod
    def _bound(cols: Any, placement: str | None, owner: str | None) -> list[Any]:
        """The conditions binding a write to its decision (see Close.placement)."""
        out = []
        if placement is not None:
            out.append(cols.placement_id == placement)
        if owner is not None:
            out.append(cols.owner == owner)
        return out

    def _activate(self, c: Connection, act: Activation) -> bool:
        d_ = t.decisions.c
        res = c.execute(
            update(t.decisions)
            .where(
                d_.event_id == act.event_id,
                d_.slot == act.slot,
                d_.outcome == int(Outcome.OPEN),
                d_.activated.is_(False),
                *self._bound(d_, act.placement, act.owner),
            )
            .values(activated=True, deadline=act.deadline)
        )
        return bool(res.rowcount > 0)

    def _open_window(self, e: RewardEvent) -> Any:
        """The open, activated decision a FIRST or "agg" event of ``e`` may act on."""
        d_ = t.decisions.c
        return select(d_.event_id, d_.slot, d_.reward).where(
            d_.event_id == e.event_id,
            d_.slot == e.slot,
            d_.outcome == int(Outcome.OPEN),
            d_.activated.is_(True),
            *self._bound(d_, e.placement, e.owner),
        )

    def _store_agg(self, c: Connection, e: RewardEvent) -> Recorded:
        """One reward to aggregate, stored only while its window is open: the window's row is
        locked first (PostgreSQL; SQLite has one writer), so a close either sees it or it sees
        the close and stores nothing (CLOSED): no acknowledged reward misses its aggregate."""
        window = self._open_window(e)
        if self._postgres:
            window = window.with_for_update()
        if c.execute(window).first() is None:
            return Recorded.CLOSED
        res = c.exec_driver_sql(self._insert_agg, (e.event_id, e.slot, e.reward, e.at, e.reward_id)).all()
        return Recorded.STORED if res else Recorded.DUPLICATE

    def _close_all(self, c: Connection, closes: Sequence[Close]) -> dict[tuple[str, int], tuple[Outcome, float | None]]:
        """Close windows still open, one UPDATE ... FROM (VALUES ...) RETURNING per chunk
        instead of a statement per close; returns the (event, slot) pairs it closed, with the
        outcome and reward stored. A close of a row holding a first reward (learn_at:
        window_close) stores that reward, as REWARD, whatever the close brought: decided in the
        UPDATE itself, on the row as it is when it is updated. A close with ``aggregation``
        then folds in the "agg" reward events of the window, read after the UPDATE locked the
        row: a reward stored by any server before it is counted, and none can be stored after."""
        done: dict[tuple[str, int], tuple[Outcome, float | None]] = {}
        first: dict[tuple[str, int], Close] = {}
        for cl in closes:  # a window closes once: the first close of it in the batch is the one
            first.setdefault((cl.event_id, cl.slot), cl)
        unique = list(first.values())
        for start in range(0, len(unique), _CLOSE_CHUNK):
            chunk = unique[start : start + _CLOSE_CHUNK]
            params: list[Any] = []
            for cl in chunk:
                params += (cl.event_id, cl.slot, int(cl.outcome), cl.reward if cl.learnable else None, cl.at, cl.placement, cl.owner)
            for event_id, slot, outcome, reward in exec_numbered(c, self._close_sql(len(chunk)), tuple(params), self._postgres):
                done[(event_id, int(slot))] = (Outcome(int(outcome)), None if reward is None else float(reward))
        folding = [cl for cl in unique if cl.aggregation is not None and cl.learnable and (cl.event_id, cl.slot) in done]
        if folding:
            self._fold(c, folding, done)
        return done

    def _fold(self, c: Connection, closes: Sequence[Close], done: dict[tuple[str, int], tuple[Outcome, float | None]]) -> None:
        """Store the aggregate of each closed window's rewards: the first reward the row held
        (the close's UPDATE took it as REWARD) and its "agg" events in the order stored."""
        r = t.reward_events.c
        gathered: dict[tuple[str, int], list[float]] = {}
        for cl in closes:
            outcome, reward = done[(cl.event_id, cl.slot)]
            if outcome == Outcome.REWARD and reward is not None:
                gathered[(cl.event_id, cl.slot)] = [reward]  # the row's first reward, or the close's own
        ids = sorted({cl.event_id for cl in closes})
        for start in range(0, len(ids), _CLOSE_CHUNK):
            these = ids[start : start + _CLOSE_CHUNK]
            rows = c.execute(select(r.event_id, r.slot, r.reward).where(r.kind == "agg", r.event_id.in_(these)).order_by(r.id)).all()
            for event_id, slot, reward in rows:
                key = (event_id, int(slot))
                if key in done:
                    gathered.setdefault(key, []).append(float(reward))
        updates = []
        for cl in closes:
            key = (cl.event_id, cl.slot)
            values = gathered.get(key)
            if not values:
                continue
            value = aggregate(cl.aggregation or "earliest", values)
            if done[key] != (Outcome.REWARD, value):
                done[key] = (Outcome.REWARD, value)
                updates.append({"o": int(Outcome.REWARD), "r": value, "e": cl.event_id, "s": cl.slot})
        if updates:
            d_ = t.decisions.c
            c.execute(
                update(t.decisions)
                .where(d_.event_id == bindparam("e"), d_.slot == bindparam("s"))
                .values(outcome=bindparam("o"), reward=bindparam("r")),
                updates,
            )

    def _set_firsts(self, c: Connection, events: Sequence[RewardEvent]) -> dict[tuple[str, int], Recorded]:
        """Put first rewards on the rows of open, activated decisions that have none, one
        UPDATE ... FROM (VALUES ...) RETURNING per chunk like the closes; returns per (event,
        slot) whether it took its first (STORED), had one (DUPLICATE) or is not open (CLOSED).
        Within a batch the first of a pair's events is the one. On the row, every server's
        first reward and every close see the same value (the close takes it: _close_all)."""
        done: dict[tuple[str, int], Recorded] = {}
        first: dict[tuple[str, int], RewardEvent] = {}
        for e in events:
            first.setdefault((e.event_id, e.slot), e)
        unique = list(first.values())
        for start in range(0, len(unique), _CLOSE_CHUNK):
            chunk = unique[start : start + _CLOSE_CHUNK]
            params: list[Any] = []
            for e in chunk:
                params += (e.event_id, e.slot, e.reward, e.at, e.placement, e.owner)
            for event_id, slot in c.exec_driver_sql(self._first_sql(len(chunk)), tuple(params)).all():
                done[(event_id, int(slot))] = Recorded.STORED
        for e in unique:
            if (e.event_id, e.slot) not in done:  # refused: a first reward there already, or not open
                row = c.execute(self._open_window(e)).first()
                done[(e.event_id, e.slot)] = Recorded.DUPLICATE if row is not None and row.reward is not None else Recorded.CLOSED
        return done

    def _first_sql(self, n: int) -> str:
        open_without = f"outcome = {int(Outcome.OPEN)} AND {{t}}.activated AND {{t}}.reward IS NULL"
        if self._postgres:
            row = "(%s::varchar, %s::int, %s::float8, %s::float8, %s::varchar, %s::varchar)"
            return (
                "UPDATE decisions AS d SET reward = v.r, rewarded_at = v.a "
                f"FROM (VALUES {', '.join([row] * n)}) AS v(e, s, r, a, p, w) "
                f"WHERE d.event_id = v.e AND d.slot = v.s AND d.{open_without.format(t='d')} "
                "AND (v.p IS NULL OR d.placement_id = v.p) AND (v.w IS NULL OR d.owner = v.w) RETURNING d.event_id, d.slot"
            )
        return (
            "UPDATE decisions SET reward = v.column3, rewarded_at = v.column4 "
            f"FROM (VALUES {', '.join(['(?, ?, ?, ?, ?, ?)'] * n)}) AS v "
            "WHERE decisions.event_id = v.column1 AND decisions.slot = v.column2 "
            f"AND decisions.{open_without.format(t='decisions')} "
            "AND (v.column5 IS NULL OR decisions.placement_id = v.column5) AND (v.column6 IS NULL OR decisions.owner = v.column6) "
            "RETURNING decisions.event_id, decisions.slot"
        )

    def _close_sql(self, n: int) -> str:
        if self._postgres:
            row = "(${}::varchar, ${}::int, ${}::smallint, ${}::float8, ${}::float8, ${}::varchar, ${}::varchar)"
            taken = f"v.o IN ({int(Outcome.DEFAULT)}, {int(Outcome.REWARD)}) AND d.reward IS NOT NULL"
            return (
                f"UPDATE decisions AS d SET outcome = CASE WHEN {taken} THEN {int(Outcome.REWARD)} ELSE v.o END, "
                f"reward = CASE WHEN {taken} THEN d.reward ELSE v.r END, rewarded_at = v.a "
                f"FROM (VALUES {', '.join(row.format(*range(7 * k + 1, 7 * k + 8)) for k in range(n))}) AS v(e, s, o, r, a, p, w) "
                f"WHERE d.event_id = v.e AND d.slot = v.s AND d.outcome = {int(Outcome.OPEN)} "
                "AND (v.p IS NULL OR d.placement_id = v.p) AND (v.w IS NULL OR d.owner = v.w) "
                f"AND (v.o <> {int(Outcome.NOT_ACTIVATED)} OR NOT d.activated) "
                "RETURNING d.event_id, d.slot, d.outcome, d.reward"
            )
        taken = f"v.column3 IN ({int(Outcome.DEFAULT)}, {int(Outcome.REWARD)}) AND decisions.reward IS NOT NULL"
        return (
            f"UPDATE decisions SET outcome = CASE WHEN {taken} THEN {int(Outcome.REWARD)} ELSE v.column3 END, "
            f"reward = CASE WHEN {taken} THEN decisions.reward ELSE v.column4 END, rewarded_at = v.column5 "
            f"FROM (VALUES {', '.join(['(?, ?, ?, ?, ?, ?, ?)'] * n)}) AS v "
            "WHERE decisions.event_id = v.column1 AND decisions.slot = v.column2 "
            f"AND decisions.outcome = {int(Outcome.OPEN)} "
            "AND (v.column6 IS NULL OR decisions.placement_id = v.column6) AND (v.column7 IS NULL OR decisions.owner = v.column7) "
            f"AND (v.column3 <> {int(Outcome.NOT_ACTIVATED)} OR NOT decisions.activated) "
            "RETURNING decisions.event_id, decisions.slot, decisions.outcome, decisions.reward"
        )

    def open_reward_events(self) -> list[RewardEvent]:
        """Rewards waiting to be aggregated when their window closes (to rebuild after a restart)."""
        r, d = t.reward_events.c, t.decisions.c
        with self._connect() as c:
            rows = c.execute(
                select(r.event_id, r.slot, r.reward, r.received_at, r.kind, r.reward_id)
                .select_from(t.reward_events.join(t.decisions, and_(r.event_id == d.event_id, r.slot == d.slot)))
                .where(r.kind == "agg", d.outcome == int(Outcome.OPEN))
                .order_by(r.id)
            ).all()
        return [RewardEvent(*row) for row in rows]

    def max_learn_seq(self) -> int:
        with self._connect() as c:
            v = c.execute(select(t.counters.c.value).where(t.counters.c.name == "learn_seq")).scalar()
        return int(v or 0)

    def claim(self, placement: str, limit: int) -> int:
        """Give learn positions to closed, learnable decisions of a placement that have none,
        in the order their windows closed; returns how many. Only the learner calls this, so
        the learn order is one order, whichever server wrote the rewards."""
        d = t.decisions.c
        with self._begin() as c:
            rows = c.execute(
                select(d.event_id, d.slot)
                .where(
                    d.placement_id == placement,
                    d.outcome.in_([int(Outcome.REWARD), int(Outcome.DEFAULT)]),
                    d.learn_seq.is_(None),
                )
                .order_by(d.rewarded_at, d.event_id, d.slot)
                .limit(limit)
            ).all()
            if not rows:
                return 0
            self._assign(c, [(r.event_id, r.slot) for r in rows])
        return len(rows)

    def _assign(self, c: Connection, keys: Sequence[tuple[str, int]]) -> None:
        """Hand out the next learn positions, in order, within the caller's transaction."""
        k = t.counters.c
        c.execute((pg_insert if self._postgres else sqlite_insert)(t.counters).values(name="learn_seq", value=0).on_conflict_do_nothing())
        c.execute(update(t.counters).where(k.name == "learn_seq").values(value=k.value + len(keys)))
        first = int(c.execute(select(k.value).where(k.name == "learn_seq")).scalar_one()) - len(keys) + 1
        c.exec_driver_sql(self._set_learn_seq, [(first + i, e, s) for i, (e, s) in enumerate(keys)])

    def find_decision(self, event_id: str, slot: int = 0) -> LoggedDecision | None:
        d = t.decisions.c
        with self._connect() as c:
            row = c.execute(select(t.decisions).where(d.event_id == event_id, d.slot == slot)).first()
        return None if row is None else decision_from_row(row)

    def learn_rows(self, placement: str | Sequence[str], variant: str | None, after_seq: int, limit: int) -> list[LearnRow]:
        """Closed decisions after a learn position, in learn order, of one placement or several
        (a model group's), of one variant or all (None): the columns the learner needs, through
        the driver, JSON unparsed."""
        mark = "%s" if self._postgres else "?"
        features = "features::text" if self._postgres else "features"
        arms = "arms::text" if self._postgres else "arms"
        context = "context::text" if self._postgres else "context"
        ids = (placement,) if isinstance(placement, str) else tuple(placement)
        sql = (
            f"SELECT event_id, slot, learn_seq, {arms}, chosen, probability, reward, {features}, {context}, placement_id FROM decisions "
            f"WHERE placement_id IN ({', '.join([mark] * len(ids))}) AND learn_seq > {mark}"
        )
        params: tuple[Any, ...] = (*ids, after_seq)
        if variant is not None:
            sql += f" AND variant = {mark}"
            params += (variant,)
        sql += f" ORDER BY learn_seq LIMIT {int(limit)}"
        with self._connect() as c:
            rows = c.exec_driver_sql(sql, params).all()
        return [
            LearnRow(e, int(s), int(q), tuple((a, int(v)) for a, v in orjson.loads(arms_json)), int(ch), float(p), float(r), f, cx, pl)
            for e, s, q, arms_json, ch, p, r, f, cx, pl in rows
        ]

    # -- models ---------------------------------------------------------------------------

    def save_snapshot(self, snapshot: Snapshot) -> None:
        with self._begin() as c:
            self._put_snapshot(c, snapshot)

    @staticmethod
    def _put_snapshot(c: Connection, snapshot: Snapshot) -> None:
        s = t.snapshots.c
        row = {
            "model_key": list(snapshot.key),
            "learned": snapshot.learned,
            "learn_seq": snapshot.learn_seq,
            "model": snapshot.model,
            "created_at": time.time(),
        }
        where = (s.placement_id == snapshot.placement, s.model_name == snapshot.name)
        if c.execute(update(t.snapshots).where(*where).values(**row)).rowcount == 0:
            c.execute(insert(t.snapshots).values(placement_id=snapshot.placement, model_name=snapshot.name, **row))

    def load_snapshots(self, placement: str) -> dict[str, Snapshot]:
        with self._connect() as c:
            rows = c.execute(select(t.snapshots).where(t.snapshots.c.placement_id == placement)).all()
        return {
            r.model_name: Snapshot(
                placement, r.model_name, (r.model_key[0], bool(r.model_key[1]), int(r.model_key[2])), r.learned, r.learn_seq, bytes(r.model)
            )
            for r in rows
        }

    def close(self) -> None:
        self._drop_lock()
        self.close_held()
        self.engine.dispose()
