"""Limits of ApplyConfig through real gRPC: at most 1,000 active arms per placement, and every
Timestamp within protobuf's range; beyond them INVALID_ARGUMENT naming the field, nothing applied."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from nextbest.bandit.spec import MAX_ARMS, PlacementSpec
from nextbest.v1 import admin_pb2
from tests.harness import ServerThread, make_settings

MAX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z
MIN_SECONDS = -62135596800  # 0001-01-01T00:00:00Z


@pytest.fixture()
def server(tmp_path: Any) -> Any:
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb.db"))
    yield s
    s.stop()


def _refused(server: ServerThread, request: admin_pb2.ApplyConfigRequest) -> str:
    with server.client() as c, pytest.raises(grpc.RpcError) as e:
        c.admin.ApplyConfig(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    return str(e.value.details())


def test_more_than_1000_active_arms_are_refused_naming_the_field(server: ServerThread) -> None:
    too_many = admin_pb2.Placement(id="p", arms=[admin_pb2.Arm(id=f"a{i}") for i in range(MAX_ARMS + 1)])
    details = _refused(server, admin_pb2.ApplyConfigRequest(placements=[too_many]))
    assert details == "placements[0].arms: at most 1,000 active arms per placement, got 1,001"
    with server.client() as c:
        assert c.admin.ListPlacements(admin_pb2.ListPlacementsRequest()).placements == []  # nothing applied
        spec = PlacementSpec.model_validate({"id": "p", "arms": [{"id": f"a{i}"} for i in range(MAX_ARMS)]})
        c.apply([spec])  # the limit itself is fine
        assert c.choose("p", {}).arm_id.startswith("a")


def _ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ("arm_budget_start", "placements[0].arms[0].budget.start_time"),
        ("arm_budget_end", "placements[0].arms[0].budget.end_time"),
        ("arm_start", "placements[0].arms[0].start_time"),
        ("placement_end", "placements[0].end_time"),
        ("campaign_end", "campaigns[0].budget.end_time"),
    ],
)
def test_a_timestamp_outside_protobufs_range_is_invalid_argument_naming_the_field(server: ServerThread, where: str, field: str) -> None:
    for bad in (_ts(MAX_SECONDS + 1), _ts(MIN_SECONDS - 1), _ts(0, 1_000_000_000), _ts(2**62)):
        placement = admin_pb2.Placement(id="p", arms=[admin_pb2.Arm(id="a", budget=admin_pb2.Budget(total=10.0)), admin_pb2.Arm(id="b")])
        arm = placement.arms[0]  # the message itself (a constructor copies)
        campaign = admin_pb2.Campaign(id="c", budget=admin_pb2.Budget(total=5.0))
        if where == "arm_budget_start":
            arm.budget.start_time.CopyFrom(bad)
        elif where == "arm_budget_end":
            arm.budget.end_time.CopyFrom(bad)
        elif where == "arm_start":
            arm.start_time.CopyFrom(bad)
        elif where == "placement_end":
            placement.end_time.CopyFrom(bad)
        else:
            campaign.budget.end_time.CopyFrom(bad)
        details = _refused(server, admin_pb2.ApplyConfigRequest(placements=[placement], campaigns=[campaign]))
        assert details.startswith(f"{field}: outside the Timestamp range 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z"), details
    with server.client() as c:
        assert c.admin.ListPlacements(admin_pb2.ListPlacementsRequest()).placements == []


def test_the_edges_of_the_range_are_served_read_back_and_exported(server: ServerThread) -> None:
    arm = admin_pb2.Arm(id="a", budget=admin_pb2.Budget(total=10.0, start_time=_ts(MIN_SECONDS), end_time=_ts(MAX_SECONDS)))
    placement = admin_pb2.Placement(id="p", arms=[arm, admin_pb2.Arm(id="b", end_time=_ts(MAX_SECONDS, 999_999_000))])
    with server.client() as c:
        c.admin.ApplyConfig(admin_pb2.ApplyConfigRequest(placements=[placement]), timeout=30)
        assert c.choose("p", {}).arm_id in ("a", "b")
        got = c.placement("p")
        budget = got.arms[0].budget
        assert budget is not None and budget.end is not None and budget.start is not None
        assert budget.end.timestamp() == MAX_SECONDS and budget.start.timestamp() == MIN_SECONDS
        assert c.stats("p").decisions >= 0


def test_a_projected_exhaustion_beyond_the_timestamp_range_is_left_out_not_internal(tmp_path: Any) -> None:
    """A large budget spent slowly projects its exhaustion past 9999: GetStats answers, without it."""
    from nextbest.v1 import admin_pb2 as pb
    from tests.harness import FakeClock, running_server

    clock = FakeClock()
    spec = PlacementSpec.model_validate(
        {
            "id": "p",
            "arms": [{"id": "a", "cost_per_impression": 0.001, "budget": {"total": 1e9, "start": "2027-01-01T00:00:00Z"}}, {"id": "b"}],
        }
    )
    with running_server(f"sqlite:///{tmp_path}/nb.db", clock=clock) as s, s.client() as c:
        c.apply([spec])
        for _ in range(20):
            c.choose("p", {})
        clock.advance(86400.0)
        budgets = c.admin.GetStats(pb.GetStatsRequest(placement="p"), timeout=30).budgets
        assert budgets and all(not b.HasField("projected_exhaustion") for b in budgets)
