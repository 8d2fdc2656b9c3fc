"""What the blocking and the asyncio client share: feature conversion, typed results, one
``Call`` per RPC (its request, how to read its answer, whether a retry is safe) and the retry
schedule. The clients (nextbest.client, nextbest.client_async) only send calls and sleep.

Retries: only UNAVAILABLE and RESOURCE_EXHAUSTED are retried, with exponential backoff and full
jitter (a pause drawn from [0, min(maximum, initial * multiplier**n)]), all attempts within the
call's one ``timeout``. By default every call is retried except Choose: UNAVAILABLE can come
after the server received a call (the connection broke before the answer arrived, or the server
stopped while serving it), and a client cannot tell. Sending a Choose again then makes a second
decision (another arm drawn, the contact and budget counted twice), or fails ALREADY_EXISTS when
the caller gave the event_id. Rewards are safe: the client gives each one a ``reward_id`` when the
caller does not, so a reward that landed answers DUPLICATE on the retry; conversions have their
``conversion_id``; the other calls read, or set a state (apply, activate, profiles) that a second
time leaves as it is. ``retry=True`` on a Choose opts in (a caller that dedupes by event_id).
"""

from __future__ import annotations

import math
import numbers
import os
import random
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from nextbest.bandit.attribution import Conversion
from nextbest.bandit.spec import CampaignSpec, PlacementSpec
from nextbest.client_errors import RETRYABLE, code_of, error_for
from nextbest.client_results import (
    ACTIVATE_STATUS,
    CONVERSION_STATUS,
    REWARD_STATUS,
    ActivateStatus,
    ChooseResult,
    ConversionReport,
    ConversionStatus,
    Explanation,
    RewardOutcome,
    RewardStatus,
    Stats,
    choose_result,
    explanation,
    stats,
)
from nextbest.config.plans import Change
from nextbest.rpc import convert
from nextbest.storage.base import Erased, Profile, ProfilesPut
from nextbest.v1 import admin_pb2, admin_pb2_grpc, common_pb2, decision_pb2, decision_pb2_grpc, profile_pb2, profile_pb2_grpc

T = TypeVar("T")
FeaturesLike = Mapping[str, Any] | Iterable[common_pb2.Feature]
ProfileLike = Profile | profile_pb2.Profile
RewardItem = tuple[str, float] | tuple[str, float, int] | tuple[str, float, int, str]


# -- features ---------------------------------------------------------------------------------


def to_features(features: FeaturesLike | None) -> list[common_pb2.Feature]:
    """Features from ``{"customer": {"segment": "youth"}}`` (namespaced) or ``{"segment": "youth"}``.

    A number (int, float; not a bool) is a number feature, a text a category, a bool the text
    "true"/"false" (as rules and arm features spell flags); ``None`` is left out (a missing
    feature, which ``exists`` rules see as missing). Anything else raises TypeError naming the
    key: a list or an object has no single value, and its repr would be a category nobody meant."""
    if features is None:
        return []
    if not isinstance(features, Mapping):
        out = list(features)
        for i, f in enumerate(out):
            if not isinstance(f, common_pb2.Feature):
                raise TypeError(f"features[{i}]: a {type(f).__name__}, not a Feature (give a mapping of names to values)")
        return out
    feats: list[common_pb2.Feature] = []
    for key, value in features.items():
        _check_name(key, key)
        if isinstance(value, Mapping):
            for name, v in value.items():
                _check_name(name, f"{key}.{name}")
                if isinstance(v, Mapping):
                    raise TypeError(f"feature {key}.{name}: namespaces do not nest; give a number, text or boolean")
                if (one := feature(key, name, v)) is not None:
                    feats.append(one)
        elif (one := feature("", key, value)) is not None:
            feats.append(one)
    return feats


def feature(namespace: str, name: str, value: Any) -> common_pb2.Feature | None:
    """One feature, None for a None value; TypeError (naming it) for a value of no feature type."""
    if value is None:
        return None
    if isinstance(value, bool):
        return common_pb2.Feature(namespace=namespace, name=name, text="true" if value else "false")
    if isinstance(value, numbers.Real):
        return common_pb2.Feature(namespace=namespace, name=name, number=float(value))
    if isinstance(value, str):
        return common_pb2.Feature(namespace=namespace, name=name, text=value)
    key = f"{namespace}.{name}" if namespace else name
    raise TypeError(f"feature {key}: a {type(value).__name__} is not a number, text or boolean (None leaves it out)")


def _check_name(name: object, key: object) -> None:
    if not isinstance(name, str):
        raise TypeError(f"feature {key!r}: names are texts, not {type(name).__name__}")


# -- calls ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One RPC to make: ``service`` ("decision", "admin", "profiles") and ``method`` of the stub,
    the request, how to read the answer, and whether sending it again is safe (``retry``)."""

    service: str
    method: str
    request: Any
    read: Callable[[Any], T]
    retry: bool = True


def choose(
    placement: str,
    features: FeaturesLike | None,
    customer_id: str,
    event_id: str,
    baseline_arm: str,
    defer_activation: bool,
    slot_features: Sequence[FeaturesLike],
    exclude_arms: Sequence[str],
) -> Call[ChooseResult]:
    req = decision_pb2.ChooseRequest(
        placement=placement,
        customer_id=customer_id,
        event_id=event_id,
        features=to_features(features),
        baseline_arm=baseline_arm,
        defer_activation=defer_activation,
        slot_features=[decision_pb2.SlotFeatures(features=to_features(f)) for f in slot_features],
        exclude_arms=list(exclude_arms),
    )
    return Call("decision", "Choose", req, choose_result, retry=False)


def new_reward_id() -> str:
    return uuid.uuid4().hex


def reward(event_id: str, value: float, slot: int, reward_id: str) -> Call[RewardStatus]:
    req = decision_pb2.RewardRequest(event_id=event_id, reward=value, slot=slot, reward_id=reward_id or new_reward_id())
    return Call("decision", "Reward", req, lambda r: REWARD_STATUS.get(r.status, RewardStatus.UNSPECIFIED))


def reward_batch(rewards: Sequence[RewardItem]) -> Call[list[RewardOutcome]]:
    items = [
        decision_pb2.RewardRequest(
            event_id=r[0], reward=r[1], slot=r[2] if len(r) > 2 else 0, reward_id=(r[3] if len(r) > 3 else "") or new_reward_id()
        )
        for r in rewards
    ]

    def read(resp: decision_pb2.RewardBatchResponse) -> list[RewardOutcome]:
        return [
            RewardOutcome(q.event_id, REWARD_STATUS.get(x.status, RewardStatus.UNSPECIFIED), q.reward_id)
            if x.code == 0
            else RewardOutcome(q.event_id, RewardStatus.FAILED, q.reward_id, error_for(x.code, x.message, "RewardBatch"))
            for q, x in zip(items, resp.results, strict=True)
        ]

    return Call("decision", "RewardBatch", decision_pb2.RewardBatchRequest(rewards=items), read)


def report_conversions(items: Iterable[Conversion | decision_pb2.Conversion]) -> Call[list[ConversionReport]]:
    req = decision_pb2.ReportConversionsRequest(
        conversions=[c if isinstance(c, decision_pb2.Conversion) else convert.conversion_pb(c) for c in items]
    )

    def read(resp: decision_pb2.ReportConversionsResponse) -> list[ConversionReport]:
        return [
            ConversionReport(
                CONVERSION_STATUS.get(r.status, ConversionStatus.ERROR) if r.code == 0 else ConversionStatus.ERROR,
                tuple(convert.credit(c) for c in r.credits),
                None if r.code == 0 else error_for(r.code, r.message, "ReportConversions"),
            )
            for r in resp.results
        ]

    return Call("decision", "ReportConversions", req, read)


def activate(event_id: str) -> Call[ActivateStatus]:
    req = decision_pb2.ActivateRequest(event_id=event_id)
    return Call("decision", "Activate", req, lambda r: ACTIVATE_STATUS.get(r.status, ActivateStatus.UNSPECIFIED))


def explain(event_id: str, slot: int) -> Call[Explanation]:
    return Call("decision", "Explain", decision_pb2.ExplainRequest(event_id=event_id, slot=slot), explanation)


def apply(
    placements: Sequence[PlacementSpec | admin_pb2.Placement], dry_run: bool, campaigns: Sequence[CampaignSpec]
) -> Call[list[Change]]:
    msgs = [p if isinstance(p, admin_pb2.Placement) else spec_pb(p) for p in placements]
    req = admin_pb2.ApplyConfigRequest(placements=msgs, dry_run=dry_run, campaigns=[convert.campaign_pb(c) for c in campaigns])
    return Call("admin", "ApplyConfig", req, lambda r: [convert.change(c) for c in r.changes])


def get_stats(placement: str, since: float | None, until: float | None) -> Call[Stats]:
    req = admin_pb2.GetStatsRequest(placement=placement)
    if since is not None:
        req.start_time.FromNanoseconds(round(since * 1e9))
    if until is not None:
        req.end_time.FromNanoseconds(round(until * 1e9))
    return Call("admin", "GetStats", req, stats)


def get_placement(placement: str) -> Call[PlacementSpec]:
    req = admin_pb2.GetPlacementRequest(placement=placement)
    return Call("admin", "GetPlacement", req, lambda r: convert.placement_spec(r.placement))


def list_placements() -> Call[list[PlacementSpec]]:
    def read(r: admin_pb2.ListPlacementsResponse) -> list[PlacementSpec]:
        return [convert.placement_spec(p, f"placements[{i}]") for i, p in enumerate(r.placements)]

    return Call("admin", "ListPlacements", admin_pb2.ListPlacementsRequest(), read)


def put_profiles(profiles: Iterable[ProfileLike]) -> Call[ProfilesPut]:
    msgs = [p if isinstance(p, profile_pb2.Profile) else convert.profile_pb(p) for p in profiles]
    req = profile_pb2.PutProfilesRequest(profiles=msgs)
    return Call("profiles", "PutProfiles", req, lambda r: ProfilesPut(stored=int(r.stored), stale=int(r.stale)))


def get_profile(customer_id: str) -> Call[Profile]:
    req = profile_pb2.GetProfileRequest(customer_id=customer_id)
    return Call("profiles", "GetProfile", req, lambda r: convert.profile(r.profile, 0.0))


def delete_profile(customer_id: str, erase_decisions: bool) -> Call[Erased]:
    req = profile_pb2.DeleteProfileRequest(customer_id=customer_id, erase_decisions=erase_decisions)

    def read(r: profile_pb2.DeleteProfileResponse) -> Erased:
        return Erased(profiles=int(r.profiles), decisions=int(r.decisions), contacts=int(r.contacts), conversions=int(r.conversions))

    return Call("profiles", "DeleteProfile", req, read)


def spec_pb(spec: PlacementSpec) -> admin_pb2.Placement:
    """A placement spec as its protobuf message (arm versions are the server's business)."""
    from nextbest.storage.base import PlacementRecord

    return convert.placement_pb(PlacementRecord(spec, {a.id: 0 for a in spec.arms}))


# -- retries ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` in all (the first included; 1 never retries); the pause before retry n
    (from 0) is drawn uniformly from [0, min(maximum, initial * multiplier**n)] ("full jitter":
    clients that failed together do not come back together). ``jitter`` draws from [0, 1)."""

    attempts: int = 4
    initial: float = 0.1
    maximum: float = 2.0
    multiplier: float = 2.0
    jitter: Callable[[], float] = random.random

    def pause(self, retry: int) -> float:
        return self.jitter() * min(self.maximum, self.initial * self.multiplier**retry)


NO_RETRY = RetryPolicy(attempts=1)


class Attempts:
    """The attempts of one call under ``policy`` (NO_RETRY: one) within its timeout (None: no
    deadline): ``timeout()`` for the next, ``after(error)`` the pause before another, or None
    to give up and raise."""

    def __init__(self, policy: RetryPolicy, timeout: float | None, clock: Callable[[], float]) -> None:
        self._policy, self._clock = policy, clock
        self._deadline = math.inf if timeout is None else clock() + timeout
        self.made = 0

    def timeout(self) -> float | None:
        self.made += 1
        return None if self._deadline == math.inf else max(0.0, self._deadline - self._clock())

    def after(self, error: grpc.RpcError) -> float | None:
        if self.made >= self._policy.attempts or code_of(error) not in RETRYABLE:
            return None
        pause = self._policy.pause(self.made - 1)
        if self._clock() + pause >= self._deadline:
            return None  # no time left for another attempt: the caller's timeout stands
        return pause


# -- channels ---------------------------------------------------------------------------------


def credentials_from_env(credentials: grpc.ChannelCredentials | None) -> grpc.ChannelCredentials | None:
    """``credentials``, else TLS credentials when $NEXTBEST_CA_FILE names a CA ($NEXTBEST_CERT_FILE
    and $NEXTBEST_KEY_FILE add a client certificate for mTLS), else None (plaintext)."""
    if credentials is None and os.environ.get("NEXTBEST_CA_FILE"):
        from nextbest.rpc.tls import channel_credentials

        return channel_credentials(
            os.environ["NEXTBEST_CA_FILE"], os.environ.get("NEXTBEST_CERT_FILE", ""), os.environ.get("NEXTBEST_KEY_FILE", "")
        )
    return credentials


def token_of(token: str | None) -> str:
    """The bearer token to send: ``token``, by default $NEXTBEST_TOKEN ("": none)."""
    return os.environ.get("NEXTBEST_TOKEN", "") if token is None else token


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


# -- the clients' common part -----------------------------------------------------------------


class ClientCore:
    """What both clients hold (the channel, the stubs, the defaults) and the first step of every
    call; each client adds the loop that sends it (blocking or awaited)."""

    def __init__(
        self,
        channel: Any,
        metadata: tuple[tuple[str, str], ...],
        timeout: float,
        retry_policy: RetryPolicy | None,
        wait_for_ready: bool,
        clock: Callable[[], float],
    ) -> None:
        self._channel = channel
        self._metadata = metadata
        self._decision = decision_pb2_grpc.DecisionServiceStub(channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(channel)
        self._profiles = profile_pb2_grpc.ProfileServiceStub(channel)
        self._stubs: dict[str, Any] = {"decision": self._decision, "admin": self._admin, "profiles": self._profiles}
        self.timeout = timeout
        self.retry_policy = RetryPolicy() if retry_policy is None else retry_policy
        self.wait_for_ready = wait_for_ready
        self._clock = clock

    def _start(
        self, call: Call[T], timeout: float | None, retry: bool | None, wait_for_ready: bool | None
    ) -> tuple[Any, Attempts, dict[str, Any]]:
        """The stub's method, the attempts allowed, and the options of each attempt."""
        policy = self.retry_policy if (call.retry if retry is None else retry) else NO_RETRY
        attempts = Attempts(policy, self.timeout if timeout is None else timeout, self._clock)
        ready = self.wait_for_ready if wait_for_ready is None else wait_for_ready
        return getattr(self._stubs[call.service], call.method), attempts, {"metadata": self._metadata, "wait_for_ready": ready}

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        """The raw stub (no retries; raises grpc.RpcError as grpc does)."""
        return self._admin

    @property
    def decision(self) -> decision_pb2_grpc.DecisionServiceStub:
        """The raw stub (no retries; raises grpc.RpcError as grpc does)."""
        return self._decision
