"""The asyncio client: NextbestClient's surface over grpc.aio, for channel backends that run on
an event loop. Requests, results, errors and retries are nextbest.client_shared's, as for the
blocking client; only sending and pausing differ (awaited).

    async with AsyncNextbestClient("127.0.0.1:50051") as nb:
        d = await nb.choose("app_home_banner", {"customer": {"segment": "youth"}}, customer_id="c42")
        await nb.reward(d.event_id, 1.0)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import TypeVar

import grpc

from nextbest import client_shared as calls
from nextbest.bandit.attribution import Conversion
from nextbest.bandit.spec import CampaignSpec, PlacementSpec
from nextbest.client_errors import error_from
from nextbest.client_results import (
    ActivateStatus,
    ChooseResult,
    ConversionReport,
    Explanation,
    RewardOutcome,
    RewardStatus,
    Stats,
)
from nextbest.client_shared import (
    Call,
    ClientCore,
    FeaturesLike,
    ProfileLike,
    RetryPolicy,
    RewardItem,
    auth_metadata,
    credentials_from_env,
    token_of,
)
from nextbest.config.plans import Change
from nextbest.storage.base import Erased, Profile, ProfilesPut
from nextbest.v1 import admin_pb2, decision_pb2

T = TypeVar("T")


class AsyncNextbestClient(ClientCore):
    """The asyncio client (grpc.aio): NextbestClient's methods as coroutines, with the same
    arguments, results, errors and retries. Use ``async with``, or ``await close()``. The token
    goes with each call this client makes, not with calls through the raw stubs (``.decision``,
    ``.admin``): give those ``metadata``."""

    def __init__(
        self,
        target: str,
        timeout: float = 10.0,
        channel: grpc.aio.Channel | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        *,
        retry_policy: RetryPolicy | None = None,
        wait_for_ready: bool = False,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """As NextbestClient's, but ``channel`` is a grpc.aio channel and ``sleep`` a coroutine."""
        if channel is None:
            credentials = credentials_from_env(credentials)
            channel = grpc.aio.secure_channel(target, credentials) if credentials is not None else grpc.aio.insecure_channel(target)
        super().__init__(channel, auth_metadata(token_of(token)), timeout, retry_policy, wait_for_ready, clock)
        self._sleep = sleep

    async def __aenter__(self) -> AsyncNextbestClient:
        return self

    async def __aexit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _run(self, call: Call[T], timeout: float | None, retry: bool | None, wait_for_ready: bool | None) -> T:
        method, attempts, options = self._start(call, timeout, retry, wait_for_ready)
        while True:
            try:
                answer = await method(call.request, timeout=attempts.timeout(), **options)
            except grpc.RpcError as e:
                pause = attempts.after(e)
                if pause is None:
                    raise error_from(e, call.method) from None
                await self._sleep(pause)
            else:
                return call.read(answer)

    async def choose(
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
        """As NextbestClient.choose."""
        call = calls.choose(placement, features, customer_id, event_id, baseline_arm, defer_activation, slot_features, exclude_arms)
        return await self._run(call, timeout, retry, wait_for_ready)

    async def reward(
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
        """As NextbestClient.reward."""
        return await self._run(calls.reward(event_id, reward, slot, reward_id), timeout, retry, wait_for_ready)

    async def reward_batch(
        self,
        rewards: Sequence[RewardItem],
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> list[RewardOutcome]:
        """As NextbestClient.reward_batch."""
        return await self._run(calls.reward_batch(rewards), timeout, retry, wait_for_ready)

    async def report_conversions(
        self,
        items: Iterable[Conversion | decision_pb2.Conversion],
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> list[ConversionReport]:
        """As NextbestClient.report_conversions."""
        return await self._run(calls.report_conversions(items), timeout, retry, wait_for_ready)

    async def activate(
        self, event_id: str, *, timeout: float | None = None, retry: bool | None = None, wait_for_ready: bool | None = None
    ) -> ActivateStatus:
        """As NextbestClient.activate."""
        return await self._run(calls.activate(event_id), timeout, retry, wait_for_ready)

    async def explain(
        self, event_id: str, slot: int = 0, *, timeout: float | None = None, retry: bool | None = None, wait_for_ready: bool | None = None
    ) -> Explanation:
        """As NextbestClient.explain."""
        return await self._run(calls.explain(event_id, slot), timeout, retry, wait_for_ready)

    async def apply(
        self,
        placements: Sequence[PlacementSpec | admin_pb2.Placement],
        dry_run: bool = False,
        campaigns: Sequence[CampaignSpec] = (),
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> list[Change]:
        """As NextbestClient.apply."""
        return await self._run(calls.apply(placements, dry_run, campaigns), timeout, retry, wait_for_ready)

    async def stats(
        self,
        placement: str,
        since: float | None = None,
        until: float | None = None,
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> Stats:
        """As NextbestClient.stats."""
        return await self._run(calls.get_stats(placement, since, until), timeout, retry, wait_for_ready)

    async def placement(
        self, placement: str, *, timeout: float | None = None, retry: bool | None = None, wait_for_ready: bool | None = None
    ) -> PlacementSpec:
        """As NextbestClient.placement."""
        return await self._run(calls.get_placement(placement), timeout, retry, wait_for_ready)

    async def placements(
        self, *, timeout: float | None = None, retry: bool | None = None, wait_for_ready: bool | None = None
    ) -> list[PlacementSpec]:
        """As NextbestClient.placements."""
        return await self._run(calls.list_placements(), timeout, retry, wait_for_ready)

    async def put_profiles(
        self,
        profiles: Iterable[ProfileLike],
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> ProfilesPut:
        """As NextbestClient.put_profiles."""
        return await self._run(calls.put_profiles(profiles), timeout, retry, wait_for_ready)

    async def get_profile(
        self, customer_id: str, *, timeout: float | None = None, retry: bool | None = None, wait_for_ready: bool | None = None
    ) -> Profile:
        """As NextbestClient.get_profile."""
        return await self._run(calls.get_profile(customer_id), timeout, retry, wait_for_ready)

    async def delete_profile(
        self,
        customer_id: str,
        erase_decisions: bool = False,
        *,
        timeout: float | None = None,
        retry: bool | None = None,
        wait_for_ready: bool | None = None,
    ) -> Erased:
        """As NextbestClient.delete_profile."""
        return await self._run(calls.delete_profile(customer_id, erase_decisions), timeout, retry, wait_for_ready)
