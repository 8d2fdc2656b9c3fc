"""DecisionService: Choose, Reward, Activate, Explain and ReportConversions, translated to the engine."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from nextbest.bandit.decision_log import DecisionContext
from nextbest.bandit.errors import Unavailable
from nextbest.bandit.features import Feature, feature_key
from nextbest.engine.chooser import Chooser
from nextbest.engine.conversions import ConversionDesk
from nextbest.engine.explainer import Explained, Explainer
from nextbest.engine.reward_batch import RewardBatch
from nextbest.engine.reward_policy import ActivateStatus, RewardStatus
from nextbest.engine.windows import RewardWindows
from nextbest.rpc import convert
from nextbest.rpc.convert import feature_pb
from nextbest.rpc.errors import message_of, rpc, status_for
from nextbest.telemetry.metrics import Metrics
from nextbest.v1 import decision_pb2, decision_pb2_grpc

_STATUS = {
    RewardStatus.LEARNED: decision_pb2.REWARD_STATUS_LEARNED,
    RewardStatus.DUPLICATE: decision_pb2.REWARD_STATUS_DUPLICATE,
    RewardStatus.LATE: decision_pb2.REWARD_STATUS_LATE,
    RewardStatus.RECORDED: decision_pb2.REWARD_STATUS_RECORDED,
}
_ACTIVATE = {
    ActivateStatus.ACTIVATED: decision_pb2.ACTIVATE_STATUS_ACTIVATED,
    ActivateStatus.ALREADY_ACTIVE: decision_pb2.ACTIVATE_STATUS_ALREADY_ACTIVE,
    ActivateStatus.EXPIRED: decision_pb2.ACTIVATE_STATUS_EXPIRED,
}

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class DecisionServicer(decision_pb2_grpc.DecisionServiceServicer):
    def __init__(
        self,
        chooser: Chooser,
        windows: RewardWindows,
        batch: RewardBatch,
        explainer: Explainer,
        metrics: Metrics,
        conversions: ConversionDesk | None = None,
    ) -> None:
        self._chooser = chooser
        self._windows = windows
        self._batch = batch
        self._explainer = explainer
        self._metrics = metrics
        self._conversions = conversions

    @rpc
    async def Choose(self, request: decision_pb2.ChooseRequest, context: Ctx) -> decision_pb2.ChooseResponse:
        slot_features = [convert.features(s.features, f"slot_features[{i}].features") for i, s in enumerate(request.slot_features)]
        decisions = await self._chooser.choose(
            request.placement,
            request.customer_id,
            request.event_id,
            convert.features(request.features),
            baseline_arm=request.baseline_arm,
            defer=request.defer_activation,
            slot_features=slot_features,
            exclude_arms=request.exclude_arms,
        )
        d = decisions[0]
        return decision_pb2.ChooseResponse(
            event_id=d.event_id,
            arm_id=d.arm_id or "",
            probability=d.probability,
            model_version=d.model_version,
            reason=d.reason,
            variant=d.variant,
            slots=[decision_pb2.SlotChoice(slot=x.slot, arm_id=x.arm_id or "", probability=x.probability) for x in decisions if x.arm_id],
        )

    @rpc
    async def Reward(self, request: decision_pb2.RewardRequest, context: Ctx) -> decision_pb2.RewardResponse:
        status = await self._windows.reward(request.event_id, request.reward, request.slot, request.reward_id)
        self._metrics.reward(status.value)
        return decision_pb2.RewardResponse(status=_STATUS[status])

    @rpc
    async def RewardBatch(self, request: decision_pb2.RewardBatchRequest, context: Ctx) -> decision_pb2.RewardBatchResponse:
        results = await self._batch.reward_batch([(r.event_id, r.reward, r.slot, r.reward_id) for r in request.rewards])
        out = []
        for r in results:
            if isinstance(r, RewardStatus):
                self._metrics.reward(r.value)
                out.append(decision_pb2.RewardResult(status=_STATUS[r]))
            else:
                out.append(decision_pb2.RewardResult(code=status_for(r).value[0], message=message_of(r)))
        return decision_pb2.RewardBatchResponse(results=out)

    @rpc
    async def Activate(self, request: decision_pb2.ActivateRequest, context: Ctx) -> decision_pb2.ActivateResponse:
        return decision_pb2.ActivateResponse(status=_ACTIVATE[await self._windows.activate(request.event_id)])

    @rpc
    async def Explain(self, request: decision_pb2.ExplainRequest, context: Ctx) -> decision_pb2.ExplainResponse:
        return explain_pb(await self._explainer.explain(request.event_id, request.slot))

    @rpc
    async def ReportConversions(
        self, request: decision_pb2.ReportConversionsRequest, context: Ctx
    ) -> decision_pb2.ReportConversionsResponse:
        if self._conversions is None:
            raise Unavailable("this server does not take conversions")
        items = [convert.conversion(c, f"conversions[{i}]") for i, c in enumerate(request.conversions)]
        out = []
        for r in await self._conversions.report(items):
            pb = convert.conversion_result_pb(r)
            if r.error is not None:
                pb.code, pb.message = status_for(r.error).value[0], message_of(r.error)
            out.append(pb)
        return decision_pb2.ReportConversionsResponse(results=out)


def explain_pb(x: Explained) -> decision_pb2.ExplainResponse:
    d, e, c = x.decision, x.decision.explanation, x.decision.context
    # Each logged arm's history features, by arm id (the log keeps them in the arms' order).
    history = dict(zip((a for a, _ in d.arms), c.arm_features, strict=False)) if c is not None and c.arm_features else {}
    r = decision_pb2.ExplainResponse(
        event_id=d.event_id,
        placement=d.placement,
        arm_id=d.arm_id or "",
        variant=d.variant,
        model_version=d.model_version,
        slot=d.slot,
        policy=e.policy if e is not None else "",
        exploration_parameter=e.parameter if e is not None else 0.0,
        reward_scale=e.reward_scale if e is not None else 0.0,
        no_offer_probability=x.no_offer_probability,
        probability=d.probability,
        reason=d.reason,
        scored=e is not None and e.scored,
        arms=[
            decision_pb2.ArmExplanation(
                arm_id=a.arm_id,
                eligible=a.eligible,
                reason=a.reason,
                expected_reward=a.expected_reward,
                business_value=a.business_value,
                pacing_cost=a.pacing_cost,
                fatigue_penalty=a.fatigue_penalty,
                value=a.value,
                probability=a.probability,
                history=[feature_pb(f) for f in history.get(a.arm_id, ())],
            )
            for a in x.arms
        ],
        features=[decision_pb2.ExplainedFeature(feature=feature_pb(f), source=_source(c, f, d.placement)) for f in d.features],
    )
    r.conversions.extend(convert.explained_conversion_pb(cid, c, at) for cid, c, at in x.conversions)
    r.decided_at.FromNanoseconds(int(d.timestamp * 1e9))
    if c is not None and c.profile_as_of is not None:
        r.profile_as_of.FromNanoseconds(int(c.profile_as_of * 1e9))
    return r


def _source(c: DecisionContext | None, f: Feature, placement: str) -> decision_pb2.FeatureSource.ValueType:
    if c is not None and c.source_of(feature_key(f)) == "profile":
        return decision_pb2.FEATURE_SOURCE_PROFILE
    if f == ("placement", "id", placement):  # what a grouped placement adds (engine/model_groups.py)
        return decision_pb2.FEATURE_SOURCE_PLACEMENT
    return decision_pb2.FEATURE_SOURCE_REQUEST
