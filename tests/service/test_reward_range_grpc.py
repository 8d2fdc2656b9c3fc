"""A placement's ``reward_range`` through real gRPC (issue #33): applied, read back, used as the
exploration scale of the decisions it serves (Explain shows it), and refused with the field named
when it is not a range within max_abs_reward."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from nextbest.bandit.spec import PlacementSpec
from nextbest.v1 import admin_pb2
from tests.harness import ServerThread, make_settings


@pytest.fixture()
def server(tmp_path: Any) -> Any:
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb.db"))
    yield s
    s.stop()


def _spec(**extra: Any) -> PlacementSpec:
    return PlacementSpec.model_validate({"id": "p", "arms": [{"id": "a"}, {"id": "b"}], "exploration": {"algorithm": "squarecb"}, **extra})


def test_a_reward_range_is_applied_read_back_and_scales_exploration(server: ServerThread) -> None:
    with server.client() as c:
        c.apply([_spec(reward_range=[0, 15], max_abs_reward=100)])
        assert c.placement("p").reward_range == (0.0, 15.0)
        got = c.choose("p", {"x": 1.0})
        assert c.explain(got.event_id).reward_scale == 15.0  # the range's width, from the first decision
        c.apply([_spec(max_abs_reward=100)])  # unset again: back to the estimate
        assert c.placement("p").reward_range is None


@pytest.mark.parametrize(
    ("low", "high", "says"),
    [(5.0, 5.0, "the low end must be below the high end"), (0.0, 1e3, "reaches beyond max_abs_reward")],
)
def test_a_bad_reward_range_is_invalid_argument_naming_the_field(server: ServerThread, low: float, high: float, says: str) -> None:
    bad = admin_pb2.Placement(
        id="p", arms=[admin_pb2.Arm(id="a")], max_abs_reward=100, reward_range=admin_pb2.RewardRange(low=low, high=high)
    )
    with server.client() as c:
        with pytest.raises(grpc.RpcError) as e:
            c.admin.ApplyConfig(admin_pb2.ApplyConfigRequest(placements=[bad]), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reward_range" in str(e.value.details()) and says in str(e.value.details()), e.value.details()
        assert c.admin.ListPlacements(admin_pb2.ListPlacementsRequest()).placements == []  # nothing applied
