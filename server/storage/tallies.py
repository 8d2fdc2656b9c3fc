"""The SQL store's statistics: per-arm and per-variant tallies of the decision log."""

from __future__ import annotations

from sqlalchemy import and_, case, func, select, text

from nextbest.bandit.decision_log import Outcome
from nextbest.storage import tables as t
from nextbest.storage.base import ArmTally, IneligibleTally, VariantTally
from nextbest.storage.sqlcore import SqlBase


class StatsQueries(SqlBase):
    """Aggregates over the decision log."""

    def recent_rewards(self, placement: str, limit: int) -> list[float]:
        """The rewards of a placement's last ``limit`` learned decisions, oldest first."""
        d = t.decisions.c
        with self._connect() as c:
            rows = (
                c.execute(
                    select(d.reward)
                    .where(d.placement_id == placement, d.learn_seq.is_not(None), d.reward.is_not(None))
                    .order_by(d.learn_seq.desc())
                    .limit(limit)
                )
                .scalars()
                .all()
            )
        return [float(r) for r in reversed(rows)]

    def tally(self, placement: str) -> tuple[list[ArmTally], int, int]:
        """Per-arm counts, the number of decisions, and how many served no arm."""
        d = t.decisions.c
        incurred = case((and_(d.outcome == int(Outcome.REWARD), d.reward > 0), d.reward_cost), else_=0.0)
        with self._connect() as c:
            rows = c.execute(
                select(
                    d.arm_id,
                    d.outcome,
                    func.count(),
                    func.coalesce(func.sum(d.reward), 0.0),
                    func.coalesce(func.sum(d.cost + incurred), 0.0),
                    d.activated,
                )
                .where(d.placement_id == placement)
                .group_by(d.arm_id, d.outcome, d.activated)
            ).all()
            r = t.reward_events.c
            late = c.execute(
                select(d.arm_id, func.count())
                .select_from(t.reward_events.join(t.decisions, and_(r.event_id == d.event_id, r.slot == d.slot)))
                .where(d.placement_id == placement, r.kind == "late")
                .group_by(d.arm_id)
            ).all()
        tallies: dict[str, ArmTally] = {}
        total = no_arm = 0
        for arm_id, outcome, count, reward_sum, spend, activated in rows:
            total += count
            if arm_id is None:
                no_arm += count
                continue
            if not activated:  # deferred and not (yet) shown: no impression, no spend
                continue
            tl = tallies.setdefault(arm_id, ArmTally(arm_id))
            tl.impressions += count
            tl.spend += float(spend)
            if outcome == Outcome.REWARD:
                tl.rewards += count
                tl.reward_sum += float(reward_sum)
            elif outcome == Outcome.DEFAULT:
                tl.default_rewards += count
            elif outcome == Outcome.OPEN:
                tl.pending += count
        for arm_id, count in late:
            if arm_id is not None:
                tallies.setdefault(arm_id, ArmTally(arm_id)).late_rewards += count
        return list(tallies.values()), total, no_arm

    def tally_variants(self, placement: str) -> list[VariantTally]:
        d = t.decisions.c
        explicit = case((d.outcome == int(Outcome.REWARD), 1), else_=0)
        closed = case((d.outcome.in_([int(Outcome.REWARD), int(Outcome.DEFAULT)]), 1), else_=0)
        with self._connect() as c:
            rows = c.execute(
                select(
                    d.variant,
                    func.count(),
                    func.sum(case((and_(d.arm_id.is_not(None), d.activated.is_(True)), 1), else_=0)),
                    func.sum(explicit),
                    func.coalesce(func.sum(case((d.outcome == int(Outcome.REWARD), d.reward), else_=0.0)), 0.0),
                    func.coalesce(func.sum(case((closed == 1, d.reward), else_=0.0)), 0.0),
                    func.sum(closed),
                )
                .where(d.placement_id == placement)
                .group_by(d.variant)
                .order_by(d.variant)
            ).all()
        return [VariantTally(r[0], r[1], int(r[2] or 0), int(r[3] or 0), float(r[4]), float(r[5]), int(r[6] or 0)) for r in rows]

    def learn_backlog(self, cursors: dict[str, int]) -> tuple[int, dict[str, int]]:
        """The learn sequence's top and, per placement, windows closed but not yet learned: not
        yet in the learn sequence, or in it above the placement's most advanced model (its
        cursor). Index ranges only (ix_decisions_unclaimed, and learn_seq's unique index above
        the cursor, which is short while the learner keeps up): read at every metrics scrape."""
        d = t.decisions.c
        closed = [int(Outcome.REWARD), int(Outcome.DEFAULT)]
        out: dict[str, int] = {}
        with self._connect() as c:
            top = c.execute(select(t.counters.c.value).where(t.counters.c.name == "learn_seq")).scalar() or 0
            for pid, cursor in cursors.items():
                waiting = select(func.count()).where(d.placement_id == pid, d.outcome.in_(closed), d.learn_seq.is_(None))
                ahead = select(func.count()).where(d.learn_seq > cursor, d.placement_id == pid)
                out[pid] = int(c.execute(waiting).scalar_one()) + int(c.execute(ahead).scalar_one())
        return int(top), out

    def tally_ineligible(self, placement: str) -> list[IneligibleTally]:
        """The ``ineligible`` column ([[arm, reason], ...]) unnested by the database itself:
        json_each on SQLite, json_array_elements on PostgreSQL; one pass over the placement's
        decisions, like ``tally``."""
        if self.engine.dialect.name == "postgresql":
            sql = (
                "SELECT e->>0 AS arm, e->>1 AS reason, count(*) AS n FROM decisions, json_array_elements(decisions.ineligible) AS e"
                " WHERE decisions.placement_id = :p GROUP BY 1, 2 ORDER BY n DESC, arm, reason"
            )
        else:
            sql = (
                "SELECT json_extract(e.value, '$[0]') AS arm, json_extract(e.value, '$[1]') AS reason, count(*) AS n"
                " FROM decisions, json_each(decisions.ineligible) AS e WHERE decisions.placement_id = :p"
                " GROUP BY 1, 2 ORDER BY n DESC, arm, reason"
            )
        with self._connect() as c:
            rows = c.execute(text(sql), {"p": placement}).all()
        return [IneligibleTally(str(r.arm), str(r.reason), int(r.n)) for r in rows]
