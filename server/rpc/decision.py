"""DecisionService: Choose and Reward, translated to the engine."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from server.engine import Engine, RewardStatus
from server.pb.nextbest.v1 import decision_pb2, decision_pb2_grpc
from server.rpc import convert
from server.rpc.errors import rpc

_STATUS = {
    RewardStatus.LEARNED: decision_pb2.REWARD_STATUS_LEARNED,
    RewardStatus.DUPLICATE: decision_pb2.REWARD_STATUS_DUPLICATE,
    RewardStatus.LATE: decision_pb2.REWARD_STATUS_LATE,
}

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class DecisionServicer(decision_pb2_grpc.DecisionServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @rpc
    async def Choose(self, request: decision_pb2.ChooseRequest, context: Ctx) -> decision_pb2.ChooseResponse:
        d = await self._engine.choose(
            request.placement, request.customer_id, request.event_id, convert.features(request.features)
        )
        return decision_pb2.ChooseResponse(
            event_id=d.event_id,
            arm_id=d.arm_id or "",
            probability=d.probability,
            model_version=d.model_version,
            reason=d.reason,
            variant=d.variant,
        )

    @rpc
    async def Reward(self, request: decision_pb2.RewardRequest, context: Ctx) -> decision_pb2.RewardResponse:
        status = await self._engine.reward(request.event_id, request.reward)
        return decision_pb2.RewardResponse(status=_STATUS[status])
