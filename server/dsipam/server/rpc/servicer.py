"""IpamService: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc as pb_grpc

from .. import domain
from ..store import Store
from . import convert
from .errors import abort_with

T = TypeVar("T")

DEFAULT_GC_GRACE = 60.0


def _guarded(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await abort_with(context, exc)
            raise AssertionError("unreachable") from exc

    return wrapper


class IpamServicer(pb_grpc.IpamServiceServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    @_guarded
    async def CreatePool(self, request: pb.CreatePoolRequest, context: grpc.aio.ServicerContext) -> pb.Pool:
        if not request.HasField("pool"):
            raise domain.InvalidArgument("pool: required", field="pool")
        spec = convert.pool_spec_from_pb(request.pool)
        return convert.pool_to_pb(await self.store.create_pool(spec))

    @_guarded
    async def GetPool(self, request: pb.GetPoolRequest, context: grpc.aio.ServicerContext) -> pb.Pool:
        return convert.pool_to_pb(await self.store.get_pool(request.name))

    @_guarded
    async def ListPools(self, request: pb.ListPoolsRequest, context: grpc.aio.ServicerContext) -> pb.ListPoolsResponse:
        pools, token = await self.store.list_pools(request.page_size, request.page_token)
        return pb.ListPoolsResponse(pools=[convert.pool_to_pb(p) for p in pools], next_page_token=token)

    @_guarded
    async def DeletePool(self, request: pb.DeletePoolRequest, context: grpc.aio.ServicerContext) -> pb.DeletePoolResponse:
        await self.store.delete_pool(request.name, request.force)
        return pb.DeletePoolResponse()

    @_guarded
    async def Allocate(self, request: pb.AllocateRequest, context: grpc.aio.ServicerContext) -> pb.AllocateResponse:
        info, created = await self.store.allocate(
            pool=request.pool,
            owner=request.owner,
            policy=convert.policy_from_pb(request.ip_family_policy),
            families=convert.families_from_pb(request.ip_families),
            addresses=list(request.addresses),
            attributes=dict(request.attributes),
        )
        return pb.AllocateResponse(allocation=convert.allocation_to_pb(info), created=created)

    @_guarded
    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        released = await self.store.release(
            pool=request.pool, owner=request.owner, families=convert.families_from_pb(request.ip_families)
        )
        return pb.ReleaseResponse(released=[convert.address_to_pb(a) for a in released])

    @_guarded
    async def GetAllocation(self, request: pb.GetAllocationRequest, context: grpc.aio.ServicerContext) -> pb.Allocation:
        info = await self.store.get_allocation(pool=request.pool, owner=request.owner)
        if info is None:
            raise domain.AllocationNotFound(
                f"owner: {request.owner!r} holds nothing in pool {request.pool!r}", field="owner"
            )
        return convert.allocation_to_pb(info)

    @_guarded
    async def ListAllocations(
        self, request: pb.ListAllocationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAllocationsResponse:
        items, token = await self.store.list_allocations(
            pool=request.pool, size=request.page_size, token=request.page_token
        )
        return pb.ListAllocationsResponse(allocations=[convert.allocation_to_pb(a) for a in items], next_page_token=token)

    @_guarded
    async def GarbageCollect(
        self, request: pb.GarbageCollectRequest, context: grpc.aio.ServicerContext
    ) -> pb.GarbageCollectResponse:
        grace = request.grace.ToTimedelta().total_seconds() if request.HasField("grace") else DEFAULT_GC_GRACE
        released = await self.store.garbage_collect(
            pool=request.pool, valid_owners=list(request.valid_owners), grace_seconds=grace
        )
        return pb.GarbageCollectResponse(released=[convert.allocation_to_pb(a) for a in released])
