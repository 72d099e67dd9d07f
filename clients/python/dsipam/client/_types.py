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


def parse_address(value: AddressLike, where: str) -> IPAddress:
    """Parses an address; errors name ``where``."""
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise InvalidArgument(f"{where}: {value!r} is not an IP address", metadata={"field": where}) from None


def parse_network(value: NetworkLike | IPAddress, where: str, *, allow_address: bool = False) -> IPNetwork:
    """Parses a CIDR (host bits must be zero); with ``allow_address`` an address is a /32 or /128."""
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

    ``size`` counts the addresses that can be handed out (network, broadcast, gateway and
    excluded addresses are not counted).
    """

    family: Family
    size: int
    allocated: int
    free: int

    @property
    def utilisation(self) -> float:
        """``allocated / size``, from 0.0 to 1.0 (0.0 for an empty range)."""
        return self.allocated / self.size if self.size else 0.0


@dataclass(frozen=True)
class Pool:
    """A pool: named ranges of one or two families, with labels and usage."""

    name: str
    ranges: tuple[Range, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    usage: tuple[FamilyUsage, ...] = ()
    create_time: dt.datetime | None = None

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
    """What one owner holds in one pool: at most one address per family, primary first."""

    pool: str
    owner: str
    addresses: tuple[Address, ...]
    attributes: Mapping[str, str] = field(default_factory=dict)
    create_time: dt.datetime | None = None

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
