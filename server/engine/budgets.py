"""The server side of budgets: accounts per arm and campaign, leases from the store, and the
restore of spend after a restart. The arithmetic lives in nextbest.bandit.budget.

A configuration change binds at once: leases are checked against the limit stored in the
database (which every ApplyConfig writes), a server that hears of a change holds its accounts
(spends nothing from them) until it has reloaded, and a lowered limit makes it give its unused
lease back (``rebind``); a lease that finds a lower stored limit than this server's copy holds
the account the same way. Each server gives back only its own leases."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from nextbest.bandit.budget import Account, Ledger, arm_key, campaign_key, limit_of
from nextbest.bandit.decider import Candidate
from nextbest.bandit.spec import ArmSpec, BudgetSpec, CampaignSpec, PlacementSpec
from nextbest.storage.base import AccountRow, Store

log = logging.getLogger(__name__)

__all__ = ["BudgetKeeper", "arm_key", "campaign_key", "budget_specs"]


def budget_specs(placements: Iterable[PlacementSpec], campaigns: Iterable[CampaignSpec]) -> dict[str, BudgetSpec]:
    """Every budget of a configuration by account key."""
    out = {arm_key(p.id, a.id): a.budget for p in placements for a in p.arms if a.budget is not None}
    out.update({campaign_key(c.id): c.budget for c in campaigns})
    return out


class BudgetKeeper:
    """Owns the ledger on the event loop; leases come from the store in a worker thread."""

    def __init__(self, store: Store, executor: ThreadPoolExecutor, lease_fraction: float, reader: ThreadPoolExecutor | None = None) -> None:
        self._store = store
        self._executor = executor
        self._reader = reader or executor
        self._lease_fraction = lease_fraction
        self.ledger = Ledger()
        self.campaigns: dict[str, CampaignSpec] = {}
        self._stored: dict[tuple[str, str], AccountRow] = {}
        self._leasing: dict[tuple[str, str], asyncio.Future[None]] = {}
        # Lease freed (a window closed without a reward) on accounts this process has not used
        # since it started: a window of a server that stopped, taken over. Added to the
        # account's available when it is first used, else given back at stop.
        self._freed: dict[tuple[str, str], float] = {}
        self.holding = False  # a configuration change is stored and not yet loaded: spend nothing
        self.on_stale: Callable[[], None] | None = None  # asks for a configuration reload
        # When replication last marked this process alive (monotonic), and how long without a
        # mark means it was stalled (SIGSTOP, a blocked loop) and may have missed a configuration
        # change: then nothing is spent until it has looked (None: not watched, alone).
        self.looked_at = time.monotonic()
        self.stale_after: float | None = None

    def restore(self, rows: Iterable[AccountRow], campaigns: Iterable[CampaignSpec]) -> None:
        """Spend and reservations as stored; this process holds no lease yet."""
        self._stored = {(r.key, r.period): r for r in rows}
        self.campaigns = {c.id: c for c in campaigns}

    def accounts(self, placement: str, arm: ArmSpec, now: float) -> list[Account]:
        """Every account a choice of this arm spends from, now."""
        if self.stale_after is not None and time.monotonic() - self.looked_at > self.stale_after:
            self.accounts_check()
        out: list[Account] = []
        if arm.budget is not None:
            out += self._with_stored(self.ledger.accounts_for(arm_key(placement, arm.id), arm.budget, now))
        if arm.campaign is not None and (camp := self.campaigns.get(arm.campaign)) is not None:
            out += self._with_stored(self.ledger.accounts_for(campaign_key(camp.id), camp.budget, now))
        return out

    def accounts_check(self) -> None:
        """This process was stalled past ``stale_after``: hold every budget (once) and ask for the
        configuration to be looked at, which releases them."""
        if self.holding:
            return
        log.warning("this process was stalled over %.1fs: budgets held until the configuration is looked at", self.stale_after or 0.0)
        self.hold()
        self.looked_at = time.monotonic()  # held now; the reload releases them
        if self.on_stale is not None:
            self.on_stale()

    def _with_stored(self, accounts: list[Account]) -> list[Account]:
        for a in accounts:
            row = self._stored.pop((a.key, a.period), None)
            if row is not None:  # first use since start: take over what the store knows
                a.spent, a.reserved = row.spent, row.reserved
            freed = self._freed.pop((a.key, a.period), 0.0)
            if freed:
                a.available += freed
            if self.holding:
                a.held = True
        return accounts

    def forfeit(self) -> None:
        """Another server took this one for stopped (it was stalled past ``live_for``): it took
        its windows and gave back its unused leases. Forget them: nothing is spent from them."""
        for a in self.ledger.accounts.values():
            if a.available > 1e-12:
                log.warning("budget %s (%s): %.4g of lease given back by the server that took over", a.key, a.period, a.available)
            a.available = 0.0
        self._freed.clear()

    # -- configuration changes -----------------------------------------------------------------

    @property
    def stale(self) -> bool:
        """Some account is held until the configuration is reloaded."""
        return self.holding or any(a.held for a in self.ledger.accounts.values())

    def hold(self) -> None:
        """A configuration change is stored but not loaded yet: spend nothing from any account
        (a limit may have been lowered) until ``rebind`` after the reload."""
        self.holding = True
        for a in self.ledger.accounts.values():
            a.held = True

    async def rebind(self, budgets: Mapping[str, BudgetSpec]) -> None:
        """After a configuration is loaded: take its limits into every account, give back the
        unused lease of each account whose limit went down (the others' leases and this one's
        together may pass the new limit; leases are taken again against it as needed), then
        spend again."""
        lowered: list[Account] = []
        for a in self.ledger.accounts.values():
            spec = budgets.get(a.key)
            limit = limit_of(spec, a.period) if spec is not None else None
            new = limit if limit is not None else 0.0  # a budget removed: nothing more from it
            if new < a.limit - 1e-12:
                lowered.append(a)
            a.limit = new
        await self._give_back(lowered)
        self.holding = False
        for a in self.ledger.accounts.values():
            a.held = False

    async def _give_back(self, accounts: Iterable[Account]) -> None:
        loop = asyncio.get_running_loop()
        for a in accounts:
            if a.available > 1e-12:
                amount, a.available = a.available, 0.0
                try:
                    await loop.run_in_executor(self._executor, self._store.release, a.key, a.period, amount)
                except Exception as e:  # under-spend, never over-spend
                    log.warning("could not return %.4g of budget %s (%s): %s", amount, a.key, a.period, e)

    async def ensure(self, candidates: Sequence[Candidate], now: float) -> None:
        """Lease more where an account cannot cover a candidate's reservation but its limit can."""
        waits = []
        for c in candidates:
            need = c.reservation
            for a in c.accounts:
                if a.available + 1e-12 < need and a.used + need <= a.limit + 1e-9 and a.active(now) and not a.held:
                    waits.append(self._lease(a, need))
        if waits:
            # Shielded: a caller whose deadline passes must not cancel the lease itself, or the
            # store grants budget that this process never adds to its accounts (lost until restart).
            await asyncio.shield(asyncio.gather(*waits))

    def _lease(self, a: Account, need: float) -> asyncio.Future[None]:
        key = (a.key, a.period)
        fut = self._leasing.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._do_lease(a, need))
            self._leasing[key] = fut
            fut.add_done_callback(lambda _: self._leasing.pop(key, None))
        return fut

    async def _do_lease(self, a: Account, need: float) -> None:
        amount = max(need - a.available, self._lease_fraction * a.limit)
        loop = asyncio.get_running_loop()
        got = await loop.run_in_executor(self._executor, self._store.take_lease, a.key, a.period, a.limit, amount)
        a.available += got.granted
        if got.limit < a.limit - 1e-9:  # another server lowered it and this one has not loaded that yet
            log.info("budget %s (%s) is %g in the database, %g here: held until reloaded", a.key, a.period, got.limit, a.limit)
            a.held = True
            if self.on_stale is not None:
                self.on_stale()

    async def share(self, now: float, keys: Collection[tuple[str, str]] | None = None) -> dict[tuple[str, str], AccountRow]:
        """Read every server's spend of this process's current accounts (or of ``keys``) from
        the store and give it to their pacers; returns the rows read.

        Called every replica poll when other servers may share the database, and by GetStats:
        one SELECT of the accounts in their period, never per Choose. The other servers' part of
        the figure is as old as the last poll and as their last flush; this process's spend
        since the read is added as it happens."""
        if keys is None:
            keys = [k for k, a in self.ledger.accounts.items() if a.end is None or now < a.end]
        if not keys:
            return {}
        before = {k: a.used for k in keys if (a := self.ledger.accounts.get(k)) is not None}
        loop = asyncio.get_running_loop()
        rows = {(r.key, r.period): r for r in await loop.run_in_executor(self._reader, self._store.load_accounts, keys)}
        for k, used in before.items():
            if (row := rows.get(k)) is not None:
                self.ledger.accounts[k].share(row.spent, row.reserved, used)
        return rows

    @staticmethod
    def reserve(accounts: Sequence[Account], impression_cost: float, reward_cost: float) -> None:
        Ledger.reserve(accounts, impression_cost, reward_cost)

    def settle(self, keys: Iterable[tuple[str, str]], reward_cost: float, incurred: bool) -> None:
        keys = list(keys)
        accounts = [self.ledger.accounts[k] for k in keys if k in self.ledger.accounts]
        Ledger.settle(accounts, reward_cost, incurred)
        for k in keys:  # accounts not used since a restart: adjust the stored figures
            if k not in self.ledger.accounts and not incurred and reward_cost > 0:
                self._freed[k] = self._freed.get(k, 0.0) + reward_cost  # this server's lease now: give it back
            row = self._stored.get(k)
            if row is not None:
                self._stored[k] = AccountRow(
                    row.key,
                    row.period,
                    row.leased,
                    row.spent + (reward_cost if incurred else 0.0),
                    max(0.0, row.reserved - reward_cost),
                )

    async def release_all(self) -> None:
        """Give unused leases back so that a graceful stop loses no budget (only this server's
        own: the store bounds each return by what this server was granted)."""
        for (key, period), amount in self._freed.items():
            acc = self.ledger.accounts.setdefault((key, period), Account(key, period, 0.0, None, None))
            acc.available += amount
        self._freed.clear()
        await self._give_back(list(self.ledger.accounts.values()))
