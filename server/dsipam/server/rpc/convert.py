"""Conversion between protobuf messages and domain types. Nothing else."""

from __future__ import annotations

import datetime as dt
import weakref

from google.protobuf import timestamp_pb2

from dsipam.v1 import ipam_pb2 as pb

from .. import domain
from ..domain import Family, Policy

UINT64_MAX = 2**64 - 1  # usage counters saturate: an IPv6 /48 holds 2**80 addresses

_FAMILY_FROM_PB = {pb.IP_FAMILY_IPV4: Family.IPV4, pb.IP_FAMILY_IPV6: Family.IPV6}
_FAMILY_TO_PB = {v: k for k, v in _FAMILY_FROM_PB.items()}
_POLICY_FROM_PB = {
    pb.IP_FAMILY_POLICY_UNSPECIFIED: Policy.SINGLE_STACK,
    pb.IP_FAMILY_POLICY_SINGLE_STACK: Policy.SINGLE_STACK,
    pb.IP_FAMILY_POLICY_PREFER_DUAL_STACK: Policy.PREFER_DUAL_STACK,
    pb.IP_FAMILY_POLICY_REQUIRE_DUAL_STACK: Policy.REQUIRE_DUAL_STACK,
}


def families_from_pb(values, where: str = "ip_families") -> list[Family]:  # type: ignore[no-untyped-def]
    out = []
    for i, value in enumerate(values):
        fam = _FAMILY_FROM_PB.get(value)
        if fam is None:
            raise domain.InvalidArgument(
                f"{where}[{i}]: {value} is not IP_FAMILY_IPV4 or IP_FAMILY_IPV6", field=f"{where}[{i}]"
            )
        out.append(fam)
    return out


def policy_from_pb(value: int) -> Policy:
    policy = _POLICY_FROM_PB.get(value)
    if policy is None:
        raise domain.InvalidArgument(f"ip_family_policy: {value} is not a known policy", field="ip_family_policy")
    return policy


def pool_spec_from_pb(pool: pb.Pool) -> domain.PoolSpec:
    ranges = [
        domain.RangeInput(
            cidr=r.cidr,
            first=r.first,
            last=r.last,
            gateway=r.gateway,
            exclude=tuple(r.exclude),
            block_size=r.block_size,
        )
        for r in pool.ranges
    ]
    return domain.build_pool_spec(
        pool.name, ranges, dict(pool.labels), cooldown_ms_from_pb(pool), strict_affinity_from_pb(pool.node_affinity),
        network=pool.network,
    )


def strict_affinity_from_pb(value: int) -> bool:
    if value not in (pb.NODE_AFFINITY_UNSPECIFIED, pb.NODE_AFFINITY_BORROW, pb.NODE_AFFINITY_STRICT):
        raise domain.InvalidArgument(f"pool.node_affinity: {value} is not BORROW or STRICT", field="pool.node_affinity")
    return value == pb.NODE_AFFINITY_STRICT


def cooldown_ms_from_pb(pool: pb.Pool) -> int:
    if not pool.HasField("cooldown"):
        return domain.DEFAULT_COOLDOWN_MS
    ms = pool.cooldown.seconds * 1000 + pool.cooldown.nanos // 1_000_000
    return domain.check_cooldown(ms)


def family_from_pb(value: int, where: str) -> Family | None:
    """An optional family filter: UNSPECIFIED means none."""
    if value == pb.IP_FAMILY_UNSPECIFIED:
        return None
    fam = _FAMILY_FROM_PB.get(value)
    if fam is None:
        raise domain.InvalidArgument(f"{where}: {value} is not IP_FAMILY_IPV4 or IP_FAMILY_IPV6", field=where)
    return fam


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_NAIVE = _EPOCH.replace(tzinfo=None)


def _timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    """Timestamp.FromDatetime's result (a naive value is UTC), by timedelta arithmetic in C:
    FromDatetime goes through ``calendar.timegm``, which shows in every Allocate's profile."""
    delta = value - (_EPOCH if value.tzinfo is not None else _EPOCH_NAIVE)
    return timestamp_pb2.Timestamp(seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000)


# The part of a Pool message that comes from its spec alone (name, ranges, labels, network), built
# once per spec object and copied into each answer: the store hands out one PoolSpec per cached
# layout (StoredPool.spec), so GetPool of an unchanged pool converts no range again (the ranges'
# text forms cost ~0.15 ms a call; docs/performance.md, "Cost per call"). Keyed by id(spec); the
# entry is removed when the spec is freed (weakref.finalize), so it never outlives its layout nor
# keeps it alive, and a reused id never finds a dead spec's part. PoolSpec holds a dict (labels),
# so it is not hashable and a WeakKeyDictionary cannot hold it.
_SPEC_PARTS: dict[int, pb.Pool] = {}


def _spec_part(spec: domain.PoolSpec) -> pb.Pool:
    part = _SPEC_PARTS.get(id(spec))
    if part is not None:
        return part
    part = pb.Pool(
        name=spec.name,
        ranges=[
            pb.IpRange(
                cidr=r.cidr,
                first=r.first_text(),
                last=r.last_text(),
                gateway=str(r.gateway) if r.gateway else "",
                exclude=[str(x) for x in r.exclude],
                block_size=r.block_size,
            )
            for r in spec.ranges
        ],
        labels=dict(spec.labels),
        network=spec.network,
    )
    key = id(spec)
    _SPEC_PARTS[key] = part
    weakref.finalize(spec, _SPEC_PARTS.pop, key, None).atexit = False
    return part


def pool_to_pb(info: domain.PoolInfo) -> pb.Pool:
    out = pb.Pool()
    out.CopyFrom(_spec_part(info.spec))
    usage = out.usage
    for u in info.usage:
        usage.add(
            family=_FAMILY_TO_PB[u.family],
            size=min(u.size, UINT64_MAX),
            allocated=min(u.allocated, UINT64_MAX),
            free=min(u.free, UINT64_MAX),
            cooldown=min(u.cooldown, UINT64_MAX),
            reserved=min(u.reserved, UINT64_MAX),
        )
    out.create_time.CopyFrom(_timestamp(info.create_time))
    out.cooldown.SetInParent()  # present when zero, as before
    out.cooldown.seconds, out.cooldown.nanos = info.cooldown_ms // 1000, (info.cooldown_ms % 1000) * 1_000_000
    out.reservations.extend(info.reservations)
    out.node_affinity = pb.NODE_AFFINITY_STRICT if info.strict_affinity else pb.NODE_AFFINITY_BORROW
    return out


def address_to_pb(a: domain.AddressInfo) -> pb.Address:
    return pb.Address(family=_FAMILY_TO_PB[a.family], ip=a.ip, prefix_length=a.prefix_length, gateway=a.gateway)


def allocation_to_pb(a: domain.AllocationInfo) -> pb.Allocation:
    return fill_allocation(pb.Allocation(), a)


def fill_allocation(m: pb.Allocation, a: domain.AllocationInfo) -> pb.Allocation:
    """Writes ``a`` into the empty message ``m`` in place (a repeated field's ``add()``: no copy of a
    finished message into the response). Runs for every row of a ListAllocations page: fields are set
    on the message rather than built as sub-messages and copied in (half the time per row)."""
    m.pool = a.pool
    m.owner = a.owner
    if a.node:
        m.node = a.node
    if a.borrowed:
        m.borrowed = True
    # An empty sub-message added and then set field by field, and a map filled key by key: each a
    # third to a half cheaper than add() with keywords and map.update() (timeit, upb).
    add = m.addresses.add
    for x in a.addresses:
        out = add()
        out.family = _FAMILY_TO_PB[x.family]
        out.ip = x.ip
        out.prefix_length = x.prefix_length
        if x.gateway:
            out.gateway = x.gateway
    if a.attributes:
        attributes = m.attributes
        for k, v in a.attributes.items():
            attributes[k] = v
    value = a.create_time
    delta = value - (_EPOCH if value.tzinfo is not None else _EPOCH_NAIVE)
    t = m.create_time
    t.seconds = delta.days * 86400 + delta.seconds
    t.nanos = delta.microseconds * 1000
    return m


def block_to_pb(b: domain.BlockInfo) -> pb.Block:
    return pb.Block(cidr=b.cidr, family=_FAMILY_TO_PB[b.family], node=b.node, used=b.used, free=b.free)


def fill_block(m: pb.Block, b: domain.BlockInfo) -> pb.Block:
    """block_to_pb into the empty message ``m`` (a ListBlocks page's ``add()``: no copy)."""
    m.cidr = b.cidr
    m.family = _FAMILY_TO_PB[b.family]
    if b.node:
        m.node = b.node
    m.used = b.used
    m.free = b.free
    return m


def event_to_pb(e) -> pb.WatchAllocationsResponse:  # type: ignore[no-untyped-def]
    return pb.WatchAllocationsResponse(
        type=e.type,
        owner=e.owner,
        addresses=[address_to_pb(a) for a in e.addresses],
        time=_timestamp(e.time),
        resume_token=e.token,
    )
