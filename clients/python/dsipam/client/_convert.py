"""Between the SDK's Python types and the dsipam.v1 protobuf messages. Nothing else."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from collections.abc import Iterable, Mapping

from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from dsipam.v1 import ipam_pb2 as pb

from ._errors import InvalidArgument
from ._types import (
    DEFAULT_COOLDOWN,
    Address,
    AddressLike,
    AllocateResult,
    Allocation,
    Block,
    EventType,
    Family,
    FamilyUsage,
    IPNetwork,
    MigrationProgress,
    NetworkLike,
    NodeAffinity,
    Page,
    Policy,
    Pool,
    Range,
    ReleaseNodeResult,
    WatchEvent,
    parse_address,
    parse_network,
    parse_seconds,
)

_FAMILY_TO_PB = {Family.IPV4: pb.IP_FAMILY_IPV4, Family.IPV6: pb.IP_FAMILY_IPV6}
_POLICY_TO_PB = {
    Policy.SINGLE_STACK: pb.IP_FAMILY_POLICY_SINGLE_STACK,
    Policy.PREFER_DUAL_STACK: pb.IP_FAMILY_POLICY_PREFER_DUAL_STACK,
    Policy.REQUIRE_DUAL_STACK: pb.IP_FAMILY_POLICY_REQUIRE_DUAL_STACK,
}

_AFFINITY_TO_PB = {NodeAffinity.BORROW: pb.NODE_AFFINITY_BORROW, NodeAffinity.STRICT: pb.NODE_AFFINITY_STRICT}
_EVENT_FROM_PB = {
    pb.EVENT_TYPE_ALLOCATED: EventType.ALLOCATED,
    pb.EVENT_TYPE_RELEASED: EventType.RELEASED,
    pb.EVENT_TYPE_BOOKMARK: EventType.BOOKMARK,
}

FamiliesArg = Iterable[Family | str | int] | Family | str | None
"""Families as the SDK accepts them: one, several, or None for the server's choice."""
Seconds = float | int | dt.timedelta
"""A duration as seconds or a :class:`datetime.timedelta`."""
NetworksArg = Iterable[AddressLike | NetworkLike] | AddressLike | NetworkLike
"""Addresses or CIDRs: one, or several."""


# -- requests ----------------------------------------------------------------------------


def _range(value: Range | NetworkLike, index: int) -> Range:
    if isinstance(value, Range):
        return value
    try:
        return Range(value)
    except InvalidArgument as exc:
        where = f"ranges[{index}]"
        raise InvalidArgument(f"{where}.{exc.message}", metadata={"field": f"{where}.{exc.field}"}) from None


def range_to_pb(r: Range) -> pb.IpRange:
    return pb.IpRange(
        cidr=str(r.cidr),
        first=str(r.first) if r.first else "",
        last=str(r.last) if r.last else "",
        gateway=str(r.gateway) if r.gateway else "",
        exclude=[_network_text(x) for x in r.exclude],
        block_size=r.block_size,
    )


def _network_text(net: IPNetwork) -> str:
    return str(net.network_address) if net.num_addresses == 1 else str(net)


def create_pool(
    name: str,
    ranges: Iterable[Range | NetworkLike] | Range | NetworkLike,
    labels: Mapping[str, str] | None,
    cooldown: Seconds | None = None,
    node_affinity: NodeAffinity | str | None = None,
    network: str = "",
) -> tuple[pb.CreatePoolRequest, tuple[Range, ...]]:
    if isinstance(ranges, str | ipaddress.IPv4Network | ipaddress.IPv6Network | Range):
        ranges = [ranges]
    built = tuple(_range(r, i) for i, r in enumerate(ranges))
    if not isinstance(network, str):
        raise InvalidArgument(f"network: {network!r} is not a string", metadata={"field": "network"})
    message = pb.Pool(name=name, ranges=[range_to_pb(r) for r in built], labels=dict(labels or {}), network=network)
    if cooldown is not None:
        message.cooldown.CopyFrom(duration(cooldown, "cooldown"))
    if node_affinity is not None:
        message.node_affinity = _AFFINITY_TO_PB[NodeAffinity.parse(node_affinity)]
    return pb.CreatePoolRequest(pool=message), built


def update_pool(
    name: str,
    labels: Mapping[str, str] | None,
    cooldown: Seconds | None,
    node_affinity: NodeAffinity | str | None,
) -> pb.UpdatePoolRequest:
    message = pb.Pool(name=name)
    paths = []
    if labels is not None:
        message.labels.update(dict(labels))
        paths.append("labels")
    if cooldown is not None:
        message.cooldown.CopyFrom(duration(cooldown, "cooldown"))
        paths.append("cooldown")
    if node_affinity is not None:
        message.node_affinity = _AFFINITY_TO_PB[NodeAffinity.parse(node_affinity)]
        paths.append("node_affinity")
    if not paths:
        raise InvalidArgument("update_pool: give at least one of labels, cooldown, node_affinity",
                              metadata={"field": "update_mask"})
    return pb.UpdatePoolRequest(pool=message, update_mask=field_mask_pb2.FieldMask(paths=paths))


def networks(values: NetworksArg, where: str = "addresses") -> list[str]:
    """Addresses or CIDRs as the server's text (a single address is sent as an address)."""
    if isinstance(values, str | ipaddress.IPv4Address | ipaddress.IPv6Address | ipaddress.IPv4Network
                  | ipaddress.IPv6Network):
        values = [values]
    out = [_network_text(parse_network(v, f"{where}[{i}]", allow_address=True)) for i, v in enumerate(values)]
    if not out:
        raise InvalidArgument(f"{where}: at least one address or CIDR is required", metadata={"field": where})
    return out


def add_range(pool: str, value: Range | NetworkLike) -> pb.AddPoolRangeRequest:
    built = value if isinstance(value, Range) else _range_arg(value)
    return pb.AddPoolRangeRequest(pool=pool, range=range_to_pb(built))


def _range_arg(value: NetworkLike) -> Range:
    try:
        return Range(value)
    except InvalidArgument as exc:
        raise InvalidArgument(f"range.{exc.message}", metadata={"field": f"range.{exc.field}"}) from None


def migrate_request(pool: str, policy: Policy | str, batch_size: int) -> pb.MigratePoolRequest:
    parsed = Policy.parse(policy)
    if parsed is Policy.SINGLE_STACK:
        raise InvalidArgument("policy: a migration needs prefer or require", metadata={"field": "policy"})
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 0 <= batch_size <= 1000:
        raise InvalidArgument(f"batch_size: {batch_size!r} is not an integer from 0 to 1000",
                              metadata={"field": "batch_size"})
    return pb.MigratePoolRequest(pool=pool, ip_family_policy=_POLICY_TO_PB[parsed], batch_size=batch_size)


def families(values: FamiliesArg, where: str = "families") -> list[pb.IpFamily]:
    if values is None:
        return []
    if isinstance(values, str | int):
        values = [values]
    return [_FAMILY_TO_PB[Family.parse(v, f"{where}[{i}]")] for i, v in enumerate(values)]


def allocate(
    pool: str,
    owner: str,
    policy: Policy | str | None,
    fams: FamiliesArg,
    addresses: Iterable[AddressLike] | AddressLike,
    attributes: Mapping[str, str] | None,
    node: str | None = None,
) -> pb.AllocateRequest:
    if isinstance(addresses, str | ipaddress.IPv4Address | ipaddress.IPv6Address):
        addresses = [addresses]
    return pb.AllocateRequest(
        pool=pool,
        owner=owner,
        ip_family_policy=_POLICY_TO_PB[Policy.parse(policy)] if policy is not None else pb.IP_FAMILY_POLICY_UNSPECIFIED,
        ip_families=families(fams),
        addresses=[str(parse_address(a, f"addresses[{i}]")) for i, a in enumerate(addresses)],
        attributes=dict(attributes or {}),
        node=node or "",
    )


def list_allocations(
    pool: str, page_size: int, page_token: str, selector: Mapping[str, str] | None, family: Family | str | int | None
) -> pb.ListAllocationsRequest:
    return pb.ListAllocationsRequest(
        pool=pool,
        page_size=page_size,
        page_token=page_token,
        attribute_selector=dict(selector or {}),
        ip_family=_FAMILY_TO_PB[Family.parse(family, "family")] if family is not None else pb.IP_FAMILY_UNSPECIFIED,
    )


def gc_request(pool: str, valid_owners: Iterable[str], grace: float | dt.timedelta | None, node: str | None = None,
               selector: Mapping[str, str] | None = None) -> pb.GarbageCollectRequest:
    if isinstance(valid_owners, str):
        raise InvalidArgument("valid_owners: expected a collection of owners, not one string",
                              metadata={"field": "valid_owners"})
    request = pb.GarbageCollectRequest(pool=pool, valid_owners=list(valid_owners), node=node or "",
                                       attribute_selector=dict(selector or {}))
    if grace is not None:
        request.grace.CopyFrom(duration(grace))
    return request


def duration(seconds: Seconds, where: str = "grace") -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(parse_seconds(seconds, where))
    return d


# -- responses ---------------------------------------------------------------------------


def _time(ts: timestamp_pb2.Timestamp, present: bool) -> dt.datetime | None:
    if not present:
        return None
    return ts.ToDatetime(tzinfo=dt.UTC)


def family_from_pb(value: int) -> Family:
    for fam, number in _FAMILY_TO_PB.items():
        if number == value:
            return fam
    raise ValueError(f"unknown IpFamily {value}")


def range_from_pb(r: pb.IpRange) -> Range:
    return Range(
        r.cidr,
        first=r.first or None,
        last=r.last or None,
        gateway=r.gateway or None,
        exclude=list(r.exclude),
        block_size=r.block_size,
    )


def pool_from_pb(p: pb.Pool) -> Pool:
    return Pool(
        name=p.name,
        ranges=tuple(range_from_pb(r) for r in p.ranges),
        labels=dict(p.labels),
        usage=tuple(
            FamilyUsage(family_from_pb(u.family), size=u.size, allocated=u.allocated, free=u.free,
                        cooldown=u.cooldown, reserved=u.reserved)
            for u in p.usage
        ),
        create_time=_time(p.create_time, p.HasField("create_time")),
        cooldown=p.cooldown.ToTimedelta() if p.HasField("cooldown") else DEFAULT_COOLDOWN,
        reservations=tuple(parse_network(r, "reservations", allow_address=True) for r in p.reservations),
        node_affinity=NodeAffinity.STRICT if p.node_affinity == pb.NODE_AFFINITY_STRICT else NodeAffinity.BORROW,
        network=p.network,
    )


def address_from_pb(a: pb.Address) -> Address:
    return Address(
        family=family_from_pb(a.family),
        ip=ipaddress.ip_address(a.ip),
        prefix_length=a.prefix_length,
        gateway=ipaddress.ip_address(a.gateway) if a.gateway else None,
    )


def allocation_from_pb(a: pb.Allocation) -> Allocation:
    return Allocation(
        pool=a.pool,
        owner=a.owner,
        addresses=tuple(address_from_pb(x) for x in a.addresses),
        attributes=dict(a.attributes),
        create_time=_time(a.create_time, a.HasField("create_time")),
        node=a.node or None,
        borrowed=a.borrowed,
    )


def allocate_result(resp: pb.AllocateResponse) -> AllocateResult:
    return AllocateResult(allocation=allocation_from_pb(resp.allocation), created=resp.created)


def pools_page(resp: pb.ListPoolsResponse) -> Page[Pool]:
    return Page(tuple(pool_from_pb(p) for p in resp.pools), resp.next_page_token)


def allocations_page(resp: pb.ListAllocationsResponse) -> Page[Allocation]:
    return Page(tuple(allocation_from_pb(a) for a in resp.allocations), resp.next_page_token)


def block_from_pb(b: pb.Block) -> Block:
    return Block(cidr=ipaddress.ip_network(b.cidr), family=family_from_pb(b.family), node=b.node or None,
                 used=b.used, free=b.free)


def blocks_page(resp: pb.ListBlocksResponse) -> Page[Block]:
    return Page(tuple(block_from_pb(b) for b in resp.blocks), resp.next_page_token)


def release_node_result(resp: pb.ReleaseNodeResponse) -> ReleaseNodeResult:
    return ReleaseNodeResult(released=tuple(block_from_pb(b) for b in resp.released),
                             kept=tuple(block_from_pb(b) for b in resp.kept))


def progress_from_pb(m: pb.MigratePoolResponse) -> MigrationProgress:
    return MigrationProgress(total=m.total, processed=m.processed, upgraded=m.upgraded, failed=m.failed,
                             errors=tuple(m.errors))


def event_from_pb(m: pb.WatchAllocationsResponse) -> WatchEvent | None:
    """The event, or None for an event type this SDK does not know (from a newer server)."""
    kind = _EVENT_FROM_PB.get(m.type)
    if kind is None:
        return None
    return WatchEvent(
        type=kind,
        owner=m.owner,
        addresses=tuple(address_from_pb(a) for a in m.addresses),
        time=_time(m.time, m.HasField("time")),
        resume_token=m.resume_token,
    )


def watch_event(message: pb.WatchAllocationsResponse, requested: str, first: bool) -> WatchEvent | None:
    """The event of a watch message (None for an unknown type). The first bookmark of a watch that
    resumes from a token carries that token: the server's first bookmark can be ahead of the events
    that follow it, and resuming from it after a break right there would skip them."""
    event = event_from_pb(message)
    if event is not None and first and requested and event.is_bookmark:
        event = dataclasses.replace(event, resume_token=requested)
    return event


def _range_key(r: Range) -> tuple[object, ...]:
    return (r.cidr, r.first, r.last, r.gateway, frozenset(r.exclude))


def has_range(pool: Pool, request: pb.AddPoolRangeRequest) -> bool:
    """Whether a pool holds the range an AddPoolRange asked for (block size aside)."""
    return _range_key(range_from_pb(request.range)) in {_range_key(r) for r in pool.ranges}


def holds_none_of(pool: Pool, addresses: Iterable[str]) -> bool:
    """Whether none of these reservations (as sent) is in the pool's reservations."""
    return not {parse_network(a, "addresses", allow_address=True) for a in addresses} & set(pool.reservations)


def same_pool(pool: Pool, request: pb.CreatePoolRequest, ranges: tuple[Range, ...]) -> bool:
    """Whether a stored pool is what a CreatePool asked for (block sizes aside)."""

    key = _range_key
    wanted = request.pool
    cooldown = wanted.cooldown.ToTimedelta() if wanted.HasField("cooldown") else DEFAULT_COOLDOWN
    affinity = NodeAffinity.STRICT if wanted.node_affinity == pb.NODE_AFFINITY_STRICT else NodeAffinity.BORROW
    return (
        [key(r) for r in pool.ranges] == [key(r) for r in ranges]
        and dict(pool.labels) == dict(wanted.labels)
        and pool.cooldown == cooldown
        and pool.node_affinity is affinity
        and pool.network == wanted.network
    )
