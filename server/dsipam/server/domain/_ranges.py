"""Ranges and blocks: pure arithmetic over address intervals, with no I/O.

A range is a CIDR with an optional sub-range (first..last), a gateway and
exclusions. It is split into aligned blocks of ``2**(bits - block_prefix)``
addresses. Blocks are created lazily by the store; a block's bitmap has bit
``i`` set when address ``base + i`` is taken or can never be handed out.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from ._errors import InvalidArgument
from ._family import Family

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 65536


def family_of(value: IPAddress | IPNetwork) -> Family:
    return Family.IPV4 if value.version == 4 else Family.IPV6


def _refuse_zone(text: str, where: str) -> None:
    """An IPv6 zone ID (``fe80::1%eth0``) names an interface of one host: never valid input here."""
    if "%" in text:
        raise InvalidArgument(
            f"{where}: {text[:80]!r}: zone IDs are not allowed (an address here names no interface)", field=where
        )


def parse_address(text: str, where: str) -> IPAddress:
    """Parses one address; ``where`` names the field in the error. Zone IDs are refused."""
    _refuse_zone(text, where)
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise InvalidArgument(f"{where}: {text[:80]!r} is not an IP address", field=where) from None


def parse_network(text: str, where: str) -> IPNetwork:
    """Parses a CIDR such as 198.18.0.0/24; host bits must be zero. Zone IDs are refused."""
    _refuse_zone(text, where)
    if "/" not in text:
        raise InvalidArgument(f"{where}: {text[:80]!r} is not a CIDR (expected address/prefix)", field=where)
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: {text[:80]!r} is not a valid CIDR ({exc})", field=where) from None


def parse_address_or_network(text: str, where: str) -> IPNetwork:
    if "/" in text:
        return parse_network(text, where)
    address = parse_address(text, where)
    return ipaddress.ip_network(address)


# -- range policy -----------------------------------------------------------------------
#
# A range must be unicast space that a pod can hold. These blocks of the IANA IPv4 and IPv6
# special-purpose address registries (RFC 6890) are refused, with the reason. Private space
# (10/8, 172.16/12, 192.168/16, fc00::/7), shared space (100.64/10) and the benchmarking
# blocks (198.18.0.0/15, 2001:2::/48: what the tests use) stay allowed. Order matters: the
# first block that holds a range names the reason (the limited broadcast address before 240/4).


@dataclass(frozen=True)
class SpecialBlock:
    network: IPNetwork
    what: str  # completes "<cidr> is ..."
    source: str  # the RFC that assigns it


def _special(cidr: str, what: str, source: str) -> SpecialBlock:
    return SpecialBlock(ipaddress.ip_network(cidr), what, source)


REFUSED_BLOCKS: tuple[SpecialBlock, ...] = (
    _special("0.0.0.0/8", '"this network"', "RFC 791"),
    _special("127.0.0.0/8", "loopback", "RFC 1122"),
    _special("169.254.0.0/16", "link-local", "RFC 3927"),
    _special("192.0.0.0/24", "IETF protocol assignments", "RFC 6890"),
    _special("192.0.2.0/24", "documentation-only (TEST-NET-1)", "RFC 5737"),
    _special("198.51.100.0/24", "documentation-only (TEST-NET-2)", "RFC 5737"),
    _special("203.0.113.0/24", "documentation-only (TEST-NET-3)", "RFC 5737"),
    _special("224.0.0.0/4", "multicast", "RFC 5771"),
    _special("255.255.255.255/32", "the limited broadcast address", "RFC 919"),
    _special("240.0.0.0/4", "reserved for future use", "RFC 1112"),
    _special("::/128", "the unspecified address", "RFC 4291"),
    _special("::1/128", "loopback", "RFC 4291"),
    _special("::/96", "IPv4-compatible (deprecated)", "RFC 4291"),
    _special("::ffff:0:0/96", "IPv4-mapped (it names IPv4 hosts)", "RFC 4291"),
    _special("::ffff:0:0:0/96", "IPv4-translated (it names IPv4 hosts)", "RFC 2765"),
    _special("64:ff9b::/96", "the NAT64 well-known prefix (it names IPv4 hosts)", "RFC 6052"),
    _special("64:ff9b:1::/48", "local-use IPv4/IPv6 translation", "RFC 8215"),
    _special("100::/64", "discard-only", "RFC 6666"),
    _special("2001:db8::/32", "documentation-only", "RFC 3849"),
    _special("3fff::/20", "documentation-only", "RFC 9637"),
    _special("fe80::/10", "link-local", "RFC 4291"),
    _special("ff00::/8", "multicast", "RFC 4291"),
)


def range_policy_violation(net: IPNetwork) -> str | None:
    """Why pods cannot hold ``net`` (a sentence that starts with the CIDR), or None."""
    if net.prefixlen == 0:
        return f"{net} is a /0 (every {family_of(net).label} address); pods cannot hold it"
    same = [b for b in REFUSED_BLOCKS if b.network.version == net.version]
    for b in same:
        if net.subnet_of(b.network):  # type: ignore[arg-type]
            return f"{net} is {b.what} ({b.source}); pods cannot hold it"
    for b in same:
        if net.overlaps(b.network):
            return f"{net} overlaps {b.network}, which is {b.what} ({b.source}); pods cannot hold it"
    return None


def check_range_policy(net: IPNetwork, where: str) -> None:
    reason = range_policy_violation(net)
    if reason is not None:
        raise InvalidArgument(f"{where}: {reason}", field=where, reason="RANGE_NOT_ALLOWED")


def _subtract(intervals: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in intervals:
        if hi < a or lo > b:
            out.append((a, b))
            continue
        if a < lo:
            out.append((a, lo - 1))
        if hi < b:
            out.append((hi + 1, b))
    return out


@dataclass(frozen=True)
class RangeSpec:
    """A validated range. Addresses are held as integers."""

    network: IPNetwork
    first: int
    last: int
    gateway: IPAddress | None
    exclude: tuple[IPNetwork, ...]
    block_prefix: int
    _explicit_first: bool = field(default=False, compare=False)
    # Reservations made on the live pool (ReserveAddresses): never handed out, like exclude.
    reserved: tuple[IPNetwork, ...] = ()
    _explicit_last: bool = field(default=False, compare=False)

    @property
    def family(self) -> Family:
        return family_of(self.network)

    @property
    def cidr(self) -> str:
        return str(self.network)

    @property
    def prefix_length(self) -> int:
        return self.network.prefixlen

    @property
    def block_size(self) -> int:
        return 1 << (self.family.bits - self.block_prefix)

    @property
    def network_int(self) -> int:
        return int(self.network.network_address)

    def address(self, value: int) -> IPAddress:
        if self.family is Family.IPV4:
            return ipaddress.IPv4Address(value)
        return ipaddress.IPv6Address(value)

    @cached_property
    def available(self) -> tuple[tuple[int, int], ...]:
        """Sorted disjoint intervals of the addresses that may be handed out."""
        intervals = [(self.first, self.last)]
        net = self.network
        bits = self.family.bits
        if self.family is Family.IPV4 and net.prefixlen <= 30:
            intervals = _subtract(intervals, int(net.network_address), int(net.network_address))
            intervals = _subtract(intervals, int(net.broadcast_address), int(net.broadcast_address))
        elif self.family is Family.IPV6 and net.prefixlen <= bits - 2:
            intervals = _subtract(intervals, int(net.network_address), int(net.network_address))
        if self.gateway is not None:
            intervals = _subtract(intervals, int(self.gateway), int(self.gateway))
        for ex in (*self.exclude, *self.reserved):
            intervals = _subtract(intervals, int(ex.network_address), int(ex.broadcast_address))
        return tuple(intervals)

    @cached_property
    def _starts(self) -> list[int]:
        return [a for a, _ in self.available]

    @cached_property
    def size(self) -> int:
        """How many addresses this range can hand out."""
        return sum(b - a + 1 for a, b in self.available)

    def is_available(self, value: int) -> bool:
        i = bisect.bisect_right(self._starts, value) - 1
        return i >= 0 and self.available[i][1] >= value

    def contains(self, value: int) -> bool:
        return int(self.network.network_address) <= value <= int(self.network.broadcast_address)

    def why_unavailable(self, value: int) -> str:
        """Explains why an address inside the CIDR cannot be handed out."""
        net = self.network
        if value == int(net.network_address):
            return "is the network address"
        if self.family is Family.IPV4 and value == int(net.broadcast_address) and net.prefixlen <= 30:
            return "is the broadcast address"
        if self.gateway is not None and value == int(self.gateway):
            return "is the gateway"
        if value < self.first or value > self.last:
            return f"is outside first..last ({self.address(self.first)}..{self.address(self.last)})"
        if any(self.address(value) in r for r in self.reserved):
            return "is reserved"
        return "is excluded"

    # -- blocks -----------------------------------------------------------------

    def block_base(self, value: int) -> int:
        """The base of the block that holds ``value``."""
        shift = self.family.bits - self.block_prefix
        return (value >> shift) << shift

    def block_cidr(self, base: int) -> str:
        return f"{self.address(base)}/{self.block_prefix}"

    def block_mask(self, base: int) -> tuple[str, int]:
        """The initial bitmap of the block at ``base`` as a '0'/'1' string, and its free count."""
        size = self.block_size
        end = base + size - 1
        bits = bytearray(b"1" * size)
        free = 0
        i = max(bisect.bisect_right(self._starts, base) - 1, 0)
        for a, b in self.available[i:]:
            if a > end:
                break
            lo, hi = max(a, base), min(b, end)
            if lo > hi:
                continue
            bits[lo - base : hi - base + 1] = b"0" * (hi - lo + 1)
            free += hi - lo + 1
        return bits.decode(), free

    def first_block(self) -> int | None:
        return self.next_block_from(self.block_base(self.first))

    def next_block_from(self, base: int) -> int | None:
        """The first block base >= ``base`` holding at least one available address."""
        i = bisect.bisect_right(self._starts, base) - 1
        if i >= 0 and self.available[i][1] >= base:
            return base
        i += 1
        if i >= len(self.available):
            return None
        return self.block_base(self.available[i][0])

    def following_block(self, base: int) -> int | None:
        return self.next_block_from(base + self.block_size)

    # -- output -----------------------------------------------------------------

    def with_reserved(self, reservations: Iterable[IPNetwork]) -> RangeSpec:
        """This range with the reservations that overlap it."""
        from dataclasses import replace

        mine = tuple(r for r in reservations if r.version == self.network.version and r.overlaps(self.network))
        return replace(self, reserved=mine)

    def first_text(self) -> str:
        return str(self.address(self.first)) if self._explicit_first else ""

    def last_text(self) -> str:
        return str(self.address(self.last)) if self._explicit_last else ""


def _default_bounds(net: IPNetwork) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address)


def build_range(
    *,
    cidr: str,
    first: str = "",
    last: str = "",
    gateway: str = "",
    exclude: Sequence[str] = (),
    block_size: int = 0,
    where: str = "range",
    policy: bool = True,
) -> RangeSpec:
    """Validates one range as given by a caller. ``where`` prefixes field names in errors.

    ``policy=False`` skips the range policy (:func:`check_range_policy`): only for ranges
    read back from the database, which may predate it.
    """
    if not cidr:
        raise InvalidArgument(f"{where}.cidr: required", field=f"{where}.cidr")
    net = parse_network(cidr, f"{where}.cidr")
    if policy:
        check_range_policy(net, f"{where}.cidr")
    fam = family_of(net)
    lo, hi = _default_bounds(net)

    def inside(text: str, name: str) -> IPAddress:
        addr = parse_address(text, f"{where}.{name}")
        if addr.version != net.version:
            raise InvalidArgument(
                f"{where}.{name}: {addr} is {family_of(addr).label} but cidr {net} is {fam.label}",
                field=f"{where}.{name}",
            )
        if addr not in net:
            raise InvalidArgument(f"{where}.{name}: {addr} is outside the range {net}", field=f"{where}.{name}")
        return addr

    first_i = int(inside(first, "first")) if first else lo
    last_i = int(inside(last, "last")) if last else hi
    if first_i > last_i:
        raise InvalidArgument(f"{where}.first: {first} is after last {last}", field=f"{where}.first")
    gw = inside(gateway, "gateway") if gateway else None

    excludes: list[IPNetwork] = []
    for i, text in enumerate(exclude):
        name = f"{where}.exclude[{i}]"
        ex = parse_address_or_network(text, name)
        if ex.version != net.version:
            raise InvalidArgument(f"{name}: {text} is {family_of(ex).label} but cidr {net} is {fam.label}", field=name)
        if not ex.overlaps(net):
            raise InvalidArgument(f"{name}: {text} is outside the range {net}", field=name)
        excludes.append(ex)

    size = block_size or DEFAULT_BLOCK_SIZE
    if size < 1 or size > MAX_BLOCK_SIZE or size & (size - 1):
        raise InvalidArgument(
            f"{where}.block_size: {block_size} must be a power of two from 1 to {MAX_BLOCK_SIZE}",
            field=f"{where}.block_size",
        )
    block_prefix = max(fam.bits - (size.bit_length() - 1), net.prefixlen)
    spec = RangeSpec(
        network=net,
        first=first_i,
        last=last_i,
        gateway=gw,
        exclude=tuple(excludes),
        block_prefix=block_prefix,
        _explicit_first=bool(first),
        _explicit_last=bool(last),
    )
    if spec.size == 0:
        raise InvalidArgument(f"{where}: {net} has no address left to hand out", field=where)
    return spec


def check_overlaps(ranges: Iterable[RangeSpec], where: str = "pool.ranges") -> None:
    seen: list[tuple[int, RangeSpec]] = []
    for i, r in enumerate(ranges):
        for j, other in seen:
            if r.network.version == other.network.version and r.network.overlaps(other.network):
                raise InvalidArgument(
                    f"{where}[{i}].cidr: {r.cidr} overlaps {where}[{j}] ({other.cidr})", field=f"{where}[{i}].cidr"
                )
        seen.append((i, r))
