"""What a Choose adds to its request (issue #30): the stored profile of its customer and each
arm's interaction history, as rules and the model see them and as the log keeps them. On the
engine's own parts: a fake clock, SQLite in a temporary directory, no gRPC, no sleeps."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from nextbest.bandit.contact import Impression
from nextbest.bandit.decision_log import LoggedDecision
from nextbest.bandit.features import Feature, feature, shared_line
from nextbest.bandit.history import history_features
from nextbest.bandit.spec import PlacementSpec
from nextbest.engine.engine import Engine
from nextbest.storage.base import Profile
from tests import envs
from tests.harness import FakeClock, engine_on, run_async

DAY = 86400.0
POSTPAID = {"feature": "customer.plan", "eq": "postpaid"}


def placement(pid: str = "p", **kw: Any) -> PlacementSpec:
    return envs.placement(pid, **{"learn_at": "reward", **kw})


def profile(customer: str, as_of: float, **values: float | str) -> Profile:
    return Profile(customer, tuple(feature("customer", k, v) for k, v in values.items()), as_of)


async def put(e: Engine, *profiles: Profile) -> None:
    await asyncio.get_running_loop().run_in_executor(None, e.store.put_profiles, list(profiles), e.clock())


async def logged(e: Engine, event_id: str) -> LoggedDecision:
    d = await asyncio.get_running_loop().run_in_executor(None, e.store.find_decision, event_id, 0)
    assert d is not None
    return d


def by_key(features: tuple[Feature, ...]) -> dict[str, float | str]:
    return {f"{ns}.{name}": v for ns, name, v in features}


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/nb.db"


def test_the_stored_profile_joins_the_request_which_wins_on_a_name(db: str) -> None:
    async def body() -> None:
        clock = FakeClock()
        async with engine_on(db, clock) as e:
            await e.config.apply([placement(context={"profile": True})])
            await put(e, profile("c1", clock() - DAY, plan="postpaid", arpu=31.5, region="north"))
            d = (await e.chooser.choose("p", "c1", "", [feature("customer", "region", "south")]))[0]
            assert by_key(d.features) == {"customer.region": "south", "customer.plan": "postpaid", "customer.arpu": 31.5}
            assert d.context is not None
            assert d.context.profile_as_of == clock() - DAY
            assert set(d.context.profile_keys) == {"customer.plan", "customer.arpu"}  # region came from the request
            assert d.context.source_of("customer.region") == "request"
            await e.writer.flush()
            stored = await logged(e, d.event_id)
            assert stored.features == d.features and stored.context == d.context
            # A customer without a profile gets none, and an anonymous request never looks.
            other = (await e.chooser.choose("p", "c2", "", []))[0]
            assert other.features == () and other.context is None
            anonymous = (await e.chooser.choose("p", "", "", []))[0]
            assert anonymous.context is None

    run_async(body)


def test_the_model_scores_the_line_of_the_merged_features(db: str) -> None:
    """The profile's VW text is made once per read and appended to the request's: the line the
    model scores is the one the merged features make, with or without a feature in common."""

    async def body() -> None:
        clock = FakeClock()
        async with engine_on(db, clock) as e:
            await e.config.apply([placement(context={"profile": True})])
            await put(e, profile("c1", clock(), plan="postpaid", arpu=31.5, region="north"))
            model = e.states["p"].models[""].model
            scored: list[str] = []
            score = model.expected_rewards

            def spy(shared: str, arms: Any) -> Any:
                scored.append(shared)
                return score(shared, arms)

            model.expected_rewards = spy  # type: ignore[method-assign]
            for request in ([], [feature("channel", "name", "ivr")], [feature("customer", "region", "south")]):
                d = (await e.chooser.choose("p", "c1", "", request))[0]
                assert scored[-1] == shared_line(d.features), request

    run_async(body)


def test_a_placement_without_context_profile_ignores_the_profile(db: str) -> None:
    async def body() -> None:
        clock = FakeClock()
        async with engine_on(db, clock) as e:
            await e.config.apply([placement()])
            await put(e, profile("c1", clock(), plan="postpaid"))
            d = (await e.chooser.choose("p", "c1", "", []))[0]
            assert d.features == () and d.context is None
            assert e.profiles.reads == 0

    run_async(body)


def test_rules_read_the_profile_and_fail_closed_without_one(db: str) -> None:
    async def body() -> None:
        clock = FakeClock()
        async with engine_on(db, clock) as e:
            await e.config.apply([placement(context={"profile": True}, eligible=POSTPAID)])
            await put(e, profile("c1", clock(), plan="postpaid"), profile("c2", clock(), plan="prepaid"))
            assert (await e.chooser.choose("p", "c1", "", []))[0].arm_id is not None
            for customer in ("c2", "c3"):  # prepaid; no profile at all: the rule is false or unknown
                d = (await e.chooser.choose("p", customer, "", []))[0]
                assert d.arm_id is None and len(d.ineligible) == len(envs.ARMS)

    run_async(body)


def test_a_profile_updated_after_a_decision_leaves_its_logged_context_alone(db: str) -> None:
    async def body() -> None:
        clock = FakeClock()
        async with engine_on(db, clock, profile_cache_ttl=5.0) as e:
            await e.config.apply([placement(context={"profile": True})])
            await put(e, profile("c1", clock(), plan="prepaid"))
            first = (await e.chooser.choose("p", "c1", "", []))[0]
            clock.advance(1)
            await put(e, profile("c1", clock(), plan="postpaid"))  # by the loader or another server
            cached = (await e.chooser.choose("p", "c1", "", []))[0]
            assert by_key(cached.features)["customer.plan"] == "prepaid"  # within the TTL: the cached one
            clock.advance(5)
            fresh = (await e.chooser.choose("p", "c1", "", []))[0]
            assert by_key(fresh.features)["customer.plan"] == "postpaid"
            assert fresh.context is not None and fresh.context.profile_as_of == clock() - 5
            await e.writer.flush()
            assert by_key((await logged(e, first.event_id)).features)["customer.plan"] == "prepaid"
            # A write through this server (ProfileService) is used at once.
            await put(e, profile("c1", clock(), plan="hybrid"))
            e.profiles.written(["c1"])
            assert by_key((await e.chooser.choose("p", "c1", "", []))[0].features)["customer.plan"] == "hybrid"

    run_async(body)


def test_expired_profiles_are_not_used(db: str) -> None:
    async def body() -> None:
        clock = FakeClock()
        async with engine_on(db, clock) as e:
            await e.config.apply([placement(context={"profile": True})])
            p = profile("c1", clock(), plan="postpaid")
            await put(e, Profile(p.customer_id, p.features, p.as_of, expires_at=clock() + 3))
            assert (await e.chooser.choose("p", "c1", "", []))[0].context is not None
            clock.advance(3)  # expired while cached
            assert (await e.chooser.choose("p", "c1", "", []))[0].context is None
            await e._forget_old()  # the sweep deletes it
            rows = await asyncio.get_running_loop().run_in_executor(None, e.store.get_profiles, ["c1"], clock() - 10)
            assert rows == {}

    run_async(body)


def test_concurrent_misses_are_read_together(db: str) -> None:
    async def body() -> None:
        clock = FakeClock()
        async with engine_on(db, clock) as e:
            await e.config.apply([placement(context={"profile": True})])
            await put(e, *(profile(f"c{i}", clock(), arpu=float(i)) for i in range(40)))
            out = await asyncio.gather(*(e.chooser.choose("p", f"c{i}", "", []) for i in range(40)))
            assert [by_key(ds[0].features)["customer.arpu"] for ds in out] == [float(i) for i in range(40)]
            assert e.profiles.reads == 1  # one query for the forty misses
            await asyncio.gather(*(e.chooser.choose("p", f"c{i}", "", []) for i in range(40)))
            assert e.profiles.reads == 1  # then from the cache

    run_async(body)


def test_misses_while_a_read_is_out_are_read_together_after_it(db: str) -> None:
    """A miss does not start a read of its own while one is out: the misses of that time wait
    for it and go in one read, so that batches grow with the load instead of the reads."""

    async def body() -> None:
        clock = FakeClock()
        async with engine_on(db, clock) as e:
            await e.config.apply([placement(context={"profile": True})])
            await put(e, *(profile(f"c{i}", clock(), arpu=float(i)) for i in range(11)))
            gate = threading.Event()
            real = e.store.get_profiles

            def held(ids: Any, now: float) -> Any:
                gate.wait(30)
                return real(ids, now)

            e.store.get_profiles = held  # type: ignore[method-assign]
            first = asyncio.ensure_future(e.chooser.choose("p", "c0", "", []))
            while e.profiles.reads < 1:
                await asyncio.sleep(0)
            later = []
            for i in range(1, 11):  # each on a turn of its own, while the first read is out
                later.append(asyncio.ensure_future(e.chooser.choose("p", f"c{i}", "", [])))
                await asyncio.sleep(0)
            gate.set()
            out = await asyncio.gather(first, *later)
            assert [by_key(ds[0].features)["customer.arpu"] for ds in out] == [float(i) for i in range(11)]
            assert e.profiles.reads == 2

    run_async(body)


# -- interaction history ---------------------------------------------------------------------


def test_history_features_count_per_offer_within_each_window() -> None:
    now = 100 * DAY
    seen = [
        Impression(now - 20 * DAY, "a", None, "p", "e1", True),
        Impression(now - 3 * DAY, "a", None, "q", "e2", False),
        Impression(now - 1 * DAY, "a", None, "p", "e3", None),  # window still open
        Impression(now - 2 * DAY, "b", None, "p", "e4", True),
        Impression(now - 40 * DAY, "b", None, "p", "e5", True),  # beyond the longest window
    ]
    out = history_features(seen, ["a", "b", "c"], [("7d", 7 * DAY), ("30d", 30 * DAY)], now)
    assert by_key(out["a"]) == {
        "history.impressions_7d": 2.0,
        "history.accepts_7d": 0.0,
        "history.impressions_30d": 3.0,
        "history.accepts_30d": 1.0,
        "history.days_since_impression": 1.0,
        "history.days_since_accept": 20.0,
    }
    assert by_key(out["b"]) == {
        "history.impressions_7d": 1.0,
        "history.accepts_7d": 1.0,
        "history.impressions_30d": 1.0,
        "history.accepts_30d": 1.0,
        "history.days_since_impression": 2.0,
        "history.days_since_accept": 2.0,
    }
    # Never shown: zero counts, no days-since (a rule on it is unknown, and fails closed).
    assert by_key(out["c"]) == {
        "history.impressions_7d": 0.0,
        "history.accepts_7d": 0.0,
        "history.impressions_30d": 0.0,
        "history.accepts_30d": 0.0,
    }


def test_a_rule_on_history_hides_an_offer_taken_within_30_days(db: str) -> None:
    async def body() -> None:
        clock = FakeClock()
        not_taken = {"feature": "history.accepts_30d", "eq": 0}
        arms = [{"id": a, "features": {"category": envs.CATEGORY[a]}, "eligible": not_taken} for a in envs.ARMS]
        async with engine_on(db, clock) as e:
            await e.config.apply([placement(arms=arms, context={"history": ["7d", "30d"]})])
            d = (await e.chooser.choose("p", "c1", "", []))[0]
            taken = d.arm_id
            assert taken is not None
            assert await e.windows.reward(d.event_id, 1.0) is not None  # accepted
            for _ in range(30):  # every served arm checked against the rule
                clock.advance(3600)
                d2 = (await e.chooser.choose("p", "c1", "", []))[0]
                assert d2.arm_id != taken
                assert dict(d2.ineligible)[taken] == "rule: history.accepts_30d != 0"
                assert d2.context is not None
                hist = dict(zip([a for a, _ in d2.arms], d2.context.arm_features, strict=True))
                assert taken not in hist  # logged per eligible arm
                assert all(by_key(fs)["history.accepts_30d"] == 0.0 for fs in hist.values())
                await e.windows.reward(d2.event_id, 0.0)
            clock.advance(31 * DAY)  # the accept left the window: the offer may be shown again
            later = (await e.chooser.choose("p", "c1", "", []))[0]
            assert later.ineligible == () and taken in [a for a, _ in later.arms]

    run_async(body)


def test_history_features_are_logged_and_learned_as_scored(db: str) -> None:
    async def body() -> None:
        clock = FakeClock()
        async with engine_on(db, clock) as e:
            await e.config.apply([placement(context={"history": ["7d"]})])
            first = (await e.chooser.choose("p", "c1", "", []))[0]
            clock.advance(DAY)
            second = (await e.chooser.choose("p", "c1", "", []))[0]
            assert second.context is not None
            hist = dict(zip([a for a, _ in second.arms], second.context.arm_features, strict=True))
            assert first.arm_id is not None
            assert by_key(hist[first.arm_id])["history.impressions_7d"] == 1.0
            assert by_key(hist[first.arm_id])["history.days_since_impression"] == 1.0
            seen: list[list[str]] = []
            model = e.states["p"].models[""].model
            learn = model.learn

            def spy(shared: str, arms: list[str], chosen: int, reward: float) -> None:
                seen.append(list(arms))
                learn(shared, arms, chosen, reward)

            model.learn = spy  # type: ignore[method-assign]
            await e.windows.reward(second.event_id, 1.0)
            await e.writer.flush()
            await e.learner.catch_up("p")
            assert seen, "the reward was not learned"
            line = seen[-1][[a for a, _ in second.arms].index(first.arm_id)]
            assert "history.impressions_7d:1.0" in line and "history.days_since_impression:1.0" in line

    run_async(body)


@pytest.mark.parametrize("contact_store", ["memory", "database"])
def test_a_history_window_added_later_counts_the_logged_past(db: str, contact_store: str) -> None:
    """Rebuilt from the log: this server's memory at the change, or (shared between servers)
    the log's impressions copied into the shared history, which no one recorded while no rule
    read them."""

    async def body() -> None:
        clock = FakeClock()
        async with engine_on(db, clock, contact_store=contact_store) as e:
            await e.config.apply([placement()])
            served = [(await e.chooser.choose("p", "c1", "", []))[0].arm_id for _ in range(4)]
            await e.writer.flush()
            clock.advance(DAY)
            await e.config.apply([placement(context={"history": ["7d"]})])
            if e.contacts._backfill is not None:
                await e.contacts._backfill
            d = (await e.chooser.choose("p", "c1", "", []))[0]
            assert d.context is not None
            hist = {a: by_key(fs) for (a, _), fs in zip(d.arms, d.context.arm_features, strict=True)}
            for arm in envs.ARMS:
                assert hist[arm]["history.impressions_7d"] == served.count(arm), arm
            assert all(hist[a]["history.days_since_impression"] == 1.0 for a in set(served))

    run_async(body)
