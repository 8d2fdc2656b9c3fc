"""The gRPC contract through a real server on port 0 and a real channel."""

from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nextbest.v1 import admin_pb2, common_pb2, decision_pb2
from tests import envs
from tests.harness import ServerThread


@pytest.fixture
def placed(server: ServerThread) -> ServerThread:
    with server.client() as c:
        c.apply([envs.placement()])
    return server


def _code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()  # type: ignore[no-any-return, attr-defined]


def test_choose_returns_an_arm_with_its_exact_probability(placed: ServerThread) -> None:
    engine = placed.engine
    with placed.client() as c:
        d = c.choose("app_home_banner", {"customer": {"segment": "youth"}}, customer_id="c1")
        assert d.arm_id in envs.ARMS
        assert 0 < d.probability <= 1
        assert len(d.event_id) == 49 and d.event_id[16] == "-"  # the server that made it, then 128 random bits
        placed.call(engine.writer.flush())
        logged = engine.store.find_decision(d.event_id)
        assert logged.arm_id == d.arm_id
        assert logged.probability == d.probability
        assert math.isclose(sum(logged.pmf), 1.0)
        assert logged.pmf[logged.chosen] == d.probability
        assert [a for a, _ in logged.arms] == envs.ARMS
        assert logged.customer_id == "c1"


def test_caller_event_id_is_kept_and_draws_are_reproducible(placed: ServerThread) -> None:
    with placed.client() as c:
        d = c.choose("app_home_banner", {"segment": "family"}, event_id="order-1")
        assert d.event_id == "order-1"
        with pytest.raises(grpc.RpcError) as e:
            c.choose("app_home_banner", {"segment": "family"}, event_id="order-1")
        assert _code(e) == grpc.StatusCode.ALREADY_EXISTS


def test_reward_statuses_and_duplicates_change_nothing(placed: ServerThread) -> None:
    with placed.client() as c:
        d = c.choose("app_home_banner", {"segment": "youth"})
        assert c.reward(d.event_id, 2.5) == "learned"
        import time

        deadline = time.monotonic() + 10
        while placed.engine.states["app_home_banner"].model.learned < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        before = c.stats("app_home_banner")
        assert c.reward(d.event_id, 2.5) == "duplicate"
        assert c.reward(d.event_id, 100.0) == "duplicate"
        after = c.stats("app_home_banner")
        assert before == after
        arm = next(a for a in after.arms if a.arm_id == d.arm_id)
        assert (arm.impressions, arm.rewards, arm.reward_sum) == (1, 1, 2.5)
        assert after.decisions == 1 and after.pending == 0


@pytest.mark.parametrize(
    "request_, field",
    [
        (decision_pb2.ChooseRequest(placement=""), "placement"),
        (
            decision_pb2.ChooseRequest(placement="app_home_banner", features=[common_pb2.Feature(name="arpu", number=float("nan"))]),
            "features[0].number",
        ),
        (
            decision_pb2.ChooseRequest(placement="app_home_banner", features=[common_pb2.Feature(name="arpu", number=float("inf"))]),
            "features[0].number",
        ),
        (decision_pb2.ChooseRequest(placement="app_home_banner", features=[common_pb2.Feature(name="x")]), "features[0].value"),
        (decision_pb2.ChooseRequest(placement="app_home_banner", features=[common_pb2.Feature(text="x")]), "features[0].name"),
        (decision_pb2.ChooseRequest(placement="app_home_banner", event_id="e" * 300), "event_id"),
    ],
)
def test_bad_choose_is_invalid_argument_naming_the_field_and_stores_nothing(
    placed: ServerThread, request_: decision_pb2.ChooseRequest, field: str
) -> None:
    with placed.client() as c:
        with pytest.raises(grpc.RpcError) as e:
            c.decision.Choose(request_, timeout=5)
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field + ":")  # type: ignore[attr-defined]
        assert c.stats("app_home_banner").decisions == 0


@pytest.mark.parametrize(
    "event_id, reward, field",
    [("", 1.0, "event_id"), ("x", float("nan"), "reward"), ("x", float("inf"), "reward"), ("x", float("-inf"), "reward")],
)
def test_bad_reward_is_invalid_argument_and_stores_nothing(placed: ServerThread, event_id: str, reward: float, field: str) -> None:
    with placed.client() as c:
        d = c.choose("app_home_banner", {"segment": "youth"}, event_id="x")
        with pytest.raises(grpc.RpcError) as e:
            c.reward(event_id or "", reward)
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field + ":")  # type: ignore[attr-defined]
        s = c.stats("app_home_banner")
        assert sum(a.rewards for a in s.arms) == 0 and s.pending == 1
        assert c.reward(d.event_id, 1.0) == "learned"  # the event is still open


def test_unknown_placement_and_event_are_not_found(placed: ServerThread) -> None:
    with placed.client() as c:
        for call in (
            lambda: c.choose("nope", {}),
            lambda: c.reward("no-such-event", 1.0),
            lambda: c.stats("nope"),
            lambda: c.placement("nope"),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert _code(e) == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(placed: ServerThread) -> None:
    with grpc.insecure_channel(placed.target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for name in ("", "nextbest.v1.DecisionService", "nextbest.v1.AdminService"):
            assert h.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
        r = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"nextbest.v1.DecisionService", "nextbest.v1.AdminService", "grpc.health.v1.Health"} <= names


def test_health_is_not_serving_until_models_are_loaded(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import socket
    import threading

    from nextbest.app import create_server
    from nextbest.engine.engine import Engine
    from tests.harness import make_settings

    release = threading.Event()
    original = Engine.start

    async def slow_start(self: Engine) -> None:
        while not release.is_set():
            await asyncio.sleep(0.01)
        await original(self)

    monkeypatch.setattr(Engine, "start", slow_start)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    fut = asyncio.run_coroutine_threadsafe(create_server(make_settings(db_url, port=port)), loop)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            check = health_pb2.HealthCheckRequest(service="nextbest.v1.DecisionService")
            assert stub.Check(check, wait_for_ready=True, timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
            release.set()
            running = fut.result(30)
            assert stub.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(30)
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


def test_admin_placements_and_arms(server: ServerThread) -> None:
    with server.client() as c:
        a = c.admin
        p = admin_pb2.Placement(
            id="web_checkout",
            arms=[admin_pb2.Arm(id="a1", features=[common_pb2.Feature(name="price", number=4.99)])],
            exploration=admin_pb2.Exploration(algorithm=admin_pb2.EXPLORATION_ALGORITHM_EPSILON, epsilon=0.2),
        )
        created = a.CreatePlacement(admin_pb2.CreatePlacementRequest(placement=p)).placement
        assert created.arms[0].active and created.arms[0].version == 1
        assert created.exploration.epsilon == pytest.approx(0.2)
        with pytest.raises(grpc.RpcError) as e:
            a.CreatePlacement(admin_pb2.CreatePlacementRequest(placement=p))
        assert _code(e) == grpc.StatusCode.ALREADY_EXISTS
        arm = a.CreateArm(admin_pb2.CreateArmRequest(placement="web_checkout", arm=admin_pb2.Arm(id="a2"))).arm
        assert arm.id == "a2" and arm.active
        upd = a.UpdateArm(
            admin_pb2.UpdateArmRequest(
                placement="web_checkout", arm=admin_pb2.Arm(id="a1", features=[common_pb2.Feature(name="price", number=3.99)])
            )
        ).arm
        assert upd.version == 2 and upd.features[0].number == pytest.approx(3.99)
        assert [x.id for x in a.ListArms(admin_pb2.ListArmsRequest(placement="web_checkout")).arms] == ["a1", "a2"]
        assert a.GetArm(admin_pb2.GetArmRequest(placement="web_checkout", arm_id="a2")).arm.id == "a2"
        p2 = admin_pb2.Placement(id="web_checkout", arms=[admin_pb2.Arm(id="a2")])
        after = a.UpdatePlacement(admin_pb2.UpdatePlacementRequest(placement=p2)).placement
        assert [(x.id, x.active) for x in after.arms] == [("a2", True), ("a1", False)]
        assert [x.id for x in a.ListPlacements(admin_pb2.ListPlacementsRequest()).placements] == ["web_checkout"]
        for _ in range(20):
            assert c.choose("web_checkout").arm_id == "a2"  # a retired arm is never chosen


@pytest.mark.parametrize(
    "placement, field",
    [
        (admin_pb2.Placement(id="bad id"), "placement.id"),
        (admin_pb2.Placement(id="p", arms=[admin_pb2.Arm(id="a"), admin_pb2.Arm(id="a")]), "placement.arms[1].id"),
        (admin_pb2.Placement(id="p", vw_args="--bogus_option"), "placement.vw_args"),
        (admin_pb2.Placement(id="p", vw_args="-f /tmp/model"), "placement.vw_args"),
        (admin_pb2.Placement(id="p", exploration=admin_pb2.Exploration(epsilon=1.5)), "placement.exploration.epsilon"),
        (admin_pb2.Placement(id="p", reward_window_seconds=-1), "placement.reward_window"),
        (
            admin_pb2.Placement(id="p", arms=[admin_pb2.Arm(id="a", features=[common_pb2.Feature(name="x", number=math.nan)])]),
            "placement.arms[0].features",
        ),
    ],
)
def test_invalid_placement_is_rejected_and_nothing_changes(server: ServerThread, placement: admin_pb2.Placement, field: str) -> None:
    with server.client() as c:
        with pytest.raises(grpc.RpcError) as e:
            c.admin.CreatePlacement(admin_pb2.CreatePlacementRequest(placement=placement))
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field + ":") or f" {field}:" in e.value.details()  # type: ignore[attr-defined]
        assert c.placements() == []


def test_apply_is_atomic_and_idempotent(server: ServerThread) -> None:
    with server.client() as c:
        good = envs.placement("p1")
        bad = admin_pb2.Placement(id="p2", vw_args="--nonsense")
        from nextbest.client import spec_pb

        with pytest.raises(grpc.RpcError):
            c.admin.ApplyConfig(admin_pb2.ApplyConfigRequest(placements=[spec_pb(good), bad]))
        assert c.placements() == []
        assert [ch.action for ch in c.apply([good], dry_run=True)][:1] == ["CREATE"]
        assert c.placements() == []
        first = c.apply([good])
        assert len(first) == 1 + len(envs.ARMS)
        assert c.apply([good]) == []


def test_a_paused_or_ended_placement_answers_no_arm(server: ServerThread) -> None:
    with server.client() as c:
        c.apply([envs.placement(active=False)])
        d = c.choose("app_home_banner", {"segment": "youth"})
        assert (d.arm_id, d.reason) == ("", "placement paused")
        c.apply([envs.placement(end="2020-01-01T00:00:00Z")])
        assert c.choose("app_home_banner").reason == "placement ended"
        c.apply([envs.placement(start="2999-01-01T00:00:00Z")])
        assert c.choose("app_home_banner").reason == "placement not started"
        c.apply([envs.placement()])  # resumed
        assert c.choose("app_home_banner").arm_id in envs.ARMS
        assert c.stats("app_home_banner").no_offer == 3


def test_constraint_settings_survive_the_api(server: ServerThread) -> None:
    spec = envs.placement(
        fatigue={"kind": "scale", "strength": 0.2, "half_life": "5d"},
        contact_policies=[{"max_impressions": 3, "per": "customer", "window": "1d"}, {"suppress_after_ignored": 2, "for": "14d"}],
        cooldown="1h",
    )
    with server.client() as c:
        c.apply([spec])
        assert c.placement("app_home_banner").model_dump(exclude={"arms"}) == spec.model_dump(exclude={"arms"})
        assert c.apply([spec]) == []
