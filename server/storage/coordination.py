"""The SQL store's coordination between servers: the budget leases, the one learner, and what
replicas poll (configuration and model versions, windows a stopped server left open), and the
configuration serial every server confirms (with a PostgreSQL notification when it changes)."""

from __future__ import annotations

import fcntl
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import orjson
from sqlalchemy import delete, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from nextbest.bandit.budget import arm_key, campaign_key
from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.spec import BudgetSpec, CampaignSpec
from nextbest.storage import tables as t
from nextbest.storage.base import AccountRow, LeaseGrant, PlacementRecord
from nextbest.storage.sqlcore import SqlBase, decision_from_row

log = logging.getLogger(__name__)

# "next": the first key of the one learner's two-key advisory lock; the second is the schema's
# hash, so that deployments on two schemas of one database (or tests beside a benchmark) each
# have their learner: an advisory lock is database-wide.
_LEARNER_LOCK = 0x6E657874
_CONFIG_CHANNEL = "nextbest_config"  # NOTIFY channel; the payload is "<schema> <serial>"
_CONFIG_COUNTER = "config"  # counters row: the configuration serial
_EPS = 1e-9
_LIMIT_LOCK_WAIT = 5.0  # seconds a configuration change waits for a budget account's row lock


class Coordination(SqlBase):
    """Budget leases and the learner lock; polled versions; which server holds which window."""

    _seen = 0  # the configuration serial this server has confirmed

    # -- servers and the windows they hold ------------------------------------------------

    def register_server(self, server_id: str, now: float) -> None:
        """Sign this server in: its decisions are written as held by it from now on."""
        with self._begin() as c:
            c.execute(t.servers.insert().values(id=server_id, heartbeat=now, config_seen=self._seen))
        self.owner = server_id

    def heartbeat(self, now: float) -> bool:
        """This server's sign of life; True when it had to sign in again: another server took it
        for stopped, took its windows over and gave back its unused leases (forget them)."""
        s = t.servers.c
        with self._begin() as c:
            if c.execute(update(t.servers).where(s.id == self.owner).values(heartbeat=now)).rowcount == 0:
                c.execute(t.servers.insert().values(id=self.owner, heartbeat=now, config_seen=self._seen))
                return True
        return False

    def server_alive(self, server_id: str, since: float) -> bool:
        """Whether that server has beaten at or after ``since`` (and not signed off)."""
        s = t.servers.c
        with self._connect() as c:
            beat = c.execute(select(s.heartbeat).where(s.id == server_id)).scalar()
        return beat is not None and float(beat) >= since

    def unregister_server(self) -> None:
        """Sign off (a clean stop): this server counts as stopped at once, so that the next
        server to poll takes over its open windows without waiting for its silence."""
        with self._begin() as c:
            c.execute(update(t.servers).where(t.servers.c.id == self.owner).values(heartbeat=0.0))

    def adopt_open(self, live_since: float | None, unowned: bool = False) -> list[LoggedDecision]:
        """Take over the open windows of the servers silent since ``live_since`` (signed off,
        or killed), and forget those servers; None: of every other server and of none, for a
        server starting on a database no other server writes. ``unowned``: also the windows
        no server holds (written before owners were recorded). Windows of live servers stay
        theirs. Returns every open window this server holds when it took any (the caller keeps
        those it does not hold in memory yet), else none: a poll that finds no stopped server
        costs one small read. Where two servers race for a stopped one's windows, the
        conditional UPDATE gives each window to one of them."""
        d, s = t.decisions.c, t.servers.c
        with self._begin() as c:
            owners: list[str | None]
            if live_since is None:
                stopped: list[str] = []
                elsewhere = or_(d.owner.is_(None), d.owner != self.owner)
                owners = list(c.execute(select(d.owner).distinct().where(d.outcome == int(Outcome.OPEN), elsewhere)).scalars())
            else:
                stopped = list(c.execute(select(s.id).where(s.heartbeat < live_since, s.id != self.owner)).scalars())
                if not stopped and not unowned:
                    return []
                owners = [*stopped, None] if unowned else list(stopped)
            # Window by window from each former holder, so that the part of its lease each open
            # window holds (its reward cost, and its impression cost until activated) moves with
            # it: this server settles the window, so this server gives that part back.
            taken = 0
            moved: dict[tuple[str, str, str | None], float] = {}
            for o in owners:
                held_by = d.owner.is_(None) if o is None else d.owner == o
                rows = c.execute(
                    update(t.decisions)
                    .where(d.outcome == int(Outcome.OPEN), held_by)
                    .values(owner=self.owner)
                    .returning(d.budgets, d.reward_cost, d.cost, d.activated)
                ).all()
                taken += len(rows)
                for r in rows:
                    held = float(r.reward_cost or 0.0) + (0.0 if r.activated else float(r.cost or 0.0))
                    for k, per in _budget_keys(r.budgets):
                        if held > 0:
                            moved[(k, per, o)] = moved.get((k, per, o), 0.0) + held
            self._move_leases(c, moved)
            # Their unused leases come back (a server killed with -9 never gave them back);
            # alone on the database (live_since None) every other server's do.
            self._reclaim_leases(c, stopped if live_since is not None else None)
            if stopped:
                c.execute(delete(t.servers).where(s.id.in_(stopped)))
            if not taken:
                return []
            rows = c.execute(select(t.decisions).where(d.outcome == int(Outcome.OPEN), d.owner == self.owner)).all()
        return [decision_from_row(r) for r in rows]

    def _move_leases(self, c: Any, moved: dict[tuple[str, str, str | None], float]) -> None:
        """Move lease from former window holders to this server (none from a window no server
        held: its lease predates per-server leases), with the use the windows hold."""
        lc = t.budget_leases.c
        for (key, period, former), amount in moved.items():
            if former is not None:
                row = c.execute(select(lc.leased, lc.used).where(lc.key == key, lc.period == period, lc.server_id == former)).first()
                if row is not None:
                    c.execute(
                        update(t.budget_leases)
                        .where(lc.key == key, lc.period == period, lc.server_id == former)
                        .values(leased=max(0.0, float(row.leased) - amount), used=max(0.0, float(row.used) - amount))
                    )
            self._add_lease(c, key, period, amount, used=amount)

    def _reclaim_leases(self, c: Any, servers: Sequence[str] | None) -> None:
        """Give back the unused leases (leased - used) of servers that stopped (None: of every
        server but this one), within the caller's transaction; their rows keep what they used."""
        lc, a = t.budget_leases.c, t.budget_accounts.c
        whose = lc.server_id != self._me() if servers is None else lc.server_id.in_(list(servers))
        if servers is not None and not servers:
            return
        for key, period, server_id, leased, used in c.execute(
            select(lc.key, lc.period, lc.server_id, lc.leased, lc.used).where(whose, lc.leased > lc.used + _EPS)
        ).all():
            give = float(leased) - float(used)
            c.execute(update(t.budget_leases).where(lc.key == key, lc.period == period, lc.server_id == server_id).values(leased=used))
            c.execute(update(t.budget_accounts).where(a.key == key, a.period == period).values(leased=a.leased - give))

    def _me(self) -> str:
        return self.owner or ""

    def _add_lease(self, c: Any, key: str, period: str, amount: float, used: float = 0.0) -> None:
        lc = t.budget_leases.c
        ins = (pg_insert if self._postgres else sqlite_insert)(t.budget_leases).values(
            key=key, period=period, server_id=self._me(), leased=amount, used=used
        )
        c.execute(
            ins.on_conflict_do_update(
                index_elements=["key", "period", "server_id"], set_={"leased": lc.leased + amount, "used": lc.used + used}
            )
        )

    def lease(self, key: str, period: str, limit: float, amount: float) -> float:
        """Grant up to ``amount`` more of a budget, never past its stored limit; the grant."""
        return self.take_lease(key, period, limit, amount).granted

    def take_lease(self, key: str, period: str, limit: float, amount: float) -> LeaseGrant:
        """Grant up to ``amount`` more of a budget to this server, never past the limit stored
        for the account (``limit``, the caller's, only where none is stored); returns the grant
        and the limit it was checked against.

        The conditional UPDATE checks the limit on the account's own row, where a configuration
        change writes it: on PostgreSQL a concurrent change and lease are serialized by the row
        lock (the UPDATE re-checks its condition on the row as committed), on SQLite by the
        database lock, so no lease passes a limit lowered before it commits."""
        a, lim = t.budget_accounts.c, t.budget_limits.c
        kind = "total" if period == "total" else "daily"
        stored_cap = select(lim.cap).where(lim.key == key, lim.kind == kind).scalar_subquery()
        with self._begin() as c:
            c.execute(
                (pg_insert if self._postgres else sqlite_insert)(t.budget_accounts)
                .values(key=key, period=period, leased=0.0, spent=0.0, reserved=0.0, cap=stored_cap)
                .on_conflict_do_nothing()
            )
            cap = limit
            for _ in range(8):
                row = c.execute(select(a.leased, a.cap).where(a.key == key, a.period == period)).one()
                leased, cap = float(row.leased), (float(row.cap) if row.cap is not None else limit)
                grant = min(amount, cap - leased)
                if grant <= 1e-12:
                    return LeaseGrant(0.0, cap)
                res = c.execute(
                    update(t.budget_accounts)
                    .where(a.key == key, a.period == period, a.leased + grant <= func.coalesce(a.cap, limit) + _EPS)
                    .values(leased=a.leased + grant)
                )
                if res.rowcount == 1:
                    self._add_lease(c, key, period, grant)
                    return LeaseGrant(grant, cap)
        return LeaseGrant(0.0, cap)

    def release(self, key: str, period: str, amount: float) -> float:
        """Give back up to ``amount`` of this server's own lease; returns what was given back."""
        a, lc = t.budget_accounts.c, t.budget_leases.c
        mine = (lc.key == key, lc.period == period, lc.server_id == self._me())
        with self._begin() as c:
            for _ in range(8):
                have = c.execute(select(lc.leased).where(*mine)).scalar()
                give = min(amount, float(have or 0.0))
                if give <= 1e-12:
                    return 0.0
                if c.execute(update(t.budget_leases).where(*mine, lc.leased >= give - _EPS).values(leased=lc.leased - give)).rowcount:
                    c.execute(update(t.budget_accounts).where(a.key == key, a.period == period).values(leased=a.leased - give))
                    return give
        return 0.0

    def server_leases(self) -> list[AccountRow]:
        """This server's own leases (``leased`` only) per account."""
        lc = t.budget_leases.c
        with self._connect() as c:
            rows = c.execute(select(lc.key, lc.period, lc.leased).where(lc.server_id == self._me())).all()
        return [AccountRow(r.key, r.period, float(r.leased), 0.0, 0.0) for r in rows]

    # -- the configuration serial ----------------------------------------------------------

    def config_changed(self, c: Any, records: Sequence[PlacementRecord], campaigns: Sequence[CampaignSpec]) -> int:
        """Within the transaction that stores a configuration: store the limits of its budgets
        (on the accounts too), advance the configuration serial and, on PostgreSQL, notify the
        listening servers at commit. Returns the new serial."""
        budgets: dict[str, BudgetSpec] = {}
        for rec in records:
            for arm in rec.spec.arms:
                if arm.budget is not None:
                    budgets[arm_key(rec.spec.id, arm.id)] = arm.budget
        for camp in campaigns:
            budgets[campaign_key(camp.id)] = camp.budget
        if self._postgres and budgets:
            # A server stopped in the middle of a write holds its accounts' rows: wait a bounded
            # time for them, then fail the whole change (Unavailable) rather than hang past the
            # caller's deadline and commit after it gave up.
            c.execute(text(f"SET LOCAL lock_timeout = '{int(_LIMIT_LOCK_WAIT * 1000)}ms'"))
        self._write_limits(c, budgets.items())
        cn = t.counters.c
        ins = (pg_insert if self._postgres else sqlite_insert)(t.counters).values(name=_CONFIG_COUNTER, value=1)
        c.execute(ins.on_conflict_do_update(index_elements=["name"], set_={"value": cn.value + 1}))
        serial = int(c.execute(select(cn.value).where(cn.name == _CONFIG_COUNTER)).scalar_one())
        if self._postgres:
            c.execute(text("SELECT pg_notify(:ch, current_schema() || ' ' || :serial)"), {"ch": _CONFIG_CHANNEL, "serial": str(serial)})
        return serial

    def _write_limits(self, c: Any, budgets: Iterable[tuple[str, BudgetSpec]]) -> None:
        a = t.budget_accounts.c
        for key, spec in budgets:
            for kind, cap in (("total", spec.total), ("daily", spec.daily)):
                ins = (pg_insert if self._postgres else sqlite_insert)(t.budget_limits).values(key=key, kind=kind, cap=cap)
                c.execute(ins.on_conflict_do_update(index_elements=["key", "kind"], set_={"cap": cap}))
                period = a.period == "total" if kind == "total" else a.period != "total"
                c.execute(update(t.budget_accounts).where(a.key == key, period).values(cap=cap))

    def config_serial(self) -> int:
        """The serial of the configuration stored last (0 before any)."""
        cn = t.counters.c
        with self._connect() as c:
            value = c.execute(select(cn.value).where(cn.name == _CONFIG_COUNTER)).scalar()
        return int(value or 0)

    def confirm_config(self, serial: int) -> None:
        """Record that this server has loaded the configuration up to ``serial``."""
        s = t.servers.c
        self._seen = max(self._seen, serial)
        if self.owner is None:
            return
        with self._begin() as c:
            c.execute(update(t.servers).where(s.id == self.owner, s.config_seen < serial).values(config_seen=serial))

    def unconfirmed_servers(self, serial: int, live_since: float) -> list[str]:
        """The other servers alive since ``live_since`` that have not confirmed ``serial``."""
        s = t.servers.c
        with self._connect() as c:
            rows = c.execute(select(s.id).where(s.heartbeat >= live_since, s.config_seen < serial, s.id != self._me()).order_by(s.id)).all()
        return [r.id for r in rows]

    def listen_config(self, on_change: Callable[[int], None]) -> Callable[[], None] | None:
        """PostgreSQL: call ``on_change(serial)`` from a thread of its own whenever a server of
        this schema stores a configuration; returns how to stop listening. None elsewhere."""
        if not self._postgres:
            return None
        stop = threading.Event()
        thread = threading.Thread(target=self._listen, args=(on_change, stop), name="nextbest-config-listen", daemon=True)
        thread.start()

        def stop_listening() -> None:
            stop.set()
            thread.join(5)

        return stop_listening

    def _listen(self, on_change: Callable[[int], None], stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with self.engine.connect() as sa_conn:
                    schema = str(sa_conn.execute(text("SELECT current_schema()")).scalar())
                    sa_conn.commit()
                    raw: Any = sa_conn.connection.dbapi_connection
                    raw.autocommit = True
                    raw.execute(f"LISTEN {_CONFIG_CHANNEL}")
                    while not stop.is_set():
                        for n in raw.notifies(timeout=0.25):
                            where, _, serial = n.payload.partition(" ")
                            if where == schema and serial.isdigit():
                                on_change(int(serial))
                    raw.execute(f"UNLISTEN {_CONFIG_CHANNEL}")
                    raw.autocommit = False
            except Exception as e:  # the database away: polling still finds the change
                log.warning("listening for configuration changes failed, retrying: %s", e)
                stop.wait(1.0)

    def load_accounts(self, keys: Collection[tuple[str, str]] | None = None) -> list[AccountRow]:
        a = t.budget_accounts.c
        query = select(t.budget_accounts)
        if keys is not None:
            if not keys:
                return []
            # Key and period separately: a row-value IN is not portable; the few extra rows
            # (another period of a wanted key) are dropped below.
            query = query.where(a.key.in_({k for k, _ in keys}), a.period.in_({p for _, p in keys}))
        with self._connect() as c:
            rows = c.execute(query).all()
        wanted = None if keys is None else set(keys)
        return [AccountRow(r.key, r.period, r.leased, r.spent, r.reserved) for r in rows if wanted is None or (r.key, r.period) in wanted]

    def config_version(self) -> tuple[float, int, float, int]:
        """Changes whenever any server applies a configuration: replicas poll it."""
        p, cm = t.placements.c, t.campaigns.c
        with self._connect() as c:
            a = c.execute(select(func.coalesce(func.max(p.updated_at), 0.0), func.count())).one()
            b = c.execute(select(func.coalesce(func.max(cm.updated_at), 0.0), func.count())).one()
        return (float(a[0]), int(a[1]), float(b[0]), int(b[1]))

    def snapshot_versions(self, placement: str) -> dict[str, tuple[int, int]]:
        """(learned, learn_seq) of each saved model of a placement, without the model bytes."""
        s = t.snapshots.c
        with self._connect() as c:
            rows = c.execute(select(s.model_name, s.learned, s.learn_seq).where(s.placement_id == placement)).all()
        return {r.model_name: (int(r.learned), int(r.learn_seq)) for r in rows}

    def expired_open(self, cutoff: float, limit: int) -> list[LoggedDecision]:
        """Open decisions whose window ended before ``cutoff``: a server that stopped left them."""
        d = t.decisions.c
        with self._connect() as c:
            rows = c.execute(select(t.decisions).where(d.outcome == int(Outcome.OPEN), d.deadline < cutoff).limit(limit)).all()
        return [decision_from_row(r) for r in rows]

    # -- one learner at a time ------------------------------------------------------------

    def try_learner_lock(self) -> bool:
        """Become the one learner: a PostgreSQL advisory lock held by a dedicated session, or
        an exclusive lock on a file beside a SQLite database. Both end with the process."""
        if self._lock is not None:
            return True
        if self._postgres:
            conn = self.engine.connect()
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k, hashtext(current_schema()))"), {"k": _LEARNER_LOCK}).scalar())
            if got:
                self._lock = conn
            else:
                conn.close()
            return got
        path = (self.engine.url.database or "nextbest") + ".learner.lock"
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._lock = f
        return True

    def holds_learner_lock(self) -> bool:
        """Whether the lock is still ours (a PostgreSQL session can be cut under us)."""
        if self._lock is None:
            return False
        if not self._postgres:
            return True
        try:
            ok = self._lock.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = :k AND objsubid = 2 "
                    "AND objid = (hashtext(current_schema())::bigint & 4294967295)::oid AND pid = pg_backend_pid()"
                ),
                {"k": _LEARNER_LOCK},
            ).scalar()
            return bool(ok)
        except SQLAlchemyError:
            self._drop_lock()
            return False

    def _drop_lock(self) -> None:
        lock, self._lock = self._lock, None
        try:
            if lock is not None:
                lock.close()
        except Exception:
            pass


def _budget_keys(raw: Any) -> list[tuple[str, str]]:
    """A decision's budget accounts as stored ([[key, period], ...], maybe JSON text)."""
    if isinstance(raw, str | bytes):
        raw = orjson.loads(raw)
    return [(str(k), str(p)) for k, p in raw or ()]
