"""ProfileService: PutProfiles, GetProfile and DeleteProfile, translated to the profile handler."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from nextbest.engine.profile_handler import ProfileHandler
from nextbest.rpc import convert
from nextbest.rpc.errors import rpc
from nextbest.v1 import profile_pb2, profile_pb2_grpc

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class ProfileServicer(profile_pb2_grpc.ProfileServiceServicer):
    def __init__(self, handler: ProfileHandler) -> None:
        self._handler = handler

    @rpc
    async def PutProfiles(self, request: profile_pb2.PutProfilesRequest, context: Ctx) -> profile_pb2.PutProfilesResponse:
        self._handler.check_batch(len(request.profiles))  # before converting an oversized batch
        now = self._handler.now()
        profiles = [convert.profile(p, now, f"profiles[{i}]") for i, p in enumerate(request.profiles)]
        put = await self._handler.put(profiles)
        return profile_pb2.PutProfilesResponse(stored=put.stored, stale=put.stale)

    @rpc
    async def GetProfile(self, request: profile_pb2.GetProfileRequest, context: Ctx) -> profile_pb2.GetProfileResponse:
        return profile_pb2.GetProfileResponse(profile=convert.profile_pb(await self._handler.get(request.customer_id)))

    @rpc
    async def DeleteProfile(self, request: profile_pb2.DeleteProfileRequest, context: Ctx) -> profile_pb2.DeleteProfileResponse:
        erased = await self._handler.delete(request.customer_id, request.erase_decisions)
        return profile_pb2.DeleteProfileResponse(
            profiles=erased.profiles, decisions=erased.decisions, contacts=erased.contacts, conversions=erased.conversions
        )
