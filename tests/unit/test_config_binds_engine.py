"""A configuration change binds every server (issue #29, 3 and 4), on the engine's own parts:
two engines on one SQLite file are two servers, a fake clock, no polling (its intervals are
far longer than a test runs), no gRPC. tests/process/test_config_binds.py shows the same with
real processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.features import feature
from nextbest.bandit.spec import PlacementSpec
from nextbest.engine.engine import Engine
from nextbest.storage.base import Close
from tests.harness import FakeClock, engine_on, run_async

KEY = ("arm:p/paid", "total")


# Engines on this loop, no gRPC (tests/harness.py); the configuration serial is not polled either.
server = partial(engine_on, config_poll_interval=60, workers=2)
run = run_async


async def db_call(e: Engine, fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/nb.db"


def arms(price: float) -> PlacementSpec:
    return PlacementSpec.model_validate(
        {
            "id": "p",
            "learn_at": "reward",
            "arms": [{"id": "x", "features": {"price": price}}, {"id": "y", "features": {"price": 2.0}}],
        }
    )


def test_the_learner_loads_an_arm_version_it_has_not_reloaded_and_learns_its_decisions(db: str) -> None:
    """B changes arm x (version 2) and decides with it; learner A has not reloaded (it polls
    far later): it reads the stored arm versions and learns every such decision. A version the
    database does not have is skipped, counted and logged."""

    async def body() -> None:
        clock = FakeClock()
        async with server(db, clock) as a:
            await a.config.apply([arms(1.0)])
            async with server(db, clock, learner="never", config_confirm_wait=0) as b:
                await b.config.apply([arms(3.0)])
                assert ("x", 2) not in a.states["p"].arm_lines  # A has not heard of it
                for i in range(20):
                    [d] = await b.chooser.choose("p", "c1", "", [feature("", "segment", "s")])
                    assert d.arms[0] == ("x", 2)
                    await b.windows.reward(d.event_id, float(i % 2))
                await b.writer.flush()
                assert await a.learner.catch_up("p") == 20
                assert a.learner.unknown_arm_versions == 0
                assert a.states["p"].model.learned == 20
                ghost = LoggedDecision("ghost", "p", "c1", clock(), (), (("x", 99), ("y", 1)), (0.5, 0.5), 0, 0.5, 0, clock() + 600)
                await db_call(a, a.store.write, [ghost], [Close("ghost", Outcome.REWARD, 1.0, clock())])
                assert await a.learner.catch_up("p") == 1  # passed over, not learned
                assert a.learner.unknown_arm_versions == 1
                assert a.states["p"].model.learned == 20
                assert a.reading().unknown_arm_versions == 1  # the metric nextbest_unknown_arm_versions_total

    run(body)


def test_a_server_holds_its_budgets_from_the_notice_until_it_has_reloaded(db: str) -> None:
    """B leases 50 of a budget of 1000. A lowers it to 12: A's own apply gives back A's unused
    lease; from B's notice of the change B spends nothing from the budget, its reload gives its
    unused lease back, and then both spend within 12 between them."""

    def spec(total: float) -> PlacementSpec:
        arm = {"id": "paid", "cost_per_impression": 1.0, "budget": {"total": total}}
        return PlacementSpec.model_validate({"id": "p", "learn_at": "reward", "arms": [arm]})

    async def served(e: Engine, n: int) -> int:
        out = 0
        for _ in range(n):
            [d] = await e.chooser.choose("p", "", "", [])
            out += d.arm_id == "paid"
        await e.writer.flush()
        return out

    async def account(e: Engine) -> tuple[float, float]:
        [row] = await db_call(e, e.store.load_accounts, [KEY])
        return row.leased, row.spent

    async def body() -> None:
        clock = FakeClock()
        async with server(db, clock, config_confirm_wait=0) as a:
            await a.config.apply([spec(1000.0)])
            # B's own poll of the configuration serial (every 0.2 s on SQLite) would reload it
            # whenever the machine is slow enough: this test drives B (check_config) itself.
            async with server(db, clock, learner="never", config_poll_interval=60) as b:
                assert await served(a, 2) == 2 and await served(b, 3) == 3
                assert await account(a) == (100.0, 5.0)  # a lease of 50 each
                await a.config.apply([spec(12.0)])
                assert await account(a) == (52.0, 5.0)  # A gave back its 48
                assert await served(b, 5) == 5  # B has not heard yet: its lease, its old limit
                b.replication._heard(await db_call(b, b.store.config_serial))  # the notification
                assert await served(b, 3) == 0  # held until reloaded
                assert b.budgets.ledger.accounts[KEY].held
                assert await b.replication.check_config()
                assert await account(b) == (10.0, 10.0)  # B gave back its 40 unused
                assert await served(b, 5) + await served(a, 5) == 2  # 10 spent, 12 allowed
                assert await account(a) == (12.0, 12.0)

    run(body)


def test_a_stalled_server_spends_no_budget_until_it_has_looked_at_the_configuration(db: str) -> None:
    """A process whose loop did not run for over the stall bound (SIGSTOP) may have missed a
    change: its next Choose spends nothing from a budget until the serial has been looked at."""

    spec = PlacementSpec.model_validate(
        {"id": "p", "learn_at": "reward", "arms": [{"id": "paid", "cost_per_impression": 1.0, "budget": {"total": 100}}]}
    )

    async def paid(e: Engine) -> bool:
        [d] = await e.chooser.choose("p", "", "", [])
        return d.arm_id == "paid"

    async def body() -> None:
        clock = FakeClock()
        async with server(db, clock) as a:
            await a.config.apply([spec])
            assert await paid(a)
            assert a.budgets.stale_after is not None
            a.budgets.looked_at -= a.budgets.stale_after + 1  # as if stopped that long
            assert not await paid(a)
            assert a.budgets.holding
            await a.replication.check_config()  # what the wake it asked for does
            assert await paid(a)

    run(body)
