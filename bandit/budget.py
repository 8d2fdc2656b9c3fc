"""Budgets: a ledger that never lets spend exceed a limit, and a pacing price per budget.

Semantics (also in docs/configuration.md):
- Each budget has accounts: ``total`` (lifetime) and, with ``daily``, one per UTC day.
- Choose reserves, on every account of the arm's budgets, the impression cost (spent at once)
  plus the arm's full ``cost_per_reward`` (held until the reward window closes). A positive
  reward spends the held amount; a non-positive or default reward releases it. Reserving the
  worst case is what makes the guarantee hard: spend can never exceed a limit.
- An arm is ineligible when any of its accounts cannot cover that reservation.
- A process spends only budget it has leased from the store (an atomic increment that never
  passes the limit), so several processes or replicas can share one budget. A crash loses the
  unused part of a lease (under-spend, never over-spend); a graceful stop returns it.
- A lease is taken against the limit stored in the database (written by every configuration
  change), not this process's copy of it, and each process gives back only what it leased. A
  process that learns of a configuration change holds its accounts (``Account.held``: nothing
  is spent from them) until it has reloaded the configuration; a lowered limit then makes it
  give its unused lease back (nextbest.engine.budgets).
- A pacer prices the spend of every server sharing the budget (``Account.used_by_all``: the
  database's figures, re-read every replica poll, plus this process's spend since), so that
  N servers keep to one even schedule instead of each spending as if alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from nextbest.bandit.spec import BudgetSpec

DAY = 86400.0


def arm_key(placement: str, arm: str) -> str:
    """The account key of an arm's own budget."""
    return f"arm:{placement}/{arm}"


def campaign_key(campaign: str) -> str:
    """The account key of a campaign's budget."""
    return f"campaign:{campaign}"


def limit_of(spec: BudgetSpec, period: str) -> float | None:
    """The limit of one account of a budget: ``total``, or ``daily`` for a day's account."""
    return spec.total if period == "total" else spec.daily


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def _day_start(t: float) -> float:
    return math.floor(t / DAY) * DAY


@dataclass(slots=True)
class Pacer:
    """A Lagrangian price on spend: rises while spending runs ahead of an even schedule over
    the account's period, falls back to zero when behind (a PI controller on the spend error).

    The price is in reward units per budget unit, scaled by the running value-per-cost of
    the decisions it prices, so one set of gains works whatever the units of reward and cost.
    """

    start: float
    end: float
    kp: float = 30.0
    ki: float = 60.0
    integral: float = 0.0
    scale: float = 0.0  # running mean of value per budget unit of the priced decisions
    price: float = 0.0
    _last: float | None = None

    def observe_value(self, value_per_cost: float) -> None:
        if math.isfinite(value_per_cost) and value_per_cost > 0:
            self.scale = value_per_cost if self.scale == 0 else 0.99 * self.scale + 0.01 * value_per_cost

    def update(self, now: float, used: float, limit: float) -> float:
        span = self.end - self.start
        elapsed = min(max(now - self.start, 0.0), span)
        error = used / limit - elapsed / span
        if self._last is not None:
            dt = max(0.0, min(now, self.end) - self._last) / span
            self.integral = max(0.0, self.integral + self.ki * error * dt)
        self._last = min(now, self.end)
        self.price = max(0.0, self.kp * error + self.integral) * self.scale
        return self.price


@dataclass(slots=True)
class Account:
    """One budget in one period, as this process sees it."""

    key: str  # "arm:<placement>/<arm>" or "campaign:<id>"
    period: str  # "total" or a UTC day "YYYY-MM-DD"
    limit: float
    start: float | None
    end: float | None
    available: float = 0.0  # leased to this process and free
    reserved: float = 0.0  # held for reward costs of this process's open decisions (and restored ones)
    spent: float = 0.0  # spent by this process (and, restored at start, by all before it)
    pacer: Pacer | None = None
    # What every server sharing the budget had spent and reserved at the last read of the
    # database (None: never read, e.g. a server alone on its database), and this process's own
    # ``used`` just before that read, so that its spend since is added without counting twice.
    shared: tuple[float, float] | None = None
    used_at_share: float = 0.0
    # A configuration change is known to be stored but not yet loaded: nothing is spent from
    # this account (its limit may have been lowered) until the reload clears this.
    held: bool = False

    @property
    def used(self) -> float:
        """Spent and reserved by this process: what its leases must cover (the hard limit)."""
        return self.spent + self.reserved

    @property
    def used_by_all(self) -> float:
        """Spent and reserved by every server: the last shared read plus this process's use
        since, never below its own figure. Pacing and the reported remainder follow this, so
        N servers pace a budget like one."""
        if self.shared is None:
            return self.used
        return max(self.used, self.shared[0] + self.shared[1] + self.used - self.used_at_share)

    def share(self, spent: float, reserved: float, used_before_read: float) -> None:
        """Take the database's figures for every server, read after ``used_before_read``.

        Approximate by this process's own spend in flight: what it flushed between that figure
        and the read counts twice, what was still queued at the read not at all, each a flush
        interval's worth at most, until the next read; the hard limit never depends on it."""
        self.shared = (spent, reserved)
        self.used_at_share = used_before_read

    @property
    def remaining(self) -> float:
        return max(0.0, self.limit - self.used_by_all)

    def active(self, now: float) -> bool:
        return (self.start is None or now >= self.start) and (self.end is None or now < self.end)

    def projected_exhaustion(self, now: float) -> float | None:
        """When the limit will be reached at the average spend rate so far (None: not spending,
        or not before the account's period ends)."""
        begin = self.start
        used = self.used_by_all
        if begin is None or now <= begin or used <= 0:
            return None
        rate = used / (now - begin)
        at = now + self.remaining / rate
        return None if self.end is not None and at >= self.end else at


@dataclass
class Ledger:
    """The accounts of every budget, with reservations against leased amounts."""

    accounts: dict[tuple[str, str], Account] = field(default_factory=dict)

    def accounts_for(self, key: str, spec: BudgetSpec, now: float, created: float | None = None) -> list[Account]:
        """The accounts a spend under this budget touches now (created on first use)."""
        start = spec.start.timestamp() if spec.start else None
        end = spec.end.timestamp() if spec.end else None
        out = []
        if spec.total is not None:
            acc = self._account(key, "total", spec.total, start if start is not None else created, end)
            if acc.pacer is None and end is not None and acc.start is not None:
                acc.pacer = Pacer(acc.start, end)
            out.append(acc)
        if spec.daily is not None:
            d0 = _day_start(now)
            lo = d0 if start is None else max(d0, start)
            hi = d0 + DAY if end is None else min(d0 + DAY, end)
            acc = self._account(key, day_of(now), spec.daily, lo, hi)
            if acc.pacer is None and hi > lo:
                acc.pacer = Pacer(d0, d0 + DAY)
            out.append(acc)
        return out

    def _account(self, key: str, period: str, limit: float, start: float | None, end: float | None) -> Account:
        acc = self.accounts.get((key, period))
        if acc is None:
            acc = self.accounts[(key, period)] = Account(key, period, limit, start, end)
        else:
            acc.limit, acc.end = limit, end  # a changed budget applies from now on
            if start is not None:
                acc.start = start
        return acc

    @staticmethod
    def can_reserve(accounts: Iterable[Account], amount: float, now: float) -> str:
        """Why the accounts cannot take ``amount`` now ("" if they can)."""
        for a in accounts:
            if not a.active(now):
                return f"budget {a.key} is outside its dates"
            if a.held:
                return f"budget {a.key} ({a.period}) awaits a configuration reload"
            if a.used + amount > a.limit + 1e-9:
                return f"budget {a.key} ({a.period}) exhausted: {a.remaining:g} left, {amount:g} needed"
            if a.available + 1e-12 < amount:
                return f"budget {a.key} ({a.period}) needs a lease"
        return ""

    @staticmethod
    def reserve(accounts: Iterable[Account], impression_cost: float, reward_cost: float) -> None:
        for a in accounts:
            a.available -= impression_cost + reward_cost
            a.spent += impression_cost
            a.reserved += reward_cost

    @staticmethod
    def unreserve(accounts: Iterable[Account], impression_cost: float, reward_cost: float) -> None:
        """Undo a ``reserve`` whose decision was not logged (its event id was refused)."""
        for a in accounts:
            a.available += impression_cost + reward_cost
            a.spent -= impression_cost
            a.reserved = max(0.0, a.reserved - reward_cost)

    @staticmethod
    def settle(accounts: Iterable[Account], reward_cost: float, incurred: bool) -> None:
        """Close a reservation: spend it (a positive reward) or give it back."""
        for a in accounts:
            a.reserved = max(0.0, a.reserved - reward_cost)
            if incurred:
                a.spent += reward_cost
            else:
                a.available += reward_cost

    @staticmethod
    def price(accounts: Iterable[Account], now: float) -> float:
        """The summed pacing price of the accounts (0 for unpaced ones)."""
        total = 0.0
        for a in accounts:
            if a.pacer is not None:
                total += a.pacer.update(now, a.used_by_all, a.limit)
        return total
