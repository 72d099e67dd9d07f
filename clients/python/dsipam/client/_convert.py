"""Between the SDK's Python types and the dsipam.v1 protobuf messages. Nothing else."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Mapping

from dsipam.v1 import ipam_pb2 as pb
from google.protobuf import duration_pb2, timestamp_pb2

from ._errors import InvalidArgument
from ._types import (
    Address,
    AddressLike,
    AllocateResult,
    Allocation,
    Family,
    FamilyUsage,
    IPNetwork,
    NetworkLike,
    Page,
    Policy,
    Pool,
    Range,
    parse_address,
)

_FAMILY_TO_PB = {Family.IPV4: pb.IP_FAMILY_IPV4, Family.IPV6: pb.IP_FAMILY_IPV6}
_POLICY_TO_PB = {
    Policy.SINGLE_STACK: pb.IP_FAMILY_POLICY_SINGLE_STACK,
    Policy.PREFER_DUAL_STACK: pb.IP_FAMILY_POLICY_PREFER_DUAL_STACK,
    Policy.REQUIRE_DUAL_STACK: pb.IP_FAMILY_POLICY_REQUIRE_DUAL_STACK,
}

FamiliesArg = Iterable[Family | str | int] | Family | str | None
"""Families as the SDK accepts them: one, several, or None for the server's choice."""


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
    name: str, ranges: Iterable[Range | NetworkLike] | Range | NetworkLike, labels: Mapping[str, str] | None
) -> tuple[pb.CreatePoolRequest, tuple[Range, ...]]:
    if isinstance(ranges, str | ipaddress.IPv4Network | ipaddress.IPv6Network | Range):
        ranges = [ranges]
    built = tuple(_range(r, i) for i, r in enumerate(ranges))
    request = pb.CreatePoolRequest(
        pool=pb.Pool(name=name, ranges=[range_to_pb(r) for r in built], labels=dict(labels or {}))
    )
    return request, built


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
    )


def gc_request(pool: str, valid_owners: Iterable[str], grace: float | dt.timedelta | None) -> pb.GarbageCollectRequest:
    if isinstance(valid_owners, str):
        raise InvalidArgument("valid_owners: expected a collection of owners, not one string",
                              metadata={"field": "valid_owners"})
    request = pb.GarbageCollectRequest(pool=pool, valid_owners=list(valid_owners))
    if grace is not None:
        request.grace.CopyFrom(duration(grace))
    return request


def duration(seconds: float | dt.timedelta) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    if isinstance(seconds, dt.timedelta):
        d.FromTimedelta(seconds)
    else:
        if seconds < 0:
            raise InvalidArgument(f"grace: {seconds}s is negative", metadata={"field": "grace"})
        d.FromNanoseconds(int(seconds * 1e9))
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
            FamilyUsage(family_from_pb(u.family), size=u.size, allocated=u.allocated, free=u.free) for u in p.usage
        ),
        create_time=_time(p.create_time, p.HasField("create_time")),
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
    )


def allocate_result(resp: pb.AllocateResponse) -> AllocateResult:
    return AllocateResult(allocation=allocation_from_pb(resp.allocation), created=resp.created)


def pools_page(resp: pb.ListPoolsResponse) -> Page[Pool]:
    return Page(tuple(pool_from_pb(p) for p in resp.pools), resp.next_page_token)


def allocations_page(resp: pb.ListAllocationsResponse) -> Page[Allocation]:
    return Page(tuple(allocation_from_pb(a) for a in resp.allocations), resp.next_page_token)


def same_pool(pool: Pool, ranges: tuple[Range, ...], labels: Mapping[str, str] | None) -> bool:
    """Whether a stored pool is what a CreatePool asked for (block sizes aside)."""

    def key(r: Range) -> tuple[object, ...]:
        return (r.cidr, r.first, r.last, r.gateway, frozenset(r.exclude))

    return [key(r) for r in pool.ranges] == [key(r) for r in ranges] and dict(pool.labels) == dict(labels or {})
