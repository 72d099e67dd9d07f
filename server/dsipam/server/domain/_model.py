"""Domain types passed between the RPC layer and the store."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ._errors import InvalidArgument, LimitExceeded
from ._family import Family
from ._ranges import RangeSpec, build_range, check_overlaps
from ._validate import check_map, check_network, check_pool_name


@dataclass(frozen=True)
class RangeInput:
    cidr: str
    first: str = ""
    last: str = ""
    gateway: str = ""
    exclude: Sequence[str] = ()
    block_size: int = 0


@dataclass(frozen=True)
class PoolSpec:
    name: str
    ranges: tuple[RangeSpec, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    cooldown_ms: int = 30_000
    strict_affinity: bool = False
    # The address space: pools of one network never overlap; "" is the default network.
    network: str = ""

    @property
    def families(self) -> tuple[Family, ...]:
        out: list[Family] = []
        for r in self.ranges:
            if r.family not in out:
                out.append(r.family)
        return tuple(out)


MAX_COOLDOWN_MS = 24 * 3600 * 1000


def check_cooldown(ms: int, where: str = "pool.cooldown") -> int:
    if ms < 0 or ms > MAX_COOLDOWN_MS:
        raise InvalidArgument(f"{where}: {ms / 1000:g}s must be between 0 and 24h", field=where)
    return ms


# -- per-pool bounds (settings DSIPAM_MAX_EXCLUDES_PER_POOL, DSIPAM_MAX_RESERVATIONS_PER_POOL) ------
#
# Excludes and reservations cost O(n log n) to lay out (one sort) and memory in every replica's
# layout cache; these bounds keep one pool from costing every replica seconds. Checked before
# anything is parsed or written: past a bound, RESOURCE_EXHAUSTED (LimitExceeded) and nothing
# is changed.

DEFAULT_MAX_EXCLUDES_PER_POOL = 50_000
DEFAULT_MAX_RESERVATIONS_PER_POOL = 50_000


@dataclass(frozen=True)
class PoolLimits:
    max_excludes: int = DEFAULT_MAX_EXCLUDES_PER_POOL
    max_reservations: int = DEFAULT_MAX_RESERVATIONS_PER_POOL


POOL_LIMITS = PoolLimits()
"""The process's bounds; the store sets them from the settings when it is made (``set_pool_limits``)."""


def set_pool_limits(limits: PoolLimits) -> None:
    global POOL_LIMITS
    POOL_LIMITS = limits


def check_excludes_limit(count: int, where: str) -> None:
    """LimitExceeded when a pool would hold ``count`` excludes (all its ranges) past the bound."""
    limit = POOL_LIMITS.max_excludes
    if count > limit:
        raise LimitExceeded(
            f"{where}: {count} excludes in one pool is more than DSIPAM_MAX_EXCLUDES_PER_POOL ({limit}); exclude "
            "larger CIDRs, or raise the bound",
            field=where, limit="DSIPAM_MAX_EXCLUDES_PER_POOL", max=str(limit), count=str(count),
        )


def check_reservations_limit(count: int, where: str) -> None:
    """LimitExceeded when a pool would hold ``count`` reservations past the bound."""
    limit = POOL_LIMITS.max_reservations
    if count > limit:
        raise LimitExceeded(
            f"{where}: {count} reservations in one pool is more than DSIPAM_MAX_RESERVATIONS_PER_POOL ({limit}); "
            "reserve larger CIDRs, or raise the bound",
            field=where, limit="DSIPAM_MAX_RESERVATIONS_PER_POOL", max=str(limit), count=str(count),
        )


def build_pool_spec(
    name: str,
    ranges: Sequence[RangeInput],
    labels: Mapping[str, str],
    cooldown_ms: int = 30_000,
    strict_affinity: bool = False,
    network: str = "",
) -> PoolSpec:
    """Validates a pool as given by a caller; errors name fields under ``pool.``."""
    check_pool_name(name, "pool.name")
    if not ranges:
        raise InvalidArgument("pool.ranges: at least one range is required", field="pool.ranges")
    if len(ranges) > 64:
        raise InvalidArgument("pool.ranges: at most 64 ranges", field="pool.ranges")
    check_excludes_limit(sum(len(r.exclude) for r in ranges), "pool.ranges")  # before parsing any
    built = tuple(
        build_range(
            cidr=r.cidr,
            first=r.first,
            last=r.last,
            gateway=r.gateway,
            exclude=r.exclude,
            block_size=r.block_size,
            where=f"pool.ranges[{i}]",
        )
        for i, r in enumerate(ranges)
    )
    check_overlaps(built)
    return PoolSpec(
        name=name,
        ranges=built,
        labels=check_map(labels, "pool.labels"),
        cooldown_ms=check_cooldown(cooldown_ms),
        strict_affinity=strict_affinity,
        network=check_network(network),
    )


@dataclass(frozen=True)
class FamilyUsage:
    family: Family
    size: int
    allocated: int
    cooldown: int = 0
    reserved: int = 0

    @property
    def free(self) -> int:
        # A force-reserved address that is still allocated counts as both until released.
        return max(self.size - self.allocated - self.cooldown - self.reserved, 0)


DEFAULT_COOLDOWN_MS = 30_000


@dataclass(frozen=True)
class PoolInfo:
    spec: PoolSpec
    usage: tuple[FamilyUsage, ...]
    create_time: dt.datetime
    cooldown_ms: int = DEFAULT_COOLDOWN_MS
    reservations: tuple[str, ...] = ()
    strict_affinity: bool = False


# AddressInfo and AllocationInfo are made for every row of a ListAllocations page (two addresses and
# one allocation a row) and for every Allocate and GetAllocation answer. A frozen dataclass's own
# __init__ sets each field through object.__setattr__: 0.56 µs for an AddressInfo and 1.1 µs for an
# AllocationInfo (timeit, Intel Xeon). These classes write their fields into the instance's __dict__
# instead (0.28 and 0.45 µs), the same object in every other respect: eq, hash and repr are the
# dataclass's, and setting a field afterwards still raises FrozenInstanceError.
# tests/unit/test_allocation_to_pb.py checks that each __init__ takes exactly the dataclass's fields.


@dataclass(frozen=True)
class AddressInfo:
    family: Family
    ip: str
    prefix_length: int
    gateway: str

    def __init__(self, family: Family, ip: str, prefix_length: int, gateway: str) -> None:
        d = self.__dict__
        d["family"] = family
        d["ip"] = ip
        d["prefix_length"] = prefix_length
        d["gateway"] = gateway


@dataclass(frozen=True)
class AllocationInfo:
    pool: str
    owner: str
    addresses: tuple[AddressInfo, ...]
    attributes: Mapping[str, str]
    create_time: dt.datetime
    node: str = ""
    borrowed: bool = False

    def __init__(self, pool: str, owner: str, addresses: tuple[AddressInfo, ...], attributes: Mapping[str, str],
                 create_time: dt.datetime, node: str = "", borrowed: bool = False) -> None:
        d = self.__dict__
        d["pool"] = pool
        d["owner"] = owner
        d["addresses"] = addresses
        d["attributes"] = attributes
        d["create_time"] = create_time
        d["node"] = node
        d["borrowed"] = borrowed


@dataclass(frozen=True)
class BlockInfo:
    """A block as a routing controller sees it."""

    id: int
    cidr: str
    family: Family
    node: str
    used: int
    free: int
