"""AdminService: placements, arms, apply and statistics, translated to the engine."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from nextbest.bandit.errors import AlreadyExists, InvalidInput, NotFound
from nextbest.bandit.spec import PlacementSpec
from nextbest.bandit.text import quote
from nextbest.engine.configure import Configurator
from nextbest.engine.stats_reader import StatsReader
from nextbest.rpc import convert
from nextbest.rpc.errors import rpc
from nextbest.v1 import admin_pb2, admin_pb2_grpc

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, config: Configurator, stats: StatsReader) -> None:
        self._config = config
        self._stats = stats

    def _placement_pb(self, pid: str) -> admin_pb2.Placement:
        return convert.placement_pb(self._config.placement(pid))

    @rpc
    async def CreatePlacement(self, request: admin_pb2.CreatePlacementRequest, context: Ctx) -> admin_pb2.CreatePlacementResponse:
        spec = convert.placement_spec(request.placement)
        if self._config.exists(spec.id):
            raise AlreadyExists(f"placement {quote(spec.id)} exists already")
        await self._config.apply([spec])
        return admin_pb2.CreatePlacementResponse(placement=self._placement_pb(spec.id))

    @rpc
    async def UpdatePlacement(self, request: admin_pb2.UpdatePlacementRequest, context: Ctx) -> admin_pb2.UpdatePlacementResponse:
        spec = convert.placement_spec(request.placement)
        self._config.placement(spec.id)  # NOT_FOUND before anything else
        await self._config.apply([spec])
        return admin_pb2.UpdatePlacementResponse(placement=self._placement_pb(spec.id))

    @rpc
    async def GetPlacement(self, request: admin_pb2.GetPlacementRequest, context: Ctx) -> admin_pb2.GetPlacementResponse:
        return admin_pb2.GetPlacementResponse(placement=self._placement_pb(request.placement))

    @rpc
    async def ListPlacements(self, request: admin_pb2.ListPlacementsRequest, context: Ctx) -> admin_pb2.ListPlacementsResponse:
        return admin_pb2.ListPlacementsResponse(placements=[convert.placement_pb(r) for r in self._config.placements()])

    async def _put_arm(self, placement: str, arm_pb: admin_pb2.Arm, create: bool) -> admin_pb2.Arm:
        spec = self._config.placement(placement).spec
        arm = convert.arm_spec(arm_pb)
        exists = any(a.id == arm.id for a in spec.arms)
        if create and exists:
            raise AlreadyExists(f"arm {quote(arm.id)} exists already in placement {quote(placement)}")
        if not create and not exists:
            raise NotFound(f"arm {quote(arm.id)} does not exist in placement {quote(placement)}")
        arms = [arm if a.id == arm.id else a for a in spec.arms] if exists else [*spec.arms, arm]
        await self._config.apply([PlacementSpec.model_validate({**spec.model_dump(by_alias=True), "arms": arms})])
        return self._arm_pb(placement, arm.id)

    def _arm_pb(self, placement: str, arm_id: str) -> admin_pb2.Arm:
        rec = self._config.placement(placement)
        for a in rec.spec.arms:
            if a.id == arm_id:
                return convert.arm_pb(a, rec.arm_versions.get(a.id, 0))
        raise NotFound(f"arm {quote(arm_id)} does not exist in placement {quote(placement)}")

    @rpc
    async def CreateArm(self, request: admin_pb2.CreateArmRequest, context: Ctx) -> admin_pb2.CreateArmResponse:
        return admin_pb2.CreateArmResponse(arm=await self._put_arm(request.placement, request.arm, create=True))

    @rpc
    async def UpdateArm(self, request: admin_pb2.UpdateArmRequest, context: Ctx) -> admin_pb2.UpdateArmResponse:
        return admin_pb2.UpdateArmResponse(arm=await self._put_arm(request.placement, request.arm, create=False))

    @rpc
    async def GetArm(self, request: admin_pb2.GetArmRequest, context: Ctx) -> admin_pb2.GetArmResponse:
        return admin_pb2.GetArmResponse(arm=self._arm_pb(request.placement, request.arm_id))

    @rpc
    async def ListArms(self, request: admin_pb2.ListArmsRequest, context: Ctx) -> admin_pb2.ListArmsResponse:
        rec = self._config.placement(request.placement)
        return admin_pb2.ListArmsResponse(arms=[convert.arm_pb(a, rec.arm_versions.get(a.id, 0)) for a in rec.spec.arms])

    @rpc
    async def ApplyConfig(self, request: admin_pb2.ApplyConfigRequest, context: Ctx) -> admin_pb2.ApplyConfigResponse:
        specs = [convert.placement_spec(p, f"placements[{i}]") for i, p in enumerate(request.placements)]
        campaigns = [convert.campaign_spec(c, f"campaigns[{i}]") for i, c in enumerate(request.campaigns)]
        if not specs and not campaigns:
            raise InvalidInput("placements", "list at least one placement or campaign")
        changes = await self._config.apply(specs, dry_run=request.dry_run, campaigns=campaigns)
        return admin_pb2.ApplyConfigResponse(changes=convert.changes_pb(changes), applied=bool(changes) and not request.dry_run)

    @rpc
    async def ListCampaigns(self, request: admin_pb2.ListCampaignsRequest, context: Ctx) -> admin_pb2.ListCampaignsResponse:
        camps = self._config.campaigns()
        return admin_pb2.ListCampaignsResponse(campaigns=[convert.campaign_pb(c) for c in camps])

    @rpc
    async def GetStats(self, request: admin_pb2.GetStatsRequest, context: Ctx) -> admin_pb2.GetStatsResponse:
        if not request.placement:
            raise InvalidInput("placement", "must not be empty")
        since, until = convert.stats_period(request)
        return convert.stats_pb(await self._stats.stats(request.placement, since, until))
