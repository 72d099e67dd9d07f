"""Cost does not grow with range size: a /8 + /48 pool is cheap to create and to use."""

import time

from grpc_helpers import REQUIRE, pool
from support import psql

from dsipam.v1 import ipam_pb2 as pb

STORAGE_SQL = """
SELECT sum(pg_total_relation_size(c.oid))
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname LIKE 'ipam_%'
"""
ROWS_SQL = "SELECT (SELECT count(*) FROM ipam_ranges) || ',' || (SELECT count(*) FROM ipam_blocks)"


def test_huge_pool_is_created_without_per_address_rows(stub, clean_db):
    empty = int(psql(clean_db, STORAGE_SQL))
    started = time.monotonic()
    created = stub.CreatePool(pool("huge", "198.18.0.0/15", "fd00::/48"))
    elapsed = time.monotonic() - started
    sizes = {u.family: u.size for u in created.usage}
    assert sizes == {pb.IP_FAMILY_IPV4: 2**17 - 2, pb.IP_FAMILY_IPV6: 2**64 - 1}  # saturated
    assert psql(clean_db, ROWS_SQL) == "2,0"  # two range rows, no block yet
    after_create = int(psql(clean_db, STORAGE_SQL))
    print(f"create took {elapsed * 1000:.1f} ms; storage grew by {after_create - empty} bytes")
    assert after_create - empty < 64 * 1024  # at most a few pages

    owners = 1000
    for i in range(owners):
        stub.Allocate(pb.AllocateRequest(pool="huge", owner=f"o{i}", ip_family_policy=REQUIRE))
    blocks = int(psql(clean_db, "SELECT count(*) FROM ipam_blocks"))
    needed = 2 * (owners // 64 + 1)  # 64-address blocks per family, created as needed...
    assert needed <= blocks <= needed + 2 * 16  # ...plus at most 16 spare ones per family, made ahead of need
    psql(clean_db, "VACUUM ANALYZE")
    grown = int(psql(clean_db, STORAGE_SQL)) - empty
    print(f"{owners} pairs: {blocks} blocks, {grown} bytes in all")
    assert grown < 1024 * 1024
    usage = {u.family: u.allocated for u in stub.GetPool(pb.GetPoolRequest(name="huge")).usage}
    assert usage == {pb.IP_FAMILY_IPV4: owners, pb.IP_FAMILY_IPV6: owners}


def test_finding_a_free_address_in_a_nearly_full_range(stub, clean_db):
    """Fill all but one address of a /22 range, then allocate: it finds the last hole."""
    stub.CreatePool(pool("full", pb.IpRange(cidr="198.18.0.0/22", block_size=256)))
    n = 1022
    for i in range(n - 1):
        stub.Allocate(pb.AllocateRequest(pool="full", owner=f"o{i}"))
    last = stub.Allocate(pb.AllocateRequest(pool="full", owner="last"))
    assert last.allocation.addresses[0].ip
    assert psql(clean_db, "SELECT sum(free_count) FROM ipam_blocks") == "0"
    assert psql(clean_db, "SELECT count(*) FROM ipam_blocks") == "4"
