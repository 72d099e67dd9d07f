"""AddressInfo and AllocationInfo write their fields straight into the instance (a frozen
dataclass's own __init__ is twice as slow, and they are made for every row of a ListAllocations
page), and convert.fill_allocation sets a message field by field: both must give exactly what the
plain dataclass and a conversion through the message constructors give."""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsipam.server.domain import AddressInfo, AllocationInfo, Family
from dsipam.server.rpc import convert
from dsipam.v1 import ipam_pb2 as pb


@pytest.mark.parametrize("cls", [AddressInfo, AllocationInfo])
def test_each_init_takes_exactly_the_dataclass_fields(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert p.default == (inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
        assert f.default_factory is dataclasses.MISSING  # a factory would need calling in __init__


def _plain(cls):
    """The same fields as a plain frozen dataclass (its generated __init__)."""
    return dataclasses.make_dataclass("Plain" + cls.__name__, [(f.name, f.type, f) for f in dataclasses.fields(cls)],
                                      frozen=True)


families = st.sampled_from([Family.IPV4, Family.IPV6])
texts = st.text(max_size=20)
addresses = st.builds(AddressInfo, families, texts, st.integers(0, 128), texts)
attributes = st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4)
times = st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1),
                     timezones=st.sampled_from([dt.UTC, None]))


@settings(max_examples=200, deadline=None)
@given(family=families, ip=texts, prefix=st.integers(0, 128), gateway=texts)
def test_address_info_is_what_the_dataclass_makes(family, ip, prefix, gateway):
    a = AddressInfo(family, ip, prefix, gateway)
    k = AddressInfo(family=family, ip=ip, prefix_length=prefix, gateway=gateway)
    plain = _plain(AddressInfo)(family, ip, prefix, gateway)
    assert a == k and hash(a) == hash(k)
    assert dataclasses.astuple(a) == dataclasses.astuple(plain)
    assert repr(a) == repr(plain).replace("PlainAddressInfo", "AddressInfo")
    assert dataclasses.replace(a, ip="x") == AddressInfo(family, "x", prefix, gateway)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.ip = "other"  # type: ignore[misc]
    assert a != AddressInfo(family, ip + "x", prefix, gateway)


@settings(max_examples=200, deadline=None)
@given(pool=texts, owner=texts, addrs=st.lists(addresses, max_size=2).map(tuple), attrs=attributes,
       created=times, node=st.none() | texts, borrowed=st.none() | st.booleans())
def test_allocation_info_is_what_the_dataclass_makes(pool, owner, addrs, attrs, created, node, borrowed):
    optional = {k: v for k, v in (("node", node), ("borrowed", borrowed)) if v is not None}
    a = AllocationInfo(pool, owner, addrs, attrs, created, **optional)
    plain = _plain(AllocationInfo)(pool, owner, addrs, attrs, created, **optional)
    assert dataclasses.astuple(a) == dataclasses.astuple(plain)
    assert a == AllocationInfo(pool=pool, owner=owner, addresses=addrs, attributes=dict(attrs), create_time=created,
                               **optional)
    assert a.node == (node if node is not None else "") and a.borrowed is (borrowed or False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.owner = "other"  # type: ignore[misc]


def _reference(a: AllocationInfo) -> pb.Allocation:
    m = pb.Allocation(
        pool=a.pool, owner=a.owner, node=a.node, borrowed=a.borrowed,
        addresses=[pb.Address(family=pb.IP_FAMILY_IPV4 if x.family is Family.IPV4 else pb.IP_FAMILY_IPV6,
                                       ip=x.ip, prefix_length=x.prefix_length, gateway=x.gateway)
                   for x in a.addresses],
        attributes=dict(a.attributes),
    )
    m.create_time.FromDatetime(a.create_time)
    return m


@settings(max_examples=300, deadline=None)
@given(a=st.builds(AllocationInfo, texts, texts, st.lists(addresses, max_size=2).map(tuple), attributes, times,
                   texts, st.booleans()))
def test_fill_allocation_equals_a_conversion_by_constructors(a):
    got = convert.fill_allocation(pb.Allocation(), a)
    want = _reference(a)
    assert got == want
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)
    # and as a page's row, written into a repeated field's new element
    page = pb.ListAllocationsResponse()
    convert.fill_allocation(page.allocations.add(), a)
    assert page.allocations[0] == want


def _two_family_pool():
    from dsipam.server.domain._ranges import build_range
    from dsipam.server.store._base import StoredPool, StoredRange

    ranges = [build_range(cidr="198.18.0.0/24", gateway="198.18.0.1"), build_range(cidr="198.19.4.0/26"),
              build_range(cidr="fd00:1::/120", gateway="fd00:1::1")]
    stored = tuple(StoredRange(i + 1, r, r.size) for i, r in enumerate(ranges))
    return StoredPool(1, "p", {}, dt.datetime(2026, 12, 6, tzinfo=dt.UTC), 0, 1, stored, ())


_POOL = _two_family_pool()
near = st.one_of(
    st.integers(int(ipaddress.ip_address("198.17.255.250")), int(ipaddress.ip_address("198.19.4.70")))
    .map(ipaddress.IPv4Address),
    st.integers(int(ipaddress.ip_address("fd00:0:ffff:ffff:ffff:ffff:ffff:fff0")),
                int(ipaddress.ip_address("fd00:1::200"))).map(ipaddress.IPv6Address),
    st.ip_addresses(),
)


@settings(max_examples=500, deadline=None)
@given(ip=near)
def test_address_info_of_postgresql_text_equals_that_of_the_address(ip):
    """A row's address arrives as PostgreSQL's text; its answer must be the one the address object gets
    (prefix length and gateway of the range holding it, or the family's full length outside every range)."""
    got = _POOL.address_info(str(ip))
    assert got == _POOL.address_info(ip)
    in_range = next((r.spec for r in _POOL.ranges if ip in r.spec.network), None)
    assert got.prefix_length == (in_range.prefix_length if in_range else ip.max_prefixlen)
    assert got.gateway == (str(in_range.gateway) if in_range and in_range.gateway else "")


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_address_info_at_each_ranges_edges(offset):
    for r in _POOL.ranges:
        for edge in (r.spec.network.network_address, r.spec.network.broadcast_address):
            ip = edge + offset
            assert _POOL.address_info(str(ip)) == _POOL.address_info(ip)
            assert _POOL.address_info(str(ip)).prefix_length == (
                r.spec.prefix_length if ip in r.spec.network else ip.max_prefixlen)
