"""Core semantics of IpamService against a real server process and real PostgreSQL."""

import ipaddress

import grpc
from grpc_helpers import PREFER, REQUIRE, SINGLE, V4, V6, expect_error, families, ips, pool
from support import psql

from dsipam.v1 import ipam_pb2 as pb

C = grpc.StatusCode


def alloc(stub, name, owner, policy=REQUIRE, fams=(), addresses=(), **attrs):
    return stub.Allocate(
        pb.AllocateRequest(
            pool=name, owner=owner, ip_family_policy=policy, ip_families=fams, addresses=addresses, attributes=attrs
        )
    )


def usage(stub, name):
    return {u.family: (u.size, u.allocated, u.free) for u in stub.GetPool(pb.GetPoolRequest(name=name)).usage}


def test_create_get_list_delete_pool(stub):
    created = stub.CreatePool(
        pool("pods", pb.IpRange(cidr="198.18.0.0/24", gateway="198.18.0.1"), "fd00::/120", team="net")
    )
    assert [r.cidr for r in created.ranges] == ["198.18.0.0/24", "fd00::/120"]
    assert created.ranges[0].gateway == "198.18.0.1"
    assert dict(created.labels) == {"team": "net"}
    assert {u.family: u.size for u in created.usage} == {V4: 253, V6: 255}
    assert stub.GetPool(pb.GetPoolRequest(name="pods")).name == "pods"
    expect_error(stub.CreatePool, pool("pods", "198.19.0.0/24"), C.ALREADY_EXISTS, "POOL_ALREADY_EXISTS", "pool.name")
    stub.DeletePool(pb.DeletePoolRequest(name="pods"))
    expect_error(stub.GetPool, pb.GetPoolRequest(name="pods"), C.NOT_FOUND, "POOL_NOT_FOUND", "'pods'")


def test_ipv4_only_ipv6_only_and_several_ranges_per_family(stub):
    stub.CreatePool(pool("v4", "198.18.0.0/30"))
    stub.CreatePool(pool("v6", "fd00::/126"))
    stub.CreatePool(pool("multi", "198.18.1.0/31", "198.18.2.0/31", "fd00:1::/127"))
    assert families(alloc(stub, "v4", "a", SINGLE).allocation) == [V4]
    assert families(alloc(stub, "v6", "a", SINGLE).allocation) == [V6]
    got = {ips(alloc(stub, "multi", f"o{i}", SINGLE, [V4]).allocation)[0] for i in range(4)}
    assert got == {"198.18.1.0", "198.18.1.1", "198.18.2.0", "198.18.2.1"}  # /31s: both usable (RFC 3021)
    expect_error(lambda r: alloc(stub, "multi", "o5", SINGLE, [V4]), None, C.RESOURCE_EXHAUSTED, "POOL_EXHAUSTED")


def test_list_pools_pages(stub):
    for i in range(5):
        stub.CreatePool(pool(f"p{i}", f"198.18.{i}.0/24"))
    first = stub.ListPools(pb.ListPoolsRequest(page_size=2))
    assert [p.name for p in first.pools] == ["p0", "p1"] and first.next_page_token
    second = stub.ListPools(pb.ListPoolsRequest(page_size=2, page_token=first.next_page_token))
    third = stub.ListPools(pb.ListPoolsRequest(page_size=2, page_token=second.next_page_token))
    assert [p.name for p in [*second.pools, *third.pools]] == ["p2", "p3", "p4"]
    assert third.next_page_token == ""
    expect_error(stub.ListPools, pb.ListPoolsRequest(page_token="garbage"), C.INVALID_ARGUMENT, None, "page_token")


def test_require_dual_stack_gives_a_pair_ordered_by_ip_families(stub):
    stub.CreatePool(pool("pods", pb.IpRange(cidr="198.18.0.0/24", gateway="198.18.0.1"), "fd00::/120"))
    resp = alloc(stub, "pods", "c1/eth0", REQUIRE, [V6, V4], node="n1")
    a = resp.allocation
    assert resp.created
    assert families(a) == [V6, V4]
    v6, v4 = a.addresses
    assert ipaddress.ip_address(v4.ip) in ipaddress.ip_network("198.18.0.0/24") and v4.prefix_length == 24
    assert v4.gateway == "198.18.0.1" and v4.ip not in ("198.18.0.0", "198.18.0.1", "198.18.0.255")
    assert ipaddress.ip_address(v6.ip) in ipaddress.ip_network("fd00::/120") and v6.ip != "fd00::"
    assert dict(a.attributes) == {"node": "n1"} and a.create_time.seconds > 0
    assert usage(stub, "pods") == {V4: (253, 1, 252), V6: (255, 1, 254)}


def test_allocate_is_idempotent(stub):
    stub.CreatePool(pool("pods", "198.18.0.0/24", "fd00::/120"))
    first = alloc(stub, "pods", "c1/eth0")
    again = alloc(stub, "pods", "c1/eth0")
    assert not again.created
    assert ips(again.allocation) == ips(first.allocation)
    assert usage(stub, "pods")[V4][1] == 1


def test_single_stack_defaults_to_the_first_ranges_family(stub):
    stub.CreatePool(pool("pods", "fd00::/120", "198.18.0.0/24"))
    assert families(alloc(stub, "pods", "a", SINGLE).allocation) == [V6]
    assert families(alloc(stub, "pods", "b", pb.IP_FAMILY_POLICY_UNSPECIFIED).allocation) == [V6]
    assert families(alloc(stub, "pods", "c", SINGLE, [V4]).allocation) == [V4]


def test_prefer_dual_stack_takes_what_is_available(stub):
    stub.CreatePool(pool("pods", "198.18.0.0/30", "fd00::/120"))  # two IPv4 addresses
    assert families(alloc(stub, "pods", "a", PREFER).allocation) == [V4, V6]
    assert families(alloc(stub, "pods", "b", PREFER).allocation) == [V4, V6]
    third = alloc(stub, "pods", "c", PREFER)  # IPv4 is full: IPv6 only
    assert families(third.allocation) == [V6]
    stub.CreatePool(pool("v4only", "198.18.1.0/24"))
    assert families(alloc(stub, "v4only", "a", PREFER).allocation) == [V4]
    stub.CreatePool(pool("tiny", "198.18.2.0/32"))
    alloc(stub, "tiny", "a", PREFER)
    expect_error(lambda r: alloc(stub, "tiny", "b", PREFER), None, C.RESOURCE_EXHAUSTED, "POOL_EXHAUSTED", "pool")


def test_require_dual_stack_is_all_or_nothing(stub, clean_db):
    stub.CreatePool(pool("pods", "198.18.0.0/30", "fd00::/120"))
    stub.CreatePool(pool("v4only", "198.18.1.0/24"))
    expect_error(lambda r: alloc(stub, "v4only", "a"), None, C.FAILED_PRECONDITION, "FAMILY_NOT_IN_POOL", "IPv6")
    alloc(stub, "pods", "a")
    alloc(stub, "pods", "b")
    before = usage(stub, "pods")
    err = expect_error(lambda r: alloc(stub, "pods", "c"), None, C.RESOURCE_EXHAUSTED, "POOL_EXHAUSTED", "IPv4")
    assert "'pods'" in err.details()
    # The IPv6 address taken before IPv4 ran out was given back.
    assert usage(stub, "pods") == before == {V4: (2, 2, 0), V6: (255, 2, 253)}
    assert psql(clean_db, "SELECT count(*) FROM ipam_allocations WHERE owner = 'c'") == "0"


def test_single_stack_owner_moves_to_dual_stack_and_back(stub):
    stub.CreatePool(pool("pods", "198.18.0.0/24", "fd00::/120"))
    v4 = alloc(stub, "pods", "w", SINGLE, [V4]).allocation.addresses[0].ip
    up = alloc(stub, "pods", "w", PREFER, [V4, V6])
    assert up.created and families(up.allocation) == [V4, V6]
    assert up.allocation.addresses[0].ip == v4  # keeps its IPv4 address
    again = alloc(stub, "pods", "w", REQUIRE, [V4, V6])
    assert not again.created and ips(again.allocation) == ips(up.allocation)
    released = stub.Release(pb.ReleaseRequest(pool="pods", owner="w", ip_families=[V6]))
    assert [a.family for a in released.released] == [V6]
    left = stub.GetAllocation(pb.GetAllocationRequest(pool="pods", owner="w"))
    assert ips(left) == [v4]


def test_specific_addresses(stub):
    stub.CreatePool(pool("pods", pb.IpRange(cidr="198.18.0.0/24", gateway="198.18.0.1",
                                            exclude=["198.18.0.128/25"]), "fd00::/120"))
    got = alloc(stub, "pods", "a", REQUIRE, [V4, V6], ["198.18.0.77", "fd00::77"]).allocation
    assert ips(got) == ["198.18.0.77", "fd00::77"]
    again = alloc(stub, "pods", "a", REQUIRE, [V4, V6], ["198.18.0.77", "fd00::77"])
    assert not again.created
    expect_error(lambda r: alloc(stub, "pods", "b", SINGLE, [V4], ["198.18.0.77"]), None,
                 C.ALREADY_EXISTS, "ADDRESS_IN_USE", "addresses[0]: 198.18.0.77 is held by owner 'a'")
    expect_error(lambda r: alloc(stub, "pods", "b", SINGLE, [V4], ["198.18.1.5"]), None,
                 C.INVALID_ARGUMENT, "INVALID_ARGUMENT", "outside the pool's ranges")
    expect_error(lambda r: alloc(stub, "pods", "b", SINGLE, [V4], ["198.18.0.200"]), None,
                 C.INVALID_ARGUMENT, "INVALID_ARGUMENT", "is excluded")
    expect_error(lambda r: alloc(stub, "pods", "b", SINGLE, [V4], ["198.18.0.1"]), None,
                 C.INVALID_ARGUMENT, "INVALID_ARGUMENT", "is the gateway")
    expect_error(lambda r: alloc(stub, "pods", "b", SINGLE, [V4], ["198.18.0.0"]), None,
                 C.INVALID_ARGUMENT, "INVALID_ARGUMENT", "network address")
    expect_error(lambda r: alloc(stub, "pods", "a", REQUIRE, [V4, V6], ["198.18.0.78"]), None,
                 C.FAILED_PRECONDITION, "OWNER_HOLDS_OTHER_ADDRESS", "already holds 198.18.0.77")
    # A specific address never comes out of the dynamic allocator afterwards.
    seen = {ips(alloc(stub, "pods", f"d{i}", SINGLE, [V4]).allocation)[0] for i in range(60)}
    assert "198.18.0.77" not in seen


def test_never_hands_out_reserved_addresses_until_full(stub):
    stub.CreatePool(pool("small", pb.IpRange(cidr="198.18.0.0/28", gateway="198.18.0.1", first="198.18.0.2",
                                             last="198.18.0.13", exclude=["198.18.0.4/31"])))
    got = set()
    while True:
        try:
            got.add(alloc(stub, "small", f"o{len(got)}", SINGLE).allocation.addresses[0].ip)
        except grpc.RpcError as e:
            assert e.code() == C.RESOURCE_EXHAUSTED
            break
    expected = {f"198.18.0.{i}" for i in range(2, 14)} - {"198.18.0.4", "198.18.0.5"}
    assert got == expected


def test_release_is_idempotent(stub):
    stub.CreatePool(pool("pods", "198.18.0.0/24", "fd00::/120"))
    assert list(stub.Release(pb.ReleaseRequest(pool="pods", owner="nobody")).released) == []
    a = alloc(stub, "pods", "a").allocation
    released = stub.Release(pb.ReleaseRequest(pool="pods", owner="a"))
    assert sorted(x.ip for x in released.released) == sorted(ips(a))
    assert list(stub.Release(pb.ReleaseRequest(pool="pods", owner="a")).released) == []
    expect_error(stub.GetAllocation, pb.GetAllocationRequest(pool="pods", owner="a"), C.NOT_FOUND,
                 "ALLOCATION_NOT_FOUND", "owner")
    assert usage(stub, "pods")[V4][1] == 0


def test_released_addresses_are_reused_at_capacity(stub):
    stub.CreatePool(pool("tiny", "198.18.0.0/30", "fd00::/126", cooldown=0))
    alloc(stub, "tiny", "a")
    alloc(stub, "tiny", "b")
    expect_error(lambda r: alloc(stub, "tiny", "c"), None, C.RESOURCE_EXHAUSTED)
    stub.Release(pb.ReleaseRequest(pool="tiny", owner="a"))
    assert len(alloc(stub, "tiny", "c").allocation.addresses) == 2


def test_list_allocations_pages(stub):
    stub.CreatePool(pool("pods", "198.18.0.0/24", "fd00::/120"))
    owners = [f"owner-{i:02d}" for i in range(7)]
    for o in owners:
        alloc(stub, "pods", o)
    seen, token = [], ""
    while True:
        page = stub.ListAllocations(pb.ListAllocationsRequest(pool="pods", page_size=3, page_token=token))
        seen += [a.owner for a in page.allocations]
        assert all(len(a.addresses) == 2 for a in page.allocations)
        token = page.next_page_token
        if not token:
            break
    assert seen == owners


def test_delete_pool_with_allocations_needs_force(stub, clean_db):
    stub.CreatePool(pool("pods", "198.18.0.0/24", "fd00::/120"))
    alloc(stub, "pods", "a")
    expect_error(stub.DeletePool, pb.DeletePoolRequest(name="pods"), C.FAILED_PRECONDITION, "POOL_HAS_ALLOCATIONS",
                 "1 allocation")
    assert stub.GetAllocation(pb.GetAllocationRequest(pool="pods", owner="a")).owner == "a"
    stub.DeletePool(pb.DeletePoolRequest(name="pods", force=True))
    assert psql(clean_db, "SELECT count(*) FROM ipam_allocations") == "0"
    assert psql(clean_db, "SELECT count(*) FROM ipam_blocks") == "0"


def test_garbage_collect_respects_valid_owners_and_grace(stub):
    from google.protobuf import duration_pb2

    stub.CreatePool(pool("pods", "198.18.0.0/24", "fd00::/120"))
    for o in ("live", "leaked"):
        alloc(stub, "pods", o)
    kept = stub.GarbageCollect(pb.GarbageCollectRequest(pool="pods", valid_owners=["live"]))
    assert list(kept.released) == []  # both younger than the default 60 s grace
    gone = stub.GarbageCollect(pb.GarbageCollectRequest(pool="pods", valid_owners=["live"],
                                                        grace=duration_pb2.Duration(seconds=0)))
    assert [a.owner for a in gone.released] == ["leaked"]
    assert stub.GetAllocation(pb.GetAllocationRequest(pool="pods", owner="live")).owner == "live"
    assert usage(stub, "pods")[V4][1] == 1
