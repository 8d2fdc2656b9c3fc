"""Prometheus metrics on their HTTP port and structured logs, through a real server."""

from __future__ import annotations

import gc
import json
import logging
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nextbest.bandit.spec import PlacementSpec
from nextbest.telemetry import gc_pauses as collector
from nextbest.telemetry.json_logs import JsonFormatter
from nextbest.v1 import common_pb2, decision_pb2
from tests.harness import ServerThread, make_settings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def caught_up(port: int, placement: str = "app_home_banner", timeout: float = 10) -> Samples:
    """A scrape once every closed window is in the learn sequence and learned."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(port)
        lag = value(m, "nextbest_learner_lag", placement=placement)
        if lag == 0 and value(m, "nextbest_model_cursor", placement=placement) == value(m, "nextbest_learn_seq"):
            return m
        assert time.monotonic() < deadline, "the learner did not catch up"
        time.sleep(0.05)


PLACEMENT = PlacementSpec.model_validate(
    {
        "id": "app_home_banner",
        "exploration": {"algorithm": "epsilon", "epsilon": 0.5},
        "learn_at": "reward",  # the metrics show a reward learned as soon as it is acknowledged
        "arms": [
            {"id": "paid", "cost_per_impression": 1.0, "cost_per_reward": 2.0, "budget": {"total": 100}},
            {"id": "free"},
        ],
    }
)


@pytest.fixture
def served(db_url: str) -> Iterator[ServerThread]:
    s = ServerThread(make_settings(db_url, metrics_port=0))
    with s.client() as c:
        c.apply([PLACEMENT])
    yield s
    s.stop()


def test_metrics_are_off_unless_a_port_is_set(server: ServerThread) -> None:
    assert server.running.metrics_port is None


def test_rpc_counts_and_latency_by_method_and_code(served: ServerThread) -> None:
    port = served.running.metrics_port
    assert port
    with served.client() as c:
        for i in range(7):
            c.choose("app_home_banner", {"segment": "youth"}, event_id=f"e{i}")
        for call in (lambda: c.choose(""), lambda: c.reward("nope", 1.0), lambda: c.choose("nope")):
            with pytest.raises(grpc.RpcError):
                call()
    choose = "nextbest.v1.DecisionService/Choose"
    # A failed call's status reaches the client before the server has counted it: wait for the last.
    deadline = time.monotonic() + 10
    while value(m := scrape(port), "nextbest_rpc_duration_seconds_count", method=choose, code="NOT_FOUND") < 1:
        assert time.monotonic() < deadline, "the last failed Choose was never counted"
        time.sleep(0.05)
    assert value(m, "nextbest_rpc_duration_seconds_count", method=choose, code="OK") == 7
    assert value(m, "nextbest_rpc_duration_seconds_count", method=choose, code="INVALID_ARGUMENT") == 1
    assert value(m, "nextbest_rpc_duration_seconds_count", method=choose, code="NOT_FOUND") == 1
    assert value(m, "nextbest_rpc_duration_seconds_count", method="nextbest.v1.DecisionService/Reward", code="NOT_FOUND") == 1
    assert value(m, "nextbest_rpc_duration_seconds_count", method="nextbest.v1.AdminService/ApplyConfig", code="OK") == 1
    # every call falls in the +Inf bucket, and the sum of latencies is positive and plausible
    assert value(m, "nextbest_rpc_duration_seconds_bucket", method=choose, code="OK", le="+Inf") == 7
    assert 0 < value(m, "nextbest_rpc_duration_seconds_sum", method=choose, code="OK") < 7 * 1.0
    assert value(m, "nextbest_reward_calls_total", status="unknown") == 1


def test_decisions_rewards_budgets_and_models_match_the_stats(served: ServerThread) -> None:
    port = served.running.metrics_port
    assert port
    with served.client() as c:
        events = [c.choose("app_home_banner", {"segment": "youth"}) for _ in range(30)]
        for d in events[:12]:
            assert c.reward(d.event_id, 1.0) == "learned"
        assert c.reward(events[0].event_id, 1.0) == "duplicate"
        m = caught_up(port)
        stats = c.stats("app_home_banner")
    by_arm = {a.arm_id: a for a in stats.arms}
    for arm in ("paid", "free"):
        assert value(m, "nextbest_decisions_total", placement="app_home_banner", arm=arm) == by_arm[arm].impressions
        assert value(m, "nextbest_rewards_total", placement="app_home_banner", arm=arm, outcome="reward") == by_arm[arm].rewards
    assert value(m, "nextbest_reward_calls_total", status="learned") == 12
    assert value(m, "nextbest_reward_calls_total", status="duplicate") == 1
    assert value(m, "nextbest_model_version", placement="app_home_banner", model="") == stats.model_version == 12
    assert value(m, "nextbest_learn_seq") == 12
    budget = next(b for b in stats.budgets if b.budget == "arm:app_home_banner/paid")
    assert value(m, "nextbest_budget_remaining", budget="arm:app_home_banner/paid", period="total") == pytest.approx(budget.remaining)
    assert value(m, "nextbest_budget_limit", budget="arm:app_home_banner/paid", period="total") == 100
    assert budget.remaining < 100  # the paid arm was served and spent
    assert value(m, "nextbest_ready") == 1
    assert value(m, "nextbest_writer_queue_depth") == 0
    assert value(m, "nextbest_inflight_rpcs") == 0


def test_learner_lag_shows_rewards_not_yet_learned(served: ServerThread) -> None:
    port = served.running.metrics_port
    assert port
    engine = served.engine
    served.call(engine.learner.stop())
    with served.client() as c:
        events = [c.choose("app_home_banner") for _ in range(5)]
        for d in events:
            assert c.reward(d.event_id, 1.0) == "learned"
    m = scrape(port)
    assert value(m, "nextbest_learner_lag", placement="app_home_banner") == 5
    assert value(m, "nextbest_model_version", placement="app_home_banner", model="") == 0

    async def restart() -> None:
        engine.learner.start()
        engine.learner.poke("app_home_banner")

    served.call(restart())
    m = caught_up(port)
    assert value(m, "nextbest_model_version", placement="app_home_banner", model="") == 5
    assert value(m, "nextbest_learn_seq") == value(m, "nextbest_model_cursor", placement="app_home_banner") == 5


def test_a_scrape_while_the_loop_is_busy_serves_the_last_reading_quickly(served: ServerThread) -> None:
    port = served.running.metrics_port
    assert port
    first = scrape(port)
    served.loop.call_soon_threadsafe(time.sleep, 2.5)  # the loop is stuck
    time.sleep(0.05)
    t0 = time.monotonic()
    second = scrape(port)
    assert time.monotonic() - t0 < 2.0
    assert value(second, "nextbest_ready") == value(first, "nextbest_ready") == 1


def test_unknown_event_rewards_are_logged_as_json_with_the_event_id(served: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with served.client() as c, pytest.raises(grpc.RpcError) as e:
        c.reward("order-77", 3.5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    rec = next(r for r in caplog.records if getattr(r, "event", "") == "reward_unknown_event")
    out = json.loads(JsonFormatter().format(rec))
    assert out["event_id"] == "order-77" and out["reward"] == 3.5 and out["level"] == "WARNING"
    assert set(out) >= {"ts", "logger", "msg"}


def test_access_log_at_debug_names_method_and_code(served: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="nextbest.rpc")
    with served.client() as c:
        c.decision.Choose(
            decision_pb2.ChooseRequest(placement="app_home_banner", features=[common_pb2.Feature(name="a", number=1.0)]),
            timeout=5,
        )
    rec = next(r for r in caplog.records if getattr(r, "event", "") == "rpc")
    out = json.loads(JsonFormatter().format(rec))
    assert out["method"] == "nextbest.v1.DecisionService/Choose" and out["code"] == "OK" and out["seconds"] > 0


def test_garbage_collector_pauses_are_observed_by_generation_until_stop(db_url: str) -> None:
    s = ServerThread(make_settings(db_url, metrics_port=0))
    observer = s.running.engine.metrics.gc_pauses
    try:
        port = s.running.metrics_port
        assert port and observer in gc.callbacks
        before = scrape(port)
        gc.collect(1)
        gc.collect(2)
        m = scrape(port)
        for gen in ("1", "2"):
            count = "nextbest_gc_pause_seconds_count"
            assert value(m, count, generation=gen) >= value(before, count, generation=gen) + 1
            assert value(m, "nextbest_gc_pause_seconds_sum", generation=gen) > 0
    finally:
        s.stop()
    assert observer not in gc.callbacks  # a stopped server leaves the process's collector alone


def test_collector_tuning_freezes_the_start_state_and_collects_young_objects_often() -> None:
    saved = gc.get_threshold()
    try:
        collector.tune()
        assert gc.get_threshold() == collector.THRESHOLDS
        assert gc.get_freeze_count() > 0
        # small young collections: the first threshold bounds a pause (see server/telemetry/gc_pauses.py)
        assert collector.THRESHOLDS[0] <= 5_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
