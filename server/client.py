"""A small client for channel services and experimenters, wrapping the generated stubs.

with NextbestClient("127.0.0.1:50051") as nb:
    d = nb.choose("app_home_banner", {"customer": {"segment": "youth", "arpu": 12.5}}, customer_id="c42")
    nb.reward(d.event_id, 1.0)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from nextbest.bandit.attribution import Conversion, Credit
from nextbest.bandit.spec import CampaignSpec, PlacementSpec
from nextbest.config.plans import Change
from nextbest.rpc import convert
from nextbest.rpc.auth import BearerToken
from nextbest.storage.base import Erased, Profile, ProfilesPut
from nextbest.v1 import admin_pb2, admin_pb2_grpc, common_pb2, decision_pb2, decision_pb2_grpc, profile_pb2, profile_pb2_grpc

_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}

_REWARD_STATUS = {
    decision_pb2.REWARD_STATUS_LEARNED: "learned",
    decision_pb2.REWARD_STATUS_DUPLICATE: "duplicate",
    decision_pb2.REWARD_STATUS_LATE: "late",
    decision_pb2.REWARD_STATUS_RECORDED: "recorded",
}
_ACTIVATE_STATUS = {
    decision_pb2.ACTIVATE_STATUS_ACTIVATED: "activated",
    decision_pb2.ACTIVATE_STATUS_ALREADY_ACTIVE: "already_active",
    decision_pb2.ACTIVATE_STATUS_EXPIRED: "expired",
}

_CONVERSION_STATUS = {
    decision_pb2.CONVERSION_STATUS_ATTRIBUTED: "attributed",
    decision_pb2.CONVERSION_STATUS_UNATTRIBUTED: "unattributed",
    decision_pb2.CONVERSION_STATUS_DUPLICATE: "duplicate",
}

FeaturesLike = Mapping[str, Any] | Iterable[common_pb2.Feature]
ProfileLike = Profile | profile_pb2.Profile


@dataclass(frozen=True, slots=True)
class ChooseResult:
    event_id: str
    arm_id: str
    probability: float
    model_version: int
    reason: str
    variant: str = ""
    slots: tuple[tuple[str, float], ...] = ()  # (arm id, probability) per slot, slot 0 first


@dataclass(frozen=True, slots=True)
class ConversionReport:
    """What became of one reported conversion: "attributed" (with the decisions credited),
    "unattributed", "duplicate" (with the credits it got when first reported), or "error"
    (``error`` is "<CODE>: <message>"; send the conversion again)."""

    status: str
    credits: tuple[Credit, ...] = ()
    error: str = ""


def to_features(features: FeaturesLike | None) -> list[common_pb2.Feature]:
    """Features from ``{"customer": {"segment": "youth"}}`` (namespaced) or ``{"segment": "youth"}``."""
    if features is None:
        return []
    if not isinstance(features, Mapping):
        return list(features)
    out: list[common_pb2.Feature] = []

    def one(ns: str, name: str, value: Any) -> common_pb2.Feature:
        if isinstance(value, bool):
            return common_pb2.Feature(namespace=ns, name=name, text=str(value).lower())
        if isinstance(value, int | float):
            return common_pb2.Feature(namespace=ns, name=name, number=float(value))
        return common_pb2.Feature(namespace=ns, name=name, text=str(value))

    for key, value in features.items():
        if isinstance(value, Mapping):
            out.extend(one(key, name, v) for name, v in value.items())
        else:
            out.append(one("", key, value))
    return out


class NextbestClient:
    """Blocking client; ``timeout`` is the deadline of every call in seconds."""

    def __init__(
        self,
        target: str,
        timeout: float = 10.0,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``token`` (default $NEXTBEST_TOKEN) goes with every call as a bearer token. TLS is used
        with ``credentials``, or when $NEXTBEST_CA_FILE names the CA to trust ($NEXTBEST_CERT_FILE
        and $NEXTBEST_KEY_FILE add a client certificate for mTLS). Environment, not flags: a
        token on a command line is visible to every user of the machine."""
        if channel is None:
            if credentials is None and os.environ.get("NEXTBEST_CA_FILE"):
                from nextbest.rpc.tls import channel_credentials

                credentials = channel_credentials(
                    os.environ["NEXTBEST_CA_FILE"], os.environ.get("NEXTBEST_CERT_FILE", ""), os.environ.get("NEXTBEST_KEY_FILE", "")
                )
            channel = grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
        token = os.environ.get("NEXTBEST_TOKEN", "") if token is None else token
        if token:
            channel = grpc.intercept_channel(channel, BearerToken(token))
        self._channel = channel
        self._decision = decision_pb2_grpc.DecisionServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._profiles = profile_pb2_grpc.ProfileServiceStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> NextbestClient:
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def choose(
        self,
        placement: str,
        features: FeaturesLike | None = None,
        customer_id: str = "",
        event_id: str = "",
        baseline_arm: str = "",
        defer_activation: bool = False,
        slot_features: Sequence[FeaturesLike] = (),
        exclude_arms: Sequence[str] = (),
    ) -> ChooseResult:
        r = self._decision.Choose(
            decision_pb2.ChooseRequest(
                placement=placement,
                customer_id=customer_id,
                event_id=event_id,
                features=to_features(features),
                baseline_arm=baseline_arm,
                defer_activation=defer_activation,
                slot_features=[decision_pb2.SlotFeatures(features=to_features(f)) for f in slot_features],
                exclude_arms=list(exclude_arms),
            ),
            timeout=self.timeout,
        )
        slots = tuple((s.arm_id, s.probability) for s in r.slots)
        return ChooseResult(r.event_id, r.arm_id, r.probability, r.model_version, r.reason, r.variant, slots)

    def reward(self, event_id: str, reward: float, slot: int = 0, reward_id: str = "") -> str:
        """Returns "learned", "duplicate", "late" or "recorded" (aggregated at window close).
        ``reward_id``: a key that makes a retry of this reward a "duplicate", never counted twice."""
        r = self._decision.Reward(
            decision_pb2.RewardRequest(event_id=event_id, reward=reward, slot=slot, reward_id=reward_id), timeout=self.timeout
        )
        return _REWARD_STATUS.get(r.status, "unspecified")

    def reward_batch(self, rewards: Sequence[tuple[str, float] | tuple[str, float, int] | tuple[str, float, int, str]]) -> list[str]:
        """Many rewards in one call, as (event_id, reward[, slot[, reward_id]]); one result each, in order:
        a Reward status, or "error <CODE>: <message>" for an item that failed (retry those
        that say UNAVAILABLE). Every result is durable when this returns."""
        req = decision_pb2.RewardBatchRequest(
            rewards=[
                decision_pb2.RewardRequest(event_id=r[0], reward=r[1], slot=r[2] if len(r) > 2 else 0, reward_id=r[3] if len(r) > 3 else "")
                for r in rewards
            ]
        )
        resp = self._decision.RewardBatch(req, timeout=self.timeout)
        return [
            _REWARD_STATUS.get(x.status, "unspecified") if x.code == 0 else f"error {_CODE_NAMES.get(x.code, x.code)}: {x.message}"
            for x in resp.results
        ]

    def report_conversions(self, items: Iterable[Conversion | decision_pb2.Conversion]) -> list[ConversionReport]:
        """Conversions from billing (at most the server's max_reward_batch per call), one report
        each, in order; every one is durable when this returns. A batch with an invalid item
        raises INVALID_ARGUMENT naming it (``conversions[3].product``), and nothing is stored."""
        req = decision_pb2.ReportConversionsRequest(
            conversions=[c if isinstance(c, decision_pb2.Conversion) else convert.conversion_pb(c) for c in items]
        )
        resp = self._decision.ReportConversions(req, timeout=self.timeout)
        return [
            ConversionReport(
                _CONVERSION_STATUS.get(r.status, "error") if r.code == 0 else "error",
                tuple(convert.credit(c) for c in r.credits),
                "" if r.code == 0 else f"{_CODE_NAMES.get(r.code, r.code)}: {r.message}",
            )
            for r in resp.results
        ]

    def activate(self, event_id: str) -> str:
        """Returns "activated", "already_active" or "expired"."""
        r = self._decision.Activate(decision_pb2.ActivateRequest(event_id=event_id), timeout=self.timeout)
        return _ACTIVATE_STATUS.get(r.status, "unspecified")

    def explain(self, event_id: str, slot: int = 0) -> decision_pb2.ExplainResponse:
        """Why a decision served what it served: every arm with its reason or its value parts
        and probability, as recorded at decision time."""
        r: decision_pb2.ExplainResponse = self._decision.Explain(
            decision_pb2.ExplainRequest(event_id=event_id, slot=slot), timeout=self.timeout
        )
        return r

    def apply(
        self,
        placements: Sequence[PlacementSpec | admin_pb2.Placement],
        dry_run: bool = False,
        campaigns: Sequence[CampaignSpec] = (),
    ) -> list[Change]:
        """Make the server's configuration match; returns the changes (planned only if dry_run)."""
        msgs = [p if isinstance(p, admin_pb2.Placement) else spec_pb(p) for p in placements]
        req = admin_pb2.ApplyConfigRequest(placements=msgs, dry_run=dry_run, campaigns=[convert.campaign_pb(c) for c in campaigns])
        r = self._admin.ApplyConfig(req, timeout=self.timeout)
        return [convert.change(c) for c in r.changes]

    def stats(self, placement: str, since: float | None = None, until: float | None = None) -> admin_pb2.GetStatsResponse:
        """A placement's statistics; its conversion figures over [since, until) in epoch seconds
        (by default the last 30 days)."""
        req = admin_pb2.GetStatsRequest(placement=placement)
        if since is not None:
            req.start_time.FromNanoseconds(round(since * 1e9))
        if until is not None:
            req.end_time.FromNanoseconds(round(until * 1e9))
        r: admin_pb2.GetStatsResponse = self._admin.GetStats(req, timeout=self.timeout)
        return r

    def placement(self, placement: str) -> admin_pb2.Placement:
        r: admin_pb2.GetPlacementResponse = self._admin.GetPlacement(
            admin_pb2.GetPlacementRequest(placement=placement), timeout=self.timeout
        )
        return r.placement

    def placements(self) -> list[admin_pb2.Placement]:
        return list(self._admin.ListPlacements(admin_pb2.ListPlacementsRequest(), timeout=self.timeout).placements)

    def put_profiles(self, profiles: Iterable[ProfileLike]) -> ProfilesPut:
        """Store customer profiles in one call (at most the server's max_profile_batch), all or
        nothing; returns how many were stored and how many were stale (older than the stored
        profile, by ``as_of``: they changed nothing). Each is a Profile (nextbest.storage.base) or a
        profile_pb2.Profile."""
        msgs = [p if isinstance(p, profile_pb2.Profile) else convert.profile_pb(p) for p in profiles]
        r = self._profiles.PutProfiles(profile_pb2.PutProfilesRequest(profiles=msgs), timeout=self.timeout)
        return ProfilesPut(stored=int(r.stored), stale=int(r.stale))

    def get_profile(self, customer_id: str) -> Profile:
        """The customer's stored profile; NOT_FOUND (grpc.RpcError) when none or expired."""
        r = self._profiles.GetProfile(profile_pb2.GetProfileRequest(customer_id=customer_id), timeout=self.timeout)
        return convert.profile(r.profile, 0.0)

    def delete_profile(self, customer_id: str, erase_decisions: bool = False) -> Erased:
        """Delete the customer's profile; with ``erase_decisions`` also their contact history and
        the customer id, features and context of their logged decisions. Returns what was
        removed or blanked."""
        r = self._profiles.DeleteProfile(
            profile_pb2.DeleteProfileRequest(customer_id=customer_id, erase_decisions=erase_decisions), timeout=self.timeout
        )
        return Erased(profiles=int(r.profiles), decisions=int(r.decisions), contacts=int(r.contacts), conversions=int(r.conversions))

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return self._admin

    @property
    def decision(self) -> decision_pb2_grpc.DecisionServiceStub:
        return self._decision


def spec_pb(spec: PlacementSpec) -> admin_pb2.Placement:
    """A placement spec as its protobuf message (arm versions are the server's business)."""
    from nextbest.storage.base import PlacementRecord

    return convert.placement_pb(PlacementRecord(spec, {a.id: 0 for a in spec.arms}))
