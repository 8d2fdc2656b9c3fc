"""RewardBatch: many rewards per call, each handled (and acknowledged durably) as its own Reward."""

from __future__ import annotations

import grpc
import pytest

from nextbest.storage.sql import open_store
from nextbest.v1 import decision_pb2
from tests import envs
from tests.harness import ServerThread


@pytest.fixture
def placed(server: ServerThread) -> ServerThread:
    with server.client() as c:
        c.apply([envs.placement()])
    return server


def test_each_reward_gets_its_own_result_in_order(placed: ServerThread) -> None:
    with placed.client() as c:
        ids = [c.choose("app_home_banner", {"segment": "youth"}).event_id for _ in range(5)]
        assert c.reward(ids[0], 1.0) == "learned"
        got = c.reward_batch([(ids[1], 1.0), (ids[0], 3.0), ("no-such-event", 1.0), (ids[2], 0.0), (ids[3], 2.0, 0)])
        assert [r.status for r in got] == ["learned", "duplicate", "failed", "learned", "learned"]
        missing = got[2].error
        assert missing is not None and missing.code() == grpc.StatusCode.NOT_FOUND and "no-such-event" in missing.details()
        assert [r.ok for r in got] == [True, True, False, True, True]
        s = c.stats("app_home_banner")
        assert sum(a.rewards for a in s.arms) == 4 and s.pending == 1
        assert sum(a.reward_sum for a in s.arms) == 4.0


def test_acknowledged_batch_is_durable(placed: ServerThread) -> None:
    with placed.client() as c:
        ids = [c.choose("app_home_banner", {"segment": "youth"}).event_id for _ in range(20)]
        assert [r.status for r in c.reward_batch([(e, float(i)) for i, e in enumerate(ids)])] == ["learned"] * 20
    # read straight from the database, beside the server: every acknowledged reward is there
    store = open_store(placed.settings.db)
    try:
        rows = {e: store.find_decision(e) for e in ids}
    finally:
        store.close()
    assert all(d is not None and d.reward == float(i) for i, (e, d) in enumerate(rows.items()))


@pytest.mark.parametrize(
    "items, field",
    [
        ([("ok", 1.0), ("", 1.0)], "rewards[1].event_id"),
        ([("ok", 1.0), ("ok2", float("nan"))], "rewards[1].reward"),
        ([("ok", float("inf"))], "rewards[0].reward"),
        ([("ok", 1.0, 12)], "rewards[0].slot"),
    ],
)
def test_an_invalid_item_fails_the_call_and_stores_nothing(
    placed: ServerThread, items: list[tuple[str, float] | tuple[str, float, int]], field: str
) -> None:
    with placed.client() as c:
        c.choose("app_home_banner", {"segment": "youth"}, event_id="ok")
        c.choose("app_home_banner", {"segment": "youth"}, event_id="ok2")
        with pytest.raises(grpc.RpcError) as e:
            c.reward_batch(items)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert e.value.details().startswith(field + ":")  # type: ignore[attr-defined]
        s = c.stats("app_home_banner")
        assert sum(a.rewards for a in s.arms) == 0 and s.pending == 2  # the valid items were not stored either


def test_batch_size_is_limited(placed: ServerThread) -> None:
    limit = placed.settings.max_reward_batch
    with placed.client() as c:
        req = decision_pb2.RewardBatchRequest(rewards=[decision_pb2.RewardRequest(event_id="x", reward=1.0)] * (limit + 1))
        with pytest.raises(grpc.RpcError) as e:
            c.decision.RewardBatch(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert e.value.details().startswith("rewards:")  # type: ignore[attr-defined]
        assert c.decision.RewardBatch(decision_pb2.RewardBatchRequest(), timeout=5).results == []
