"""Ranges and blocks: pure arithmetic over address intervals, with no I/O.

A range is a CIDR with an optional sub-range (first..last), a gateway and
exclusions. It is split into aligned blocks of ``2**(bits - block_prefix)``
addresses. Blocks are created lazily by the store; a block's bitmap has bit
``i`` set when address ``base + i`` is taken or can never be handed out.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from operator import itemgetter

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


# -- address blocks as integers ------------------------------------------------------------
#
# Excludes and reservations come by the ten thousand; an ``ipaddress`` network object costs
# several microseconds to parse and build (100,000 of them: about a second). A Cidr is parsed by
# the C library (inet_pton) and held as integers; only bad input and the rare IPv6 text with an
# embedded IPv4 address take the ``ipaddress`` path, so results and error messages are the same.


class Cidr:
    """An address block (a CIDR, or one address as a /32 or /128) held as integers.

    Equal, hashed and ordered by (version, first address, prefix length); ``str`` is the
    canonical text ``ipaddress`` gives (and PostgreSQL's ``cidr::text`` gives back)."""

    __slots__ = ("version", "lo", "hi", "prefixlen", "_text")

    def __init__(self, version: int, lo: int, prefixlen: int, text: str | None = None) -> None:
        bits = 32 if version == 4 else 128
        self.version = version
        self.lo = lo
        self.prefixlen = prefixlen
        self.hi = lo | ((1 << (bits - prefixlen)) - 1)
        self._text = text

    @classmethod
    def of(cls, net: IPNetwork | Cidr) -> Cidr:
        if isinstance(net, Cidr):
            return net
        return cls(net.version, int(net.network_address), net.prefixlen)

    @property
    def max_prefixlen(self) -> int:
        return 32 if self.version == 4 else 128

    @property
    def num_addresses(self) -> int:
        return self.hi - self.lo + 1

    @property
    def network_address(self) -> IPAddress:
        return ipaddress.ip_address(self.lo) if self.version == 4 else ipaddress.IPv6Address(self.lo)

    @property
    def broadcast_address(self) -> IPAddress:
        return ipaddress.ip_address(self.hi) if self.version == 4 else ipaddress.IPv6Address(self.hi)

    def to_network(self) -> IPNetwork:
        if self.version == 4:
            return ipaddress.IPv4Network((self.lo, self.prefixlen))
        return ipaddress.IPv6Network((self.lo, self.prefixlen))

    def overlaps(self, other: Cidr | IPNetwork) -> bool:
        o = Cidr.of(other)
        return self.version == o.version and self.lo <= o.hi and o.lo <= self.hi

    def subnet_of(self, other: Cidr | IPNetwork) -> bool:
        o = Cidr.of(other)
        return self.version == o.version and o.lo <= self.lo and self.hi <= o.hi

    def _key(self) -> tuple[int, int, int]:
        return (self.version, self.lo, self.prefixlen)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Cidr):
            return self.version == other.version and self.lo == other.lo and self.prefixlen == other.prefixlen
        if isinstance(other, ipaddress.IPv4Network | ipaddress.IPv6Network):
            return self == Cidr.of(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.version, self.lo, self.prefixlen))

    def __lt__(self, other: Cidr) -> bool:
        return self._key() < other._key()

    def __str__(self) -> str:
        text = self._text
        if text is None:
            text = self._text = f"{_format_address(self.version, self.lo)}/{self.prefixlen}"
        return text

    def __repr__(self) -> str:
        return f"Cidr({str(self)!r})"


def _format_address(version: int, value: int) -> str:
    if version == 4:
        return socket.inet_ntoa(value.to_bytes(4, "big"))
    if value >> 32 in (0, 0xFFFF):  # the C library writes these with an embedded IPv4 address
        return str(ipaddress.IPv6Address(value))
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


def _fast_cidr(text: str) -> Cidr | None:
    """The Cidr of ``text`` (an address, or address/prefix with zero host bits) by the C
    library, or None when it takes the slow path (bad input, netmask forms, zone IDs)."""
    addr, slash, plen = text.partition("/")
    try:
        if ":" in addr:
            packed = socket.inet_pton(socket.AF_INET6, addr)
            version, bits = 6, 128
        else:
            packed = socket.inet_pton(socket.AF_INET, addr)
            version, bits = 4, 32
    except (OSError, ValueError, UnicodeError):
        return None
    if slash:
        if not (0 < len(plen) <= 3 and plen.isascii() and plen.isdigit()):
            return None
        prefix = int(plen)
        if prefix > bits:
            return None
    else:
        prefix = bits
    lo = int.from_bytes(packed, "big")
    if lo & ((1 << (bits - prefix)) - 1):
        return None  # host bits set: the slow path words the error
    return Cidr(version, lo, prefix)


def parse_cidrs(texts: Iterable[str], where: Callable[[int], str]) -> list[Cidr]:
    """:func:`parse_cidr` of each text (an address or a CIDR), in one tight loop; ``where(i)``
    names the field of text ``i`` (called only on error). About 1 µs a text, against 7 µs or
    more for ``ipaddress.ip_network``."""
    pton, from_bytes, new, af4, af6 = socket.inet_pton, int.from_bytes, Cidr.__new__, socket.AF_INET, socket.AF_INET6
    out: list[Cidr] = []
    append = out.append
    for i, text in enumerate(texts):
        addr, slash, plen = text.partition("/")
        v6 = ":" in addr
        try:
            lo = from_bytes(pton(af6 if v6 else af4, addr), "big")
        except (OSError, ValueError, UnicodeError):
            append(parse_cidr(text, where(i)))
            continue
        bits = 128 if v6 else 32
        if slash:
            if not (0 < len(plen) <= 3 and plen.isascii() and plen.isdigit()) or int(plen) > bits:
                append(parse_cidr(text, where(i)))
                continue
            prefix = int(plen)
        else:
            prefix = bits
        hostmask = (1 << (bits - prefix)) - 1
        if lo & hostmask:
            append(parse_cidr(text, where(i)))
            continue
        c = new(Cidr)
        c.version, c.lo, c.hi, c.prefixlen, c._text = (6 if v6 else 4), lo, lo | hostmask, prefix, None
        append(c)
    return out


def parse_cidr(text: str, where: str | Callable[[], str], allow_address: bool = True) -> Cidr:
    """Like :func:`parse_address_or_network` (or :func:`parse_network` with ``allow_address=False``),
    as a :class:`Cidr`, fast. ``where`` may be a function that names the field (called only on error)."""
    stripped = text.strip()
    if "%" not in stripped and (allow_address or "/" in stripped):
        fast = _fast_cidr(stripped)
        if fast is not None:
            return fast
    name = where if isinstance(where, str) else where()
    net = parse_address_or_network(text, name) if allow_address else parse_network(text, name)
    return Cidr.of(net)


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


def merge_intervals(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent intervals covering the same integers (one sort: O(n log n))."""
    out: list[tuple[int, int]] = []
    cur_lo = cur_hi = -2
    for lo, hi in sorted(intervals, key=itemgetter(0)):  # by start only: int keys sort fast
        if lo <= cur_hi + 1:
            if hi > cur_hi:
                cur_hi = hi
        else:
            if cur_hi >= cur_lo >= 0:
                out.append((cur_lo, cur_hi))
            cur_lo, cur_hi = lo, hi
    if cur_hi >= cur_lo >= 0:
        out.append((cur_lo, cur_hi))
    return out


def complement(first: int, last: int, taken: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``first..last`` outside the sorted intervals ``taken`` (one pass)."""
    out: list[tuple[int, int]] = []
    cur = first
    for lo, hi in taken:
        if hi < cur:
            continue
        if lo > last:
            break
        if lo > cur:
            out.append((cur, lo - 1))
        cur = hi + 1
        if cur > last:
            break
    if cur <= last:
        out.append((cur, last))
    return out


class ReservationIndex:
    """A pool's reservations, sorted once, to hand each range those that overlap it in
    O(log n + k) (instead of testing every reservation against every range)."""

    def __init__(self, reservations: Iterable[Cidr | IPNetwork]) -> None:
        cidrs = sorted(Cidr.of(r) for r in reservations)
        self.all = tuple(cidrs)
        self._by_version = {v: [c for c in cidrs if c.version == v] for v in (4, 6)}
        self._los = {v: [c.lo for c in cs] for v, cs in self._by_version.items()}
        self._keys = {c._key(): c for c in cidrs}

    def overlapping(self, net: IPNetwork) -> tuple[Cidr, ...]:
        v, lo, hi = net.version, int(net.network_address), int(net.broadcast_address)
        cidrs, los = self._by_version[v], self._los[v]
        # Blocks that start inside the network (CIDRs either nest or are disjoint) ...
        inside = cidrs[bisect.bisect_left(los, lo):bisect.bisect_right(los, hi)]
        # ... and blocks that hold all of it: at most one per shorter prefix length.
        bits = 32 if v == 4 else 128
        holding = [
            c for p in range(net.prefixlen)
            if (c := self._keys.get((v, lo & ~((1 << (bits - p)) - 1), p))) is not None
        ]
        return tuple(sorted(holding)) + tuple(inside)


@dataclass(frozen=True)
class RangeSpec:
    """A validated range. Addresses are held as integers."""

    network: IPNetwork
    first: int
    last: int
    gateway: IPAddress | None
    exclude: tuple[Cidr, ...]
    block_prefix: int
    _explicit_first: bool = field(default=False, compare=False)
    # Reservations made on the live pool (ReserveAddresses): never handed out, like exclude.
    reserved: tuple[Cidr, ...] = ()
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
        """Sorted disjoint intervals of the addresses that may be handed out.

        One sort of every address that is never handed out (network, broadcast, gateway,
        excludes, reservations: they may overlap each other), then one pass: O(n log n)."""
        net = self.network
        bits = self.family.bits
        never = [(c.lo, c.hi) for c in self.exclude]
        never += [(c.lo, c.hi) for c in self.reserved]
        if self.family is Family.IPV4 and net.prefixlen <= 30:
            never.append((int(net.network_address), int(net.network_address)))
            never.append((int(net.broadcast_address), int(net.broadcast_address)))
        elif self.family is Family.IPV6 and net.prefixlen <= bits - 2:
            never.append((int(net.network_address), int(net.network_address)))
        if self.gateway is not None:
            never.append((int(self.gateway), int(self.gateway)))
        return tuple(complement(self.first, self.last, merge_intervals(never)))

    @cached_property
    def _reserved_intervals(self) -> tuple[list[int], list[tuple[int, int]]]:
        merged = merge_intervals((c.lo, c.hi) for c in self.reserved)
        return [a for a, _ in merged], merged

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
        starts, merged = self._reserved_intervals
        i = bisect.bisect_right(starts, value) - 1
        if i >= 0 and merged[i][1] >= value:
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
        available = self.available
        for j in range(i, len(available)):  # by index: a slice would copy the rest of the list per block
            a, b = available[j]
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

    def with_reserved(self, reservations: Iterable[Cidr | IPNetwork] | ReservationIndex) -> RangeSpec:
        """This range with the reservations that overlap it (pass a :class:`ReservationIndex`
        to give many ranges their share of many reservations)."""
        from dataclasses import replace

        if isinstance(reservations, ReservationIndex):
            mine = reservations.overlapping(self.network)
        else:
            v = self.network.version
            lo, hi = int(self.network.network_address), int(self.network.broadcast_address)
            mine = tuple(c for c in map(Cidr.of, reservations) if c.version == v and c.lo <= hi and c.hi >= lo)
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

    excludes = parse_cidrs(exclude, lambda i: f"{where}.exclude[{i}]")
    version = net.version
    for i, ex in enumerate(excludes):
        if ex.version != version or ex.hi < lo or ex.lo > hi:
            name = f"{where}.exclude[{i}]"
            if ex.version != version:
                label = "IPv4" if ex.version == 4 else "IPv6"
                raise InvalidArgument(f"{name}: {exclude[i]} is {label} but cidr {net} is {fam.label}", field=name)
            raise InvalidArgument(f"{name}: {exclude[i]} is outside the range {net}", field=name)

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
