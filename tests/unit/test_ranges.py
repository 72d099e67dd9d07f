"""Pure range and block arithmetic: no database."""

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsipam.server.domain import Family, InvalidArgument, Policy, build_pool_spec, build_range, check_overlaps
from dsipam.server.domain import RangeInput as RI
from dsipam.server.domain._fsck import check_consistency
from dsipam.server.domain._ranges import (
    REFUSED_BLOCKS,
    parse_address,
    parse_address_or_network,
    parse_network,
    range_policy_violation,
)
from dsipam.server.domain._validate import check_network, plan_allocation


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def test_ipv4_never_hands_out_network_broadcast_gateway_or_excluded():
    r = build_range(cidr="198.18.0.0/24", gateway="198.18.0.1", exclude=["198.18.0.10", "198.18.0.64/30"])
    assert r.size == 256 - 2 - 1 - 1 - 4
    for bad in ("198.18.0.0", "198.18.0.255", "198.18.0.1", "198.18.0.10", "198.18.0.65"):
        assert not r.is_available(ip(bad)), bad
    assert r.is_available(ip("198.18.0.2"))
    assert r.why_unavailable(ip("198.18.0.0")) == "is the network address"
    assert r.why_unavailable(ip("198.18.0.255")) == "is the broadcast address"
    assert r.why_unavailable(ip("198.18.0.1")) == "is the gateway"
    assert r.why_unavailable(ip("198.18.0.66")) == "is excluded"


def test_ipv6_excludes_the_network_address_only():
    r = build_range(cidr="fd00::/120")
    assert r.size == 255
    assert not r.is_available(ip("fd00::"))
    assert r.is_available(ip("fd00::ff"))


def test_first_last_bound_the_range():
    r = build_range(cidr="198.18.0.0/24", first="198.18.0.100", last="198.18.0.109")
    assert r.size == 10
    assert not r.is_available(ip("198.18.0.99"))
    assert "outside first..last" in r.why_unavailable(ip("198.18.0.110"))
    assert r.first_block() == ip("198.18.0.64")  # the /26 block holding .100


def test_block_mask_marks_unavailable_bits():
    r = build_range(cidr="198.18.0.0/24", gateway="198.18.0.1", block_size=64)
    bitmap, free = r.block_mask(ip("198.18.0.0"))
    assert len(bitmap) == 64
    assert bitmap.startswith("11") and bitmap[2:] == "0" * 62
    assert free == 62
    last, free_last = r.block_mask(ip("198.18.0.192"))
    assert last.endswith("1") and free_last == 63


def test_lazy_block_walk_skips_fully_excluded_blocks():
    r = build_range(cidr="198.18.0.0/24", exclude=["198.18.0.64/26", "198.18.0.128/26"], block_size=64)
    first = r.first_block()
    assert first == ip("198.18.0.0")
    assert r.following_block(first) == ip("198.18.0.192")
    assert r.following_block(ip("198.18.0.192")) is None


def test_huge_ranges_cost_nothing_to_describe():
    v4 = build_range(cidr="198.18.0.0/15")
    v6 = build_range(cidr="fd00::/48")
    assert v4.size == 2**17 - 2
    assert v6.size == 2**80 - 1
    assert v6.block_prefix == 122 and v4.block_prefix == 26


def test_small_range_clamps_block_to_the_cidr():
    r = build_range(cidr="198.18.0.0/29", block_size=64)
    assert r.block_prefix == 29 and r.block_size == 8


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"cidr": "198.18.0.0/33"}, "range.cidr", "not a valid CIDR"),
        ({"cidr": "198.18.0.1/24"}, "range.cidr", "host bits"),
        ({"cidr": "banana"}, "range.cidr", "not a CIDR"),
        ({"cidr": "198.18.0.0/24", "gateway": "198.18.1.1"}, "range.gateway", "outside the range"),
        ({"cidr": "198.18.0.0/24", "gateway": "fd00::1"}, "range.gateway", "is IPv6 but cidr"),
        ({"cidr": "198.18.0.0/24", "first": "198.18.0.9", "last": "198.18.0.2"}, "range.first", "after last"),
        ({"cidr": "198.18.0.0/24", "exclude": ["fd00::/64"]}, "range.exclude[0]", "is IPv6"),
        ({"cidr": "198.18.0.0/24", "block_size": 48}, "range.block_size", "power of two"),
        ({"cidr": "198.18.0.0/30", "exclude": ["198.18.0.0/30"]}, "range", "no address left"),
    ],
)
def test_bad_ranges_name_the_field(kwargs, field, words):
    with pytest.raises(InvalidArgument) as err:
        build_range(**kwargs)
    assert err.value.message.startswith(field + ":")
    assert words in err.value.message


def test_overlapping_ranges_are_refused():
    a = build_range(cidr="198.18.0.0/24")
    b = build_range(cidr="198.18.0.128/25")
    with pytest.raises(InvalidArgument, match=r"pool.ranges\[1\].cidr: .* overlaps"):
        check_overlaps([a, b])


def test_fsck_finds_leaked_and_missing_bits():
    class R:
        id = 1
        spec = build_range(cidr="198.18.0.0/29", block_size=8)

    bitmap, _ = R.spec.block_mask(ip("198.18.0.0"))
    taken = bitmap[:2] + "1" + bitmap[3:]  # .2 marked taken
    block = {"id": 1, "range_id": 1, "base": "198.18.0.0", "bitmap": taken, "free_count": 5, "avail_count": 6, "cooling": 0}
    assert check_consistency([R], [block], [{"owner": "a", "ipv4": "198.18.0.2", "ipv6": None}]) == []
    problems = check_consistency([R], [block], [])
    assert any("marked taken but held by nobody" in p for p in problems)
    problems = check_consistency([R], [block], [{"owner": "a", "ipv4": "198.18.0.3", "ipv6": None}])
    assert any("held but not marked taken" in p for p in problems)


# -- range policy (issue 17, finding 6) ------------------------------------------------------

REFUSED = [
    ("0.0.0.0/0", "is a /0"),
    ("::/0", "is a /0"),
    ("0.0.0.0/8", '"this network" (RFC 791)'),
    ("127.0.0.0/8", "is loopback (RFC 1122)"),
    ("127.0.0.1/32", "is loopback (RFC 1122)"),
    ("169.254.0.0/16", "is link-local (RFC 3927)"),
    ("169.254.10.0/24", "is link-local (RFC 3927)"),
    ("192.0.0.0/29", "IETF protocol assignments (RFC 6890)"),
    ("192.0.2.0/24", "documentation-only (TEST-NET-1) (RFC 5737)"),
    ("198.51.100.0/24", "documentation-only (TEST-NET-2) (RFC 5737)"),
    ("203.0.113.0/25", "documentation-only (TEST-NET-3) (RFC 5737)"),
    ("224.0.0.0/4", "is multicast (RFC 5771)"),
    ("239.1.0.0/16", "is multicast (RFC 5771)"),
    ("240.0.0.0/4", "reserved for future use (RFC 1112)"),
    ("255.255.255.255/32", "the limited broadcast address (RFC 919)"),
    ("126.0.0.0/7", "overlaps 127.0.0.0/8, which is loopback"),
    ("::/128", "the unspecified address (RFC 4291)"),
    ("::1/128", "is loopback (RFC 4291)"),
    ("::/96", "IPv4-compatible"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("::ffff:198.18.0.0/120", "IPv4-mapped"),
    ("::ffff:0:0:0/96", "IPv4-translated"),
    ("64:ff9b::/96", "NAT64"),
    ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation"),
    ("100::/64", "discard-only (RFC 6666)"),
    ("2001:db8::/32", "documentation-only (RFC 3849)"),
    ("2001:db8:1::/64", "documentation-only (RFC 3849)"),
    ("3fff::/20", "documentation-only (RFC 9637)"),
    ("3fff:fff::/32", "documentation-only (RFC 9637)"),
    ("fe80::/64", "is link-local (RFC 4291)"),
    ("fe80::/10", "is link-local (RFC 4291)"),
    ("ff02::/16", "is multicast (RFC 4291)"),
    ("ff00::/8", "is multicast (RFC 4291)"),
    ("fc00::/6", "overlaps fe80::/10, which is link-local"),
]


@pytest.mark.parametrize(("cidr", "words"), REFUSED, ids=[c for c, _ in REFUSED])
def test_ranges_pods_cannot_hold_are_refused_with_the_reason(cidr, words):
    with pytest.raises(InvalidArgument) as err:
        build_range(cidr=cidr, where="pool.ranges[0]")
    assert err.value.message.startswith(f"pool.ranges[0].cidr: {ipaddress.ip_network(cidr)} "), err.value.message
    assert words in err.value.message
    assert err.value.message.endswith("pods cannot hold it")
    assert err.value.metadata["field"] == "pool.ranges[0].cidr"
    assert err.value.reason == "RANGE_NOT_ALLOWED"


def test_policy_message_names_the_field_exactly():
    with pytest.raises(InvalidArgument) as err:
        build_pool_spec("p", [RI("198.18.0.0/24"), RI("127.0.0.0/8")], {})
    assert err.value.message == "pool.ranges[1].cidr: 127.0.0.0/8 is loopback (RFC 1122); pods cannot hold it"


ALLOWED = ["198.18.0.0/15", "198.18.0.0/24", "198.19.255.0/24", "fd00::/8", "fd00::/120", "fd00:1::/64",
           "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "2001:2::/48", "198.18.0.0/32",
           "fd00::1/128"]


@pytest.mark.parametrize("cidr", ALLOWED)
def test_unicast_ranges_pods_can_hold_are_allowed(cidr):
    assert range_policy_violation(ipaddress.ip_network(cidr)) is None
    build_range(cidr=cidr)


def test_stored_ranges_that_predate_the_policy_still_load():
    r = build_range(cidr="127.0.0.0/24", policy=False)
    assert r.size == 254


def test_every_refused_block_is_refused_and_its_neighbours_are_not():
    for block in REFUSED_BLOCKS:
        assert range_policy_violation(block.network) is not None, block
    assert range_policy_violation(ipaddress.ip_network("198.18.0.0/15")) is None
    assert range_policy_violation(ipaddress.ip_network("128.0.0.0/8")) is None  # after 127/8
    assert range_policy_violation(ipaddress.ip_network("223.255.255.0/24")) is None  # before 224/4
    assert range_policy_violation(ipaddress.ip_network("2001:db9::/32")) is None  # after 2001:db8::/32


_V4 = st.builds(lambda n, p: ipaddress.ip_network((n, p), strict=False), st.integers(0, 2**32 - 1),
                st.integers(0, 32))
_V6 = st.builds(lambda n, p: ipaddress.ip_network((n, p), strict=False), st.integers(0, 2**128 - 1),
                st.integers(0, 128))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_V4, _V6))
def test_random_cidrs_are_built_or_refused_with_the_field_named(net):
    try:
        r = build_range(cidr=str(net), where="pool.ranges[3]", block_size=64)
    except InvalidArgument as exc:
        assert exc.message.startswith("pool.ranges[3]"), exc.message
        assert exc.metadata["field"].startswith("pool.ranges[3]")
        return
    # Built: then it touches no refused block and is not a /0.
    assert net.prefixlen > 0
    for block in REFUSED_BLOCKS:
        assert not (block.network.version == net.version and block.network.overlaps(net)), (net, block)
    assert r.size > 0


# -- zone IDs (issue 17, finding 8) ----------------------------------------------------------

ZONED = ["fd70::6%a b\nc<script>", "fe80::1%eth0", "fd00::5%1", "fd00::%eth0/64", "198.18.0.1%x", "%", "fd00::/64%e"]


@pytest.mark.parametrize("text", ZONED)
def test_zone_ids_are_refused_everywhere_an_address_is_parsed(text):
    for parse in (parse_address, parse_network, parse_address_or_network):
        with pytest.raises(InvalidArgument) as err:
            parse(text, "addresses[2]")
        assert err.value.message.startswith("addresses[2]: ")
        assert "zone IDs are not allowed" in err.value.message
        assert "\n" not in err.value.message  # echoed escaped and cut short, never raw


def test_zone_ids_are_refused_in_every_range_field_and_in_allocate():
    cases = [
        ({"cidr": "fd00::%eth0/120"}, "range.cidr"),
        ({"cidr": "fd00::/120", "gateway": "fd00::1%eth0"}, "range.gateway"),
        ({"cidr": "fd00::/120", "first": "fd00::2%1"}, "range.first"),
        ({"cidr": "fd00::/120", "last": "fd00::9%1"}, "range.last"),
        ({"cidr": "fd00::/120", "exclude": ["fd00::8%1"]}, "range.exclude[0]"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidArgument, match="zone IDs are not allowed") as err:
            build_range(**kwargs)
        assert err.value.message.startswith(field + ":")
    with pytest.raises(InvalidArgument) as err:
        plan_allocation(pool_families=(Family.IPV4, Family.IPV6), policy=Policy.PREFER_DUAL_STACK, families=(),
                        addresses=["198.18.0.5", "fd70::6%a b\nc<script>"])
    assert err.value.message.startswith("addresses[1]: ") and "zone IDs are not allowed" in err.value.message


# -- networks (issue 17, finding 7) ----------------------------------------------------------

@pytest.mark.parametrize("name", ["", "blue", "migrated-pods", "vrf.red-1", "a" * 128, "0"])
def test_network_names(name):
    assert check_network(name) == name
    assert build_pool_spec("p", [RI("198.18.0.0/24")], {}, network=name).network == name


@pytest.mark.parametrize("name", ["Blue", "-a", "a-", "a b", "a" * 129, "a/b", "ä", "a\x00", "."])
def test_bad_network_names_name_the_field(name):
    with pytest.raises(InvalidArgument) as err:
        build_pool_spec("p", [RI("198.18.0.0/24")], {}, network=name)
    assert err.value.message.startswith("pool.network: ")


# -- excludes and reservations at scale (issue 13, finding 3) ---------------------------------
#
# The interval logic (one sort, one pass, bisect) against the plainest reference: a set of every
# address of a small range. Hypothesis draws the range, first/last, the gateway, excludes and
# reservations (overlapping each other, the gateway and the edges) and the block size.

from dsipam.server.domain._ranges import (  # noqa: E402
    Cidr,
    ReservationIndex,
    merge_intervals,
    parse_cidr,
    parse_cidrs,
)


def _reference(net, first, last, gateway, blocks):
    """The addresses that may be handed out, one by one."""
    out = set(range(first, last + 1))
    lo, hi = int(net.network_address), int(net.broadcast_address)
    if net.version == 4 and net.prefixlen <= 30:
        out -= {lo, hi}
    elif net.version == 6 and net.prefixlen <= 126:
        out.discard(lo)
    if gateway is not None:
        out.discard(gateway)
    for b in blocks:
        out -= set(range(int(b.network_address), int(b.broadcast_address) + 1))
    return out


@st.composite
def _small_range(draw):
    v6 = draw(st.booleans())
    bits = 128 if v6 else 32
    prefix = draw(st.integers(bits - 9, bits))
    base = int(ipaddress.ip_network("fd00::/8" if v6 else "198.18.0.0/15").network_address)
    net = ipaddress.ip_network((base + (draw(st.integers(0, 255)) << (bits - prefix)), prefix))
    lo, hi = int(net.network_address), int(net.broadcast_address)

    def sub():
        p = draw(st.integers(prefix, bits))
        start = draw(st.integers(lo, hi))
        return ipaddress.ip_network((start, p), strict=False)

    excludes = draw(st.lists(st.builds(sub), max_size=30))
    reserved = draw(st.lists(st.builds(sub), max_size=30))
    first = draw(st.integers(lo, hi))
    last = draw(st.integers(first, hi))
    gateway = draw(st.none() | st.integers(lo, hi))
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16, 64]))
    return net, first, last, gateway, excludes, reserved, block_size


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_small_range())
def test_intervals_match_the_address_by_address_reference(case):
    net, first, last, gateway, excludes, reserved, block_size = case
    kind = ipaddress.ip_address
    expected = _reference(net, first, last, gateway, [*excludes, *reserved])
    try:
        r = build_range(cidr=str(net), first=str(kind(first)), last=str(kind(last)),
                        gateway=str(kind(gateway)) if gateway is not None else "",
                        exclude=[str(x) for x in excludes], block_size=block_size, policy=False)
    except InvalidArgument as exc:  # only when the excludes alone leave nothing
        assert "no address left" in exc.message
        assert not _reference(net, first, last, gateway, excludes)
        return
    r = r.with_reserved(reserved)
    lo, hi = int(net.network_address), int(net.broadcast_address)
    assert r.size == len(expected)
    got = {a for a, b in r.available for a in range(a, b + 1)}
    assert got == expected
    assert list(r.available) == merge_intervals((a, a) for a in expected)  # sorted, disjoint, not adjacent
    for value in range(lo, hi + 1):
        assert r.is_available(value) == (value in expected)
        if value not in expected:
            why = r.why_unavailable(value)
            in_reserved = any(int(x.network_address) <= value <= int(x.broadcast_address) for x in reserved)
            special = why in ("is the network address", "is the broadcast address", "is the gateway") or why.startswith(
                "is outside")
            assert why == ("is reserved" if in_reserved and not special else why)
            if not special:
                assert why == ("is reserved" if in_reserved else "is excluded")
    # Every block: its mask and free count, and the lazy walk visits exactly the blocks with room.
    size = r.block_size
    with_room = []
    for base in range(lo, hi + 1, size):
        bitmap, free = r.block_mask(base)
        assert bitmap == "".join("0" if base + i in expected else "1" for i in range(size))
        assert free == bitmap.count("0")
        if free:
            with_room.append(base)
    walk, b = [], r.first_block()
    while b is not None:
        walk.append(b)
        b = r.following_block(b)
    assert walk == [b for b in with_room if b >= r.block_base(first)]
    # The index hands each range the same reservations as the plain filter.
    index = ReservationIndex(reserved)
    assert set(r.with_reserved(index).reserved) == set(r.with_reserved(reserved).reserved)
    assert set(r.reserved) == {Cidr.of(x) for x in reserved}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.builds(lambda n, p, v6: ipaddress.ip_network((n % (2**128 if v6 else 2**32), p % (129 if v6 else 33)),
                                                                strict=False),
                          st.integers(0, 2**128 - 1), st.integers(0, 128), st.booleans()), max_size=40))
def test_reservation_index_finds_nested_and_holding_blocks(nets):
    index = ReservationIndex(nets)
    for net in nets:
        expected = {Cidr.of(x) for x in nets if x.version == net.version and x.overlaps(net)}
        assert set(index.overlapping(net)) == expected


_ADDR_TEXT = st.one_of(
    st.builds(lambda n, p: str(ipaddress.ip_network((n, p), strict=False)), st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.builds(lambda n, p: str(ipaddress.ip_network((n, p), strict=False)), st.integers(0, 2**128 - 1),
              st.integers(0, 128)),
    st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**48) | st.integers(0, 2**128 - 1)),
    st.builds(lambda n: f"::ffff:{ipaddress.IPv4Address(n)}", st.integers(0, 2**32 - 1)),
    st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1)),
    st.text(alphabet="0123456789abcdefABCDEF:./% ", max_size=45),
    st.text(max_size=12),
)


def _mutate(text, data):
    if text and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(text) - 1))
        text = text[:i] + data.draw(st.sampled_from(["", "0", "/", ":", ".", "1", "%", "/33", "ff", "\x00"])) + text[i + 1:]
    return text


@settings(max_examples=1500, deadline=None)
@given(_ADDR_TEXT, st.data())
def test_fast_cidr_parsing_agrees_with_ipaddress(text, data):
    """The C-library parser accepts exactly what ipaddress accepts, with the same value, the
    same canonical text, and (on the slow path it falls back to) the same error."""
    text = _mutate(text, data)
    try:
        want = Cidr.of(parse_address_or_network(text, "range.exclude[3]"))
    except InvalidArgument as exc:
        with pytest.raises(InvalidArgument) as err:
            parse_cidr(text, "range.exclude[3]")
        assert err.value.message == exc.message
        with pytest.raises(InvalidArgument) as err:
            parse_cidrs(["198.18.0.1", text], lambda i: f"range.exclude[{i}]")
        assert err.value.message == exc.message.replace("exclude[3]", "exclude[1]")
        return
    got = parse_cidr(text, "range.exclude[3]")
    bulk = parse_cidrs([text], lambda i: "x")[0]
    net = want.to_network()
    for c in (got, bulk):
        assert c == want and hash(c) == hash(want)
        assert (c.version, c.lo, c.hi, c.prefixlen) == (net.version, int(net.network_address),
                                                      int(net.broadcast_address), net.prefixlen)
        assert str(c) == str(net)
    # Only CIDRs (with a slash) when addresses are not allowed; the same error otherwise.
    if "/" in text:
        assert parse_cidr(text, "f", allow_address=False) == want
    else:
        with pytest.raises(InvalidArgument):
            parse_cidr(text, "f", allow_address=False)


def test_many_overlapping_excludes_and_reservations_build_in_one_pass():
    """100,000 excludes and reservations of mixed sizes, overlapping each other and the gateway:
    the same answer as merging them by hand (this is about correctness; bench/excludes.py
    measures the time)."""
    import random

    rnd = random.Random(13)
    net = ipaddress.ip_network("198.18.0.0/15")
    lo = int(net.network_address)
    texts = []
    for _ in range(100_000):
        p = rnd.choice([32, 32, 32, 31, 30, 28])
        start = lo + rnd.randrange(2**17)
        texts.append(str(ipaddress.ip_network((start, p), strict=False)))
    texts.append("198.18.0.1")  # the gateway again
    r = build_range(cidr=str(net), gateway="198.18.0.1", exclude=texts[:60_000])
    r = r.with_reserved(ReservationIndex(parse_cidrs(texts[60_000:], str)))
    taken = merge_intervals([(lo, lo), (lo + 2**17 - 1, lo + 2**17 - 1), (lo + 1, lo + 1)]
                            + [(c.lo, c.hi) for c in parse_cidrs(texts, str)])
    assert r.size == 2**17 - sum(b - a + 1 for a, b in taken)
    assert all(not r.is_available(c.lo) for c in parse_cidrs(texts[::997], str))
