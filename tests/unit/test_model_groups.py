"""Model groups (issue #33): placements naming one ``model_group`` learn one model, on the
engine's own parts (no gRPC; tests/service/test_model_groups_grpc.py shows the same through a
server). Each row is learned once whichever placement it is of, the model is snapshotted under
the group and resumed from there, switching is explicit and loses neither model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.features import feature, shared_line
from nextbest.bandit.spec import PlacementSpec
from nextbest.engine.engine import Engine
from tests import envs
from tests.harness import FakeClock, engine_on, run_async


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/nb.db"


def spec(pid: str, group: str | None = "telco", **kw: object) -> PlacementSpec:
    return envs.placement(pid, model_group=group, **kw)


async def serve(e: Engine, pid: str, n: int, rng: np.random.Generator, tag: str = "") -> None:
    """``n`` Chooses of random segments on ``pid``, each rewarded as envs.P says; all learned."""
    for i in range(n):
        seg = int(rng.integers(len(envs.SEGMENTS)))
        [d] = await e.chooser.choose(pid, f"c{i}", f"{pid}-{tag}{i}", [feature("customer", "segment", envs.SEGMENTS[seg])])
        await e.windows.reward(d.event_id, float(rng.random() < envs.P[seg, envs.ARMS.index(d.arm_id)]))
    await e.writer.flush()
    await e.learner.catch_up(pid)


def test_a_group_learns_one_model_from_each_placement_once(db: str) -> None:
    """Two grouped placements score with one model that learned both's rows, each once; a
    third keeps its own. A grouped decision logs the placement as a feature; the model is
    snapshotted under ``group:<name>`` and a restart resumes it there."""

    async def body() -> None:
        rng = np.random.default_rng(3)
        async with engine_on(db, FakeClock()) as e:
            await e.config.apply([spec("app"), spec("ussd"), spec("web", None)])
            shared = e.states["app"].models[""]
            assert e.states["ussd"].models[""] is shared and shared.group == "telco"
            assert e.states["web"].models[""] is not shared
            await serve(e, "app", 30, rng)
            await serve(e, "ussd", 20, rng)
            await serve(e, "web", 10, rng)
            for pid in ("app", "ussd"):
                await e.learner.catch_up(pid)  # a second pass learns nothing twice
            assert shared.model.learned == 50
            assert e.states["web"].model.learned == 10
            d = await asyncio.get_running_loop().run_in_executor(None, e.store.find_decision, "ussd-0")
            assert ("placement", "id", "ussd") in d.features
            undecided = await asyncio.get_running_loop().run_in_executor(None, e.store.find_decision, "web-0")
            assert not any(ns == "placement" for ns, _, _ in undecided.features)
        async with engine_on(db, FakeClock()) as e:  # the stop snapshotted it
            snaps = e.store.load_snapshots("group:telco")
            assert snaps[""].learned == 50 and "" not in e.store.load_snapshots("ussd")
            again = e.states["app"].models[""]
            assert again is e.states["ussd"].models[""] and again.model.learned == 50
            await serve(e, "ussd", 5, rng, "b")
            assert again.model.learned == 55
        # nextbest replay reads the group's model by its name (--policy snapshot:group:telco)
        import argparse

        from nextbest.bandit.errors import NotFound
        from nextbest.cli.replay import _policy

        policy = _policy("snapshot:group:telco", argparse.Namespace(db=db, placement="ussd"))
        assert policy.name == "snapshot:group:telco"
        with pytest.raises(NotFound):
            _policy("snapshot:group:nope", argparse.Namespace(db=db, placement="ussd"))

    run_async(body)


def test_a_group_needs_one_set_of_vw_settings(db: str) -> None:
    """Placements of one group build one model: different bits are refused naming the field,
    and nothing changes."""

    async def body() -> None:
        async with engine_on(db, FakeClock()) as e:
            await e.config.apply([spec("app")])
            with pytest.raises(InvalidInput) as err:
                await e.config.apply([spec("ussd", bits=20)])
            assert err.value.field == "placements[0].model_group"
            assert "share model group 'telco'" in str(err.value)
            assert "ussd" not in e.states
            with pytest.raises(InvalidInput):
                await e.config.apply([spec("ussd", bits=20)], dry_run=True)

    run_async(body)


def test_leaving_a_group_resumes_the_placements_own_model(db: str) -> None:
    """A placement that joins a group keeps its own model's snapshot; leaving resumes it and
    learns the placement's own rows since (the group's included); the group's model stays
    with the others."""

    async def body() -> None:
        rng = np.random.default_rng(5)
        async with engine_on(db, FakeClock()) as e:
            await e.config.apply([spec("app", None), spec("ussd")])
            await serve(e, "app", 12, rng)
            await e.learner.snapshot_all()
            await e.config.apply([spec("app")])  # joins
            group = e.states["ussd"].models[""]
            assert e.states["app"].models[""] is group
            await serve(e, "app", 7, rng, "g")
            await serve(e, "ussd", 4, rng)
            assert group.model.learned == 11
            await e.config.apply([spec("app", None)])  # leaves
            own = e.states["app"].models[""]
            assert own is not group and own.group is None
            await e.learner.catch_up("app")
            assert own.model.learned == 12 + 7  # its snapshot, then its rows since
            assert e.states["ussd"].models[""] is group and group.model.learned == 11

    run_async(body)


def test_what_one_placement_learns_serves_the_other(db: str) -> None:
    """The point of a group: trained only through the app, the USSD menu picks each segment's
    best offer. Seeded (caller-chosen event ids fix the exploration draws); 600 rounds pick
    the best arm for every segment on this environment, the bound allows one miss."""

    async def body() -> None:
        rng = np.random.default_rng(11)
        async with engine_on(db, FakeClock(), seed="groups") as e:
            await e.config.apply([spec("app"), spec("ussd")])
            await serve(e, "app", 600, rng)
            model = e.states["ussd"].models[""].model
            hits = 0
            for seg, name in enumerate(envs.SEGMENTS):
                shared = shared_line([feature("customer", "segment", name), ("placement", "id", "ussd")])
                lines = [e.states["ussd"].arm_lines[(a, 1)] for a in envs.ARMS]
                hits += int(np.argmax(model.expected_rewards(shared, lines))) == int(np.argmax(envs.P[seg]))
            assert hits >= 4, hits

    run_async(body)


def test_a_serving_replica_loads_the_groups_model_from_the_groups_snapshot(db: str) -> None:
    """Two servers on one database: the learner snapshots the group's model under the group;
    the serving replica's refresh loads it into the one model its grouped placements share,
    and leaves the placements' own snapshots (from before they joined) alone."""

    async def body() -> None:
        rng = np.random.default_rng(2)
        clock = FakeClock()
        async with engine_on(db, clock, workers=2) as a:
            await a.config.apply([spec("app", None), spec("ussd")])
            await serve(a, "app", 6, rng)
            await a.learner.snapshot_all()  # app's own model: 6, under "app"
            await a.config.apply([spec("app")])
            async with engine_on(db, clock, workers=2, learner="never") as b:
                shared = b.states["app"].models[""]
                assert b.states["ussd"].models[""] is shared and shared.model.learned == 0
                await serve(a, "app", 9, rng, "g")
                await serve(a, "ussd", 3, rng)
                await a.learner.snapshot_all()
                assert await b.replication.refresh_models() == 1
                assert b.states["app"].models[""] is b.states["ussd"].models[""] is shared
                assert shared.model.learned == 12 and shared.cursor == a.states["app"].models[""].cursor
                assert await b.replication.refresh_models() == 0  # nothing newer

    run_async(body)


def test_a_member_explores_by_its_own_decisions_not_the_groups(db: str) -> None:
    """What could make a shared model stick (issue #33, one run at 0.674 of the oracle): SquareCB's
    gamma grows with the examples learned, and a group's model counts every member's. A USSD
    menu joining an app that taught the model 400 decisions then explored as if it had seen
    them all: its own offer, never tried, got ~1 % of its visits (gamma 200) and could stay
    untried. Each member explores by its own learned decisions and rewards (restored after a
    restart from the log); the group's count is shown to be the cause by deciding with it."""
    from nextbest.bandit.decider import decide

    def arms(*ids: str, pid: str) -> PlacementSpec:
        return PlacementSpec.model_validate(
            {"id": pid, "model_group": "telco", "learn_at": "reward", "arms": [{"id": a, "features": {"kind": a}} for a in ids]}
        )

    async def body() -> None:
        async with engine_on(db, FakeClock(), seed="stuck") as e:
            await e.config.apply([arms("data", "voice", pid="app"), arms("data", "voice", "topup", pid="ussd")])
            for i in range(400):
                [d] = await e.chooser.choose("app", f"c{i}", "", [])
                await e.windows.reward(d.event_id, 1.0 if d.arm_id == "data" else 0.0)
            await e.writer.flush()
            await e.learner.catch_up("app")
            ussd = e.states["ussd"]
            assert ussd.models[""].model.learned == 400 and ussd.own_learned == 0
            [d] = await e.chooser.choose("ussd", "c0", "", [])
            assert d.explanation is not None and d.explanation.parameter == 10.0  # gamma at its own count, not 10 * sqrt(400)
            topup = [a for a, _ in d.arms].index("topup")
            assert d.pmf[topup] > 0.07, d.pmf
            as_group = decide(ussd.model, ussd.record.spec, ussd.candidates, "shared |U", lambda: 0.5)  # the group's count
            assert as_group.explanation is not None and as_group.explanation.parameter == 200.0
            assert as_group.pmf[topup] < 0.03, as_group.pmf  # the cause: hardly ever tried
            await e.windows.reward(d.event_id, 1.0)
            await e.writer.flush()
            await e.learner.catch_up("ussd")
            assert ussd.own_learned == 1
        async with engine_on(db, FakeClock(), seed="stuck") as e:  # a restart counts the same from the log
            assert e.states["ussd"].own_learned == 1 and e.states["app"].own_learned == 400

    run_async(body)
