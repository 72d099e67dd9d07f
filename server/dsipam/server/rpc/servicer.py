"""IpamService: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc as pb_grpc

from .. import domain
from ..security import caller_node
from ..store import Store
from ..store._watch import Bookmark
from . import convert
from .errors import abort_with
from .pipeline import current_call

_PARSE_IN_THREAD = 5_000
"""CreatePool requests with more excludes than this are parsed in a worker thread."""

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


def _node_for_caller(node: str, scope: str | None, verb: str) -> str:
    """The node a call acts on. A shim (node-scoped caller) acts for its own node: an empty node
    is its node, another node is refused (docs/security.md, "Node-scoped shims")."""
    if scope is None:
        return node
    if node and node != scope:
        raise domain.PermissionDenied(
            f"node: {node!r} is not this caller's node {scope!r}; a shim {verb} only for its own node",
            field="node",
        )
    return scope


class IpamServicer(pb_grpc.IpamServiceServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    @_guarded
    async def CreatePool(self, request: pb.CreatePoolRequest, context: grpc.aio.ServicerContext) -> pb.Pool:
        if not request.HasField("pool"):
            raise domain.InvalidArgument("pool: required", field="pool")
        excludes = sum(len(r.exclude) for r in request.pool.ranges)
        if excludes > _PARSE_IN_THREAD:  # tens of ms of parsing: not on the event loop (health, other calls)
            spec = await asyncio.to_thread(convert.pool_spec_from_pb, request.pool)
        else:
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
        scope = caller_node.get()
        node = _node_for_caller(request.node, scope, "allocates")
        info, created = await self.store.allocate(
            pool=request.pool,
            owner=request.owner,
            policy=convert.policy_from_pb(request.ip_family_policy),
            families=convert.families_from_pb(request.ip_families),
            addresses=list(request.addresses),
            attributes=dict(request.attributes),
            node=node,
            node_scope=scope,
        )
        return pb.AllocateResponse(allocation=convert.allocation_to_pb(info), created=created)

    @_guarded
    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        released = await self.store.release(
            pool=request.pool, owner=request.owner, families=convert.families_from_pb(request.ip_families),
            node_scope=caller_node.get(),
        )
        return pb.ReleaseResponse(released=[convert.address_to_pb(a) for a in released])

    @_guarded
    async def GetAllocation(self, request: pb.GetAllocationRequest, context: grpc.aio.ServicerContext) -> pb.Allocation:
        info = await self.store.get_allocation(pool=request.pool, owner=request.owner, node_scope=caller_node.get())
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
            pool=request.pool,
            size=request.page_size,
            token=request.page_token,
            selector=dict(request.attribute_selector),
            family=convert.family_from_pb(request.ip_family, "ip_family"),
        )
        response = pb.ListAllocationsResponse(next_page_token=token)
        add = response.allocations.add
        for a in items:
            convert.fill_allocation(add(), a)
        return response

    @_guarded
    async def GarbageCollect(
        self, request: pb.GarbageCollectRequest, context: grpc.aio.ServicerContext
    ) -> pb.GarbageCollectResponse:
        grace = request.grace.ToTimedelta().total_seconds() if request.HasField("grace") else DEFAULT_GC_GRACE
        scope = caller_node.get()
        released = await self.store.garbage_collect(
            pool=request.pool, valid_owners=list(request.valid_owners), grace_seconds=grace,
            node_scope=scope, node=_node_for_caller(request.node, scope, "collects"),
            selector=dict(request.attribute_selector),
        )
        return pb.GarbageCollectResponse(released=[convert.allocation_to_pb(a) for a in released])

    @_guarded
    async def UpdatePool(self, request: pb.UpdatePoolRequest, context: grpc.aio.ServicerContext) -> pb.Pool:
        paths = set(request.update_mask.paths)
        unknown = paths - {"labels", "cooldown", "node_affinity"}
        if unknown:
            raise domain.InvalidArgument(
                f"update_mask: {sorted(unknown)[0]!r} cannot be updated (labels, cooldown, node_affinity)",
                field="update_mask",
            )
        if not paths:
            raise domain.InvalidArgument(
                "update_mask: name at least one of labels, cooldown, node_affinity", field="update_mask"
            )
        info = await self.store.update_pool(
            request.pool.name,
            labels=dict(request.pool.labels) if "labels" in paths else None,
            cooldown_ms=convert.cooldown_ms_from_pb(request.pool) if "cooldown" in paths else None,
            strict_affinity=(
                convert.strict_affinity_from_pb(request.pool.node_affinity) if "node_affinity" in paths else None
            ),
        )
        return convert.pool_to_pb(info)

    @_guarded
    async def ReserveAddresses(self, request: pb.ReserveAddressesRequest, context: grpc.aio.ServicerContext) -> pb.Pool:
        info = await self.store.reserve_addresses(request.pool, list(request.addresses), request.force)
        return convert.pool_to_pb(info)

    @_guarded
    async def UnreserveAddresses(
        self, request: pb.UnreserveAddressesRequest, context: grpc.aio.ServicerContext
    ) -> pb.Pool:
        return convert.pool_to_pb(await self.store.unreserve_addresses(request.pool, list(request.addresses)))

    @_guarded
    async def AddPoolRange(self, request: pb.AddPoolRangeRequest, context: grpc.aio.ServicerContext) -> pb.Pool:
        if not request.HasField("range"):
            raise domain.InvalidArgument("range: required", field="range")
        r = request.range
        info = await self.store.add_pool_range(
            request.pool, cidr=r.cidr, first=r.first, last=r.last, gateway=r.gateway, exclude=list(r.exclude),
            block_size=r.block_size,
        )
        return convert.pool_to_pb(info)

    @_guarded
    async def RemovePoolRange(self, request: pb.RemovePoolRangeRequest, context: grpc.aio.ServicerContext) -> pb.Pool:
        return convert.pool_to_pb(await self.store.remove_pool_range(request.pool, request.cidr))

    async def MigratePool(
        self, request: pb.MigratePoolRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.MigratePoolResponse]:
        try:
            policy = convert.policy_from_pb(request.ip_family_policy)
            if request.ip_family_policy == pb.IP_FAMILY_POLICY_UNSPECIFIED:
                policy = domain.Policy.PREFER_DUAL_STACK
            async for p in self.store.migrate_pool(request.pool, policy, request.batch_size):
                yield pb.MigratePoolResponse(
                    total=p.total, processed=p.processed, upgraded=p.upgraded, failed=p.failed, errors=list(p.errors)
                )
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await abort_with(context, exc)

    async def WatchAllocations(
        self, request: pb.WatchAllocationsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchAllocationsResponse]:
        try:
            # The first message is a bookmark of where this watch starts: the request's token when
            # resuming (events after it follow), or the current position for a new watch. Events
            # come from the process's one reader of the outbox (store/_watch.py).
            call = current_call.get()
            hub = self.store.watch
            with hub.admit(call.caller if call is not None and call.caller else "anonymous"):
                async for item in hub.watch(request.pool, request.resume_token):
                    message = item.cache.get("pb")  # converted once, shared by every stream that sends it
                    if message is None:
                        if isinstance(item, Bookmark):
                            message = pb.WatchAllocationsResponse(type=pb.EVENT_TYPE_BOOKMARK, resume_token=item.token)
                        else:
                            message = convert.event_to_pb(item)
                        item.cache["pb"] = message
                    yield message
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, grpc.aio.AbortError | asyncio.CancelledError):
                raise
            await abort_with(context, exc)

    @_guarded
    async def ListBlocks(self, request: pb.ListBlocksRequest, context: grpc.aio.ServicerContext) -> pb.ListBlocksResponse:
        blocks, token = await self.store.list_blocks(request.pool, request.node, request.page_size, request.page_token)
        response = pb.ListBlocksResponse(next_page_token=token)
        add = response.blocks.add
        for b in blocks:
            convert.fill_block(add(), b)
        return response

    @_guarded
    async def ReleaseNode(self, request: pb.ReleaseNodeRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseNodeResponse:
        released, kept = await self.store.release_node(request.pool, request.node)
        return pb.ReleaseNodeResponse(
            released=[convert.block_to_pb(b) for b in released], kept=[convert.block_to_pb(b) for b in kept]
        )
