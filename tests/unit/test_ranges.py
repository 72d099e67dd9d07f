"""Pure range and block arithmetic: no database."""

import ipaddress

import pytest

from dsipam.server.domain import InvalidArgument, build_range, check_overlaps
from dsipam.server.domain._fsck import check_consistency


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
    v4 = build_range(cidr="10.0.0.0/8")
    v6 = build_range(cidr="fd00::/48")
    assert v4.size == 2**24 - 2
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
