"""A small client for channel services and experimenters, wrapping the generated stubs.

    import nextbest
    from nextbest.client import NextbestClient

    with NextbestClient("127.0.0.1:50051") as nb:
        d = nb.choose("app_home_banner", {"customer": {"segment": "youth", "arpu": 12.5}}, customer_id="c42")
        try:
            nb.reward(d.event_id, 1.0, timeout=2.0)
        except nextbest.NotFound:
            ...

Every method takes ``timeout`` (seconds, for all its attempts; default the client's),
``retry`` (default: on, except for Choose; see nextbest.client_shared) and ``wait_for_ready``
(wait for the server to be reachable within the timeout instead of failing UNAVAILABLE at once).
A failed call raises the ServiceError subclass of its status code (nextbest.client_errors), which
is also the matching ``nextbest`` domain error (``nextbest.NotFound``...) and a grpc.RpcError.
AsyncNextbestClient (nextbest.client_async, grpc.aio) has the same methods, as coroutines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TypeVar

import grpc

from nextbest import client_shared as calls
from nextbest.bandit.attribution import Conversion
from nextbest.bandit.spec import CampaignSpec, PlacementSpec
from nextbest.client_async import AsyncNextbestClient
from nextbest.client_errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServiceError,
    UnauthenticatedError,
    UnavailableError,
    error_from,
)
from nextbest.client_results import (
    ActivateStatus,
    ArmExplanation,
    ArmStats,
    ChooseResult,
    ConversionReport,
    ConversionStatus,
    Explanation,
    RewardOutcome,
    RewardStatus,
    Stats,
)
from nextbest.client_shared import (
    NO_RETRY,
    Call,
    ClientCore,
    FeaturesLike,
    ProfileLike,
    RetryPolicy,
    RewardItem,
    credentials_from_env,
    spec_pb,
    to_features,
    token_of,
)
from nextbest.config.plans import Change
from nextbest.rpc.auth import BearerToken
from nextbest.storage.base import Erased, Profile, ProfilesPut
from nextbest.v1 import admin_pb2, decision_pb2

__all__ = [
    "ActivateStatus",
    "AlreadyExistsError",
    "ArmExplanation",
    "ArmStats",
    "AsyncNextbestClient",
    "ChooseResult",
    "ConversionReport",
    "ConversionStatus",
    "DeadlineExceededError",
    "Explanation",
    "FeaturesLike",
    "InternalError",
    "InvalidArgumentError",
    "NO_RETRY",
    "NextbestClient",
    "NotFoundError",
    "PermissionDeniedError",
    "ProfileLike",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RewardOutcome",
    "RewardStatus",
    "ServiceError",
    "Stats",
    "UnauthenticatedError",
    "UnavailableError",
    "spec_pb",
    "to_features",
]

T = TypeVar("T")


class NextbestClient(ClientCore):
    """Blocking client; ``timeout`` is the default deadline of every call in seconds."""

    def __init__(
        self,
        target: str,
        timeout: float = 10.0,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        *,
        retry_policy: RetryPolicy | None = None,
        wait_for_ready: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``token`` (default $NEXTBEST_TOKEN) goes with every call as a bearer token. TLS is used
        with ``credentials``, or when $NEXTBEST_CA_FILE names the CA to trust ($NEXTBEST_CERT_FILE
        and $NEXTBEST_KEY_FILE add a client certificate for mTLS). Environment, not flags: a
        token on a command line is visible to every user of the machine. ``retry_policy``: the
        backoff (default RetryPolicy(); None is the default, NO_RETRY never retries); ``sleep``
        and ``clock`` pause and time it (tests pass their own)."""
        if channel is None:
            credentials = credentials_from_env(credentials)
            channel = grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
        token = token_of(token)
        if token:  # on the channel, so that calls through the raw stubs (.admin, .decision) carry it too
            channel = grpc.intercept_channel(channel, BearerToken(token))
        super().__init__(channel, (), timeout, retry_policy, wait_for_ready, clock)
        self._sleep = sleep

    def __enter__(self) -> NextbestClient:
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _run(self, call: Call[T], timeout: float | None, retry: bool | None, wait_for_ready: bool | None) -> T:
        """Send ``call``, again after a pause while its status is retryable and time is left;
        its answer read, or the error of the last attempt raised as its ServiceError."""
        method, attempts, options = self._start(call, timeout, retry, wait_for_ready)
        while True:
            try:
                answer = method(call.request, timeout=attempts.timeout(), **options)
            except grpc.RpcError as e:
                pause = attempts.after(e)
                if pause is None:
                    raise error_from(e, call.method) from None
                self._sleep(pause)
            else:
                return call.read(answer)

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
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> ChooseResult:
        """A decision. Not retried unless ``retry=True``: an UNAVAILABLE Choose may have been
        decided and logged (nextbest.client_shared says why); pass ``event_id`` when opting in,
        so that a retry of one that landed fails ALREADY_EXISTS instead of deciding twice."""
        call = calls.choose(placement, features, customer_id, event_id, baseline_arm, defer_activation, slot_features, exclude_arms)
        return self._run(call, timeout, retry, wait_for_ready)

    def reward(
        self,
        event_id: str,
        reward: float,
        slot: int = 0,
        reward_id: str = "",
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> RewardStatus:
        """LEARNED, DUPLICATE, LATE or RECORDED (aggregated at window close); equal to its text.
        ``reward_id``: a key that makes a retry of this reward DUPLICATE, never counted twice;
        the client makes one when none is given, so its own retries are safe."""
        return self._run(calls.reward(event_id, reward, slot, reward_id), timeout, retry, wait_for_ready)

    def reward_batch(
        self,
        rewards: Sequence[RewardItem],
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> list[RewardOutcome]:
        """Many rewards in one call, as (event_id, reward[, slot[, reward_id]]); one outcome each,
        in order, with its status or, FAILED, its error (``error.retryable``: send that one again
        with its ``reward_id``). Every result is durable when this returns."""
        return self._run(calls.reward_batch(rewards), timeout, retry, wait_for_ready)

    def report_conversions(
        self,
        items: Iterable[Conversion | decision_pb2.Conversion],
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> list[ConversionReport]:
        """Conversions from billing (at most the server's max_reward_batch per call), one report
        each, in order; every one is durable when this returns. A batch with an invalid item
        raises INVALID_ARGUMENT naming it (``conversions[3].product``), and nothing is stored."""
        return self._run(calls.report_conversions(items), timeout, retry, wait_for_ready)

    def activate(
        self, event_id: str, *, timeout: float | None = None, retry: bool | None = None, wait_for_ready: bool | None = None
    ) -> ActivateStatus:
        """ACTIVATED, ALREADY_ACTIVE or EXPIRED."""
        return self._run(calls.activate(event_id), timeout, retry, wait_for_ready)

    def explain(
        self, event_id: str, slot: int = 0, *, timeout: float | None = None, retry: bool | None = None, wait_for_ready: bool | None = None
    ) -> Explanation:
        """Why a decision served what it served: every arm with its reason or its value parts
        and probability, as recorded at decision time (``.raw``: the ExplainResponse)."""
        return self._run(calls.explain(event_id, slot), timeout, retry, wait_for_ready)

    def apply(
        self,
        placements: Sequence[PlacementSpec | admin_pb2.Placement],
        dry_run: bool = False,
        campaigns: Sequence[CampaignSpec] = (),
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> list[Change]:
        """Make the server's configuration match; returns the changes (planned only if dry_run)."""
        return self._run(calls.apply(placements, dry_run, campaigns), timeout, retry, wait_for_ready)

    def stats(
        self,
        placement: str,
        since: float | None = None,
        until: float | None = None,
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> Stats:
        """A placement's statistics; its conversion figures over [since, until) in epoch seconds
        (by default the last 30 days). ``.raw``: the GetStatsResponse."""
        return self._run(calls.get_stats(placement, since, until), timeout, retry, wait_for_ready)

    def placement(
        self, placement: str, *, timeout: float | None = None, retry: bool | None = None, wait_for_ready: bool | None = None
    ) -> PlacementSpec:
        """The live placement as its spec (what ``apply`` takes: change it with ``model_copy`` and
        apply it back), retired arms included as ``active: false``; NotFoundError if none."""
        return self._run(calls.get_placement(placement), timeout, retry, wait_for_ready)

    def placements(
        self, *, timeout: float | None = None, retry: bool | None = None, wait_for_ready: bool | None = None
    ) -> list[PlacementSpec]:
        """Every live placement as its spec, by id."""
        return self._run(calls.list_placements(), timeout, retry, wait_for_ready)

    def put_profiles(
        self,
        profiles: Iterable[ProfileLike],
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> ProfilesPut:
        """Store customer profiles in one call (at most the server's max_profile_batch), all or
        nothing; returns how many were stored and how many were stale (older than the stored
        profile, by ``as_of``: they changed nothing). Each is a Profile (nextbest.storage.base) or a
        profile_pb2.Profile. A retry after one that landed counts its profiles as stale."""
        return self._run(calls.put_profiles(profiles), timeout, retry, wait_for_ready)

    def get_profile(
        self, customer_id: str, *, timeout: float | None = None, retry: bool | None = None, wait_for_ready: bool | None = None
    ) -> Profile:
        """The customer's stored profile; NotFoundError when none or expired."""
        return self._run(calls.get_profile(customer_id), timeout, retry, wait_for_ready)

    def delete_profile(
        self,
        customer_id: str,
        erase_decisions: bool = False,
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> Erased:
        """Delete the customer's profile; with ``erase_decisions`` also their contact history and
        the customer id, features and context of their logged decisions. Returns what was
        removed or blanked."""
        return self._run(calls.delete_profile(customer_id, erase_decisions), timeout, retry, wait_for_ready)
