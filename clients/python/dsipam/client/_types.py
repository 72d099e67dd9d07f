"""Plain Python types for the SDK's arguments and results.

Arguments accept strings or :mod:`ipaddress` objects; results always hold
:mod:`ipaddress` objects, enums and timezone-aware datetimes.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeAlias, TypeVar

from ._errors import InvalidArgument

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
"""An IPv4 or IPv6 address."""
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
"""An IPv4 or IPv6 network."""
AddressLike: TypeAlias = str | ipaddress.IPv4Address | ipaddress.IPv6Address
"""An address as text (``"198.18.0.7"``) or as an :mod:`ipaddress` object."""
NetworkLike: TypeAlias = str | ipaddress.IPv4Network | ipaddress.IPv6Network
"""A CIDR as text (``"198.18.0.0/24"``) or as an :mod:`ipaddress` object."""


class Family(enum.StrEnum):
    """An IP family. The value is the spelling used by the CLI and in JSON."""

    IPV4 = "ipv4"
    IPV6 = "ipv6"

    @property
    def label(self) -> str:
        """``"IPv4"`` or ``"IPv6"``."""
        return "IPv4" if self is Family.IPV4 else "IPv6"

    @property
    def version(self) -> int:
        """4 or 6."""
        return 4 if self is Family.IPV4 else 6

    @classmethod
    def parse(cls, value: Family | str | int, where: str = "family") -> Family:
        """Accepts a :class:`Family`, ``"ipv4"``/``"IPv6"``/``"4"``/``"v6"``, or 4/6."""
        if isinstance(value, Family):
            return value
        text = str(value).strip().lower().removeprefix("ip_family_").removeprefix("ip").removeprefix("v")
        if text == "4":
            return Family.IPV4
        if text == "6":
            return Family.IPV6
        raise InvalidArgument(f"{where}: {value!r} is not ipv4 or ipv6", metadata={"field": where})

    @classmethod
    def of(cls, value: IPAddress | IPNetwork) -> Family:
        """The family of an address or network."""
        return Family.IPV4 if value.version == 4 else Family.IPV6


_POLICY_SPELLINGS = {
    "single": "SingleStack",
    "singlestack": "SingleStack",
    "prefer": "PreferDualStack",
    "preferdualstack": "PreferDualStack",
    "require": "RequireDualStack",
    "requiredualstack": "RequireDualStack",
}


class Policy(enum.StrEnum):
    """Which families an allocation gets, as Kubernetes' ``Service.spec.ipFamilyPolicy``.

    ``SINGLE_STACK``: one address, of the first family asked for (or the pool's first).
    ``PREFER_DUAL_STACK``: one of each family the pool has, as many as are free.
    ``REQUIRE_DUAL_STACK``: one of each of two families, or nothing (an atomic pair).
    """

    SINGLE_STACK = "SingleStack"
    PREFER_DUAL_STACK = "PreferDualStack"
    REQUIRE_DUAL_STACK = "RequireDualStack"

    @property
    def short(self) -> str:
        """``"single"``, ``"prefer"`` or ``"require"`` (the CLI's spelling)."""
        return {"SingleStack": "single", "PreferDualStack": "prefer", "RequireDualStack": "require"}[self.value]

    @classmethod
    def parse(cls, value: Policy | str, where: str = "policy") -> Policy:
        """Accepts a :class:`Policy`, ``"require"``, ``"RequireDualStack"``, ``"require-dual-stack"``, ..."""
        if isinstance(value, Policy):
            return value
        key = str(value).strip().lower().replace("-", "").replace("_", "").removeprefix("ipfamilypolicy")
        spelled = _POLICY_SPELLINGS.get(key)
        if spelled is None:
            raise InvalidArgument(
                f"{where}: {value!r} is not single, prefer or require", metadata={"field": where}
            )
        return Policy(spelled)


class NodeAffinity(enum.StrEnum):
    """How allocations that name a node use blocks (a pool setting).

    ``BORROW`` (the default): when no free block is left for the node, take a free address
    from another node's block and mark the allocation ``borrowed``.
    ``STRICT``: a node never takes from another node's block; the pool is exhausted for it instead.
    """

    BORROW = "borrow"
    STRICT = "strict"

    @classmethod
    def parse(cls, value: NodeAffinity | str, where: str = "node_affinity") -> NodeAffinity:
        """Accepts a :class:`NodeAffinity`, ``"borrow"``/``"strict"`` or ``"NODE_AFFINITY_STRICT"``."""
        if isinstance(value, NodeAffinity):
            return value
        key = str(value).strip().lower().removeprefix("node_affinity_")
        try:
            return NodeAffinity(key)
        except ValueError:
            raise InvalidArgument(f"{where}: {value!r} is not borrow or strict", metadata={"field": where}) from None


class EventType(enum.StrEnum):
    """The kind of a :class:`WatchEvent`."""

    ALLOCATED = "allocated"
    """Addresses were allocated to the owner."""
    RELEASED = "released"
    """Addresses were released by the owner (Release, GarbageCollect)."""
    BOOKMARK = "bookmark"
    """No change: carries the current resume token (the first message of every watch, and
    every 30 s on an idle watch)."""


def parse_address(value: AddressLike, where: str) -> IPAddress:
    """Parses an address; errors name ``where``."""
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        _refuse_zone(value, where)
        return value
    _refuse_zone(value, where)
    try:
        return ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise InvalidArgument(f"{where}: {value!r} is not an IP address", metadata={"field": where}) from None


def _refuse_zone(value: object, where: str) -> None:
    """The server refuses IPv6 zone IDs (``fe80::1%eth0``) in every address and CIDR: so does the SDK."""
    if "%" in str(value):
        raise InvalidArgument(f"{where}: {str(value)[:80]!r}: zone IDs are not allowed", metadata={"field": where})


def parse_seconds(value: float | int | dt.timedelta, where: str) -> dt.timedelta:
    """A non-negative duration given as seconds or a :class:`datetime.timedelta`."""
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise InvalidArgument(f"{where}: {value!r} is not a number of seconds or a timedelta",
                              metadata={"field": where})
    if not seconds >= 0 or seconds == float("inf"):  # also refuses NaN
        raise InvalidArgument(f"{where}: {value!r} is not a non-negative number of seconds", metadata={"field": where})
    return value if isinstance(value, dt.timedelta) else dt.timedelta(seconds=seconds)


def parse_network(value: NetworkLike | IPAddress, where: str, *, allow_address: bool = False) -> IPNetwork:
    """Parses a CIDR (host bits must be zero); with ``allow_address`` an address is a /32 or /128."""
    _refuse_zone(value, where)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        if allow_address:
            return ipaddress.ip_network(value)
        raise InvalidArgument(f"{where}: {value} is an address, not a CIDR", metadata={"field": where})
    text = str(value).strip()
    if "/" not in text and not allow_address:
        raise InvalidArgument(
            f"{where}: {value!r} is not a CIDR (expected address/prefix)", metadata={"field": where}
        )
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: {value!r} is not a valid CIDR ({exc})", metadata={"field": where}) from None


@dataclass(frozen=True, init=False)
class Range:
    """One range of a pool: a CIDR, optionally narrowed to ``first``..``last``, with a gateway
    and exclusions that are never handed out.

    >>> Range("198.18.0.0/24", gateway="198.18.0.1", exclude=["198.18.0.128/25"])

    Attributes:
        cidr: the network; its family is the range's family.
        first: the first address handed out, or None for the first usable one.
        last: the last address handed out, or None for the last usable one.
        gateway: the gateway reported with each address (never handed out), or None.
        exclude: networks never handed out (an address is a /32 or /128).
        block_size: addresses per block, a power of two; 0 means the server's default (64).
    """

    cidr: IPNetwork
    first: IPAddress | None
    last: IPAddress | None
    gateway: IPAddress | None
    exclude: tuple[IPNetwork, ...]
    block_size: int

    def __init__(
        self,
        cidr: NetworkLike,
        *,
        first: AddressLike | None = None,
        last: AddressLike | None = None,
        gateway: AddressLike | None = None,
        exclude: Iterable[AddressLike | NetworkLike] = (),
        block_size: int = 0,
    ) -> None:
        if isinstance(exclude, str):
            exclude = [exclude]
        object.__setattr__(self, "cidr", parse_network(cidr, "cidr"))
        object.__setattr__(self, "first", parse_address(first, "first") if first else None)
        object.__setattr__(self, "last", parse_address(last, "last") if last else None)
        object.__setattr__(self, "gateway", parse_address(gateway, "gateway") if gateway else None)
        object.__setattr__(
            self,
            "exclude",
            tuple(parse_network(x, f"exclude[{i}]", allow_address=True) for i, x in enumerate(exclude)),
        )
        if not isinstance(block_size, int) or block_size < 0:
            raise InvalidArgument(f"block_size: {block_size!r} is not a non-negative integer",
                                  metadata={"field": "block_size"})
        object.__setattr__(self, "block_size", block_size)

    @property
    def family(self) -> Family:
        """The range's family."""
        return Family.of(self.cidr)

    def __str__(self) -> str:
        return str(self.cidr)


@dataclass(frozen=True)
class FamilyUsage:
    """How much of one family of a pool is in use.

    Attributes:
        family: the family.
        size: the addresses that can be handed out (network, broadcast, gateway and excluded
            addresses are not counted).
        allocated: addresses held by owners.
        free: addresses that can be handed out now: ``size - allocated - cooldown - reserved``.
        cooldown: released addresses waiting for the pool's cooldown to pass.
        reserved: addresses reserved with ``reserve_addresses`` (and not allocated).

    The server's counters saturate at 2^64-1 (an IPv6 /48 holds 2^80 addresses).
    """

    family: Family
    size: int
    allocated: int
    free: int
    cooldown: int = 0
    reserved: int = 0

    @property
    def utilisation(self) -> float:
        """``allocated / size``, from 0.0 to 1.0 (0.0 for an empty range)."""
        return self.allocated / self.size if self.size else 0.0


DEFAULT_COOLDOWN = dt.timedelta(seconds=30)
"""The server's cooldown for a pool created without one."""


@dataclass(frozen=True)
class Pool:
    """A pool: named ranges of one or two families, with labels, settings and usage.

    Attributes:
        name: a lowercase DNS label.
        ranges: the ranges, in order (the first range's family is the default primary).
        labels: free-form key/value labels.
        usage: the usage of each family (see :meth:`usage_of`).
        create_time: when the pool was created (UTC).
        cooldown: how long a released address waits before it is handed out again.
        reservations: the networks reserved with ``reserve_addresses`` (an address is a /32 or /128).
        node_affinity: how allocations that name a node use blocks.
        network: the address space the pool lives in ("" is the default network). Pools of one
            network never overlap; set at creation, it cannot be changed.
    """

    name: str
    ranges: tuple[Range, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    usage: tuple[FamilyUsage, ...] = ()
    create_time: dt.datetime | None = None
    cooldown: dt.timedelta = DEFAULT_COOLDOWN
    reservations: tuple[IPNetwork, ...] = ()
    node_affinity: NodeAffinity = NodeAffinity.BORROW
    network: str = ""

    @property
    def families(self) -> tuple[Family, ...]:
        """The pool's families in range order (the first is the default primary)."""
        out: list[Family] = []
        for r in self.ranges:
            if r.family not in out:
                out.append(r.family)
        return tuple(out)

    def usage_of(self, family: Family | str | int) -> FamilyUsage | None:
        """The usage of one family, or None when the pool has no range of it."""
        fam = Family.parse(family)
        return next((u for u in self.usage if u.family is fam), None)


@dataclass(frozen=True)
class Address:
    """One address held by an owner, with the prefix length and gateway of its range."""

    family: Family
    ip: IPAddress
    prefix_length: int
    gateway: IPAddress | None = None

    @property
    def interface(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        """The address with its prefix, such as ``198.18.0.2/24``."""
        return ipaddress.ip_interface(f"{self.ip}/{self.prefix_length}")

    def __str__(self) -> str:
        return str(self.interface)


@dataclass(frozen=True)
class Allocation:
    """What one owner holds in one pool: at most one address per family, primary first.

    Attributes:
        node: the node named when the owner allocated, or None.
        borrowed: True when an address came from another node's block (the pool's
            ``node_affinity`` is ``borrow`` and the node had no free block).
    """

    pool: str
    owner: str
    addresses: tuple[Address, ...]
    attributes: Mapping[str, str] = field(default_factory=dict)
    create_time: dt.datetime | None = None
    node: str | None = None
    borrowed: bool = False

    def address(self, family: Family | str | int) -> Address | None:
        """The address of one family, or None."""
        fam = Family.parse(family)
        return next((a for a in self.addresses if a.family is fam), None)

    @property
    def ipv4(self) -> Address | None:
        """The IPv4 address, or None."""
        return self.address(Family.IPV4)

    @property
    def ipv6(self) -> Address | None:
        """The IPv6 address, or None."""
        return self.address(Family.IPV6)

    @property
    def primary(self) -> Address | None:
        """The first address (of the first family asked for), or None."""
        return self.addresses[0] if self.addresses else None


@dataclass(frozen=True)
class AllocateResult:
    """The result of :meth:`IpamClient.allocate`.

    Attributes:
        allocation: what the owner holds now.
        created: False when the owner already held every address asked for (a repeated call).
    """

    allocation: Allocation
    created: bool


@dataclass(frozen=True)
class Block:
    """One block of a pool's range: what a routing controller programs one route for.

    Attributes:
        cidr: the block's network, such as ``198.18.0.64/26`` or ``fd00::40/122``.
        family: its family.
        node: the node the block is affine to, or None.
        used: allocated addresses, including ones in cooldown.
        free: addresses that can be handed out.
    """

    cidr: IPNetwork
    family: Family
    node: str | None
    used: int
    free: int


@dataclass(frozen=True)
class ReleaseNodeResult:
    """The result of ``release_node``.

    Attributes:
        released: the node's empty blocks, free for any node again (their ``node`` is None).
        kept: the node's blocks that still hold allocations; they stay the node's.
    """

    released: tuple[Block, ...]
    kept: tuple[Block, ...]


@dataclass(frozen=True)
class MigrationProgress:
    """One progress report of ``migrate_pool`` (sent after each batch of owners).

    Attributes:
        total: owners in the pool when the migration started.
        processed: owners looked at so far.
        upgraded: owners that gained an address.
        failed: owners that could not get what the policy asks (a family is full, say).
        errors: the first errors, as ``"owner: message"``.
    """

    total: int
    processed: int
    upgraded: int
    failed: int
    errors: tuple[str, ...] = ()

    @property
    def fraction(self) -> float:
        """``processed / total``, from 0.0 to 1.0 (1.0 for an empty pool; owners added during the
        migration can make ``processed`` exceed ``total``, which counts as 1.0)."""
        return min(self.processed / self.total, 1.0) if self.total else 1.0


@dataclass(frozen=True)
class WatchEvent:
    """One message of a watch: an allocation, a release, or a bookmark.

    Attributes:
        type: :attr:`EventType.ALLOCATED`, :attr:`EventType.RELEASED` or :attr:`EventType.BOOKMARK`.
        owner: the owner (empty for a bookmark).
        addresses: the addresses allocated or released by this event (empty for a bookmark).
        time: when the change committed (None for a bookmark).
        resume_token: pass it back to resume right after this message.
    """

    type: EventType
    owner: str
    addresses: tuple[Address, ...]
    time: dt.datetime | None
    resume_token: str

    @property
    def is_bookmark(self) -> bool:
        """True for a bookmark (no change)."""
        return self.type is EventType.BOOKMARK


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing. Iterate it for the items; pass ``next_page_token`` to get the
    next page (empty on the last page)."""

    items: tuple[T, ...]
    next_page_token: str = ""

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)
