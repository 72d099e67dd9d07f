"""Bad input gets a clear status naming the field, and changes nothing in the database."""

import grpc
import pytest
from grpc_helpers import REQUIRE, SINGLE, V4, V6, error_info, pool
from support import psql

from dsipam.v1 import ipam_pb2 as pb

C = grpc.StatusCode

SNAPSHOT_SQL = """
SELECT md5(coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM ipam_pools t), '') ||
           coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM ipam_ranges t), '') ||
           coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM ipam_blocks t), '') ||
           coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM ipam_allocations t), ''))
"""

CREATE_CASES = [
    ("malformed cidr", pool("bad", "198.18.0.0/40"), "pool.ranges[0].cidr"),
    ("not a cidr", pool("bad", "not-an-ip"), "pool.ranges[0].cidr"),
    ("host bits", pool("bad", "198.18.0.7/24"), "pool.ranges[0].cidr"),
    ("gateway outside", pool("bad", pb.IpRange(cidr="198.18.0.0/24", gateway="198.18.9.1")), "pool.ranges[0].gateway"),
    ("gateway wrong family", pool("bad", pb.IpRange(cidr="fd00::/120", gateway="198.18.0.1")), "pool.ranges[0].gateway"),
    ("first wrong family", pool("bad", pb.IpRange(cidr="198.18.0.0/24", first="fd00::1")), "pool.ranges[0].first"),
    ("exclude wrong family", pool("bad", "198.18.0.0/24", pb.IpRange(cidr="fd00::/120", exclude=["198.18.0.0/30"])),
     "pool.ranges[1].exclude[0]"),
    ("overlap", pool("bad", "198.18.0.0/24", "198.18.0.0/25"), "pool.ranges[1].cidr"),
    ("no ranges", pool("bad"), "pool.ranges"),
    ("bad name", pool("Bad_Name", "198.18.0.0/24"), "pool.name"),
    ("long name", pool("a" * 64, "198.18.0.0/24"), "pool.name"),
    ("block size", pool("bad", pb.IpRange(cidr="198.18.0.0/24", block_size=100)), "pool.ranges[0].block_size"),
    ("zone id in cidr", pool("bad", "fd00:1::%eth0/120"), "pool.ranges[0].cidr"),
    ("zone id in gateway", pool("bad", pb.IpRange(cidr="fd00:1::/120", gateway="fd00:1::1%eth0")),
     "pool.ranges[0].gateway"),
]


@pytest.mark.parametrize(("what", "request_", "field"), CREATE_CASES, ids=[c[0] for c in CREATE_CASES])
def test_bad_create_pool(stub, clean_db, what, request_, field):
    stub.CreatePool(pool("keep", "198.19.0.0/24", "fd00:9::/120"))
    before = psql(clean_db, SNAPSHOT_SQL)
    with pytest.raises(grpc.RpcError) as err:
        stub.CreatePool(request_)
    assert err.value.code() == C.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()
    assert error_info(err.value).reason == "INVALID_ARGUMENT"
    assert error_info(err.value).metadata["field"] == field
    assert psql(clean_db, SNAPSHOT_SQL) == before
    assert psql(clean_db, "SELECT count(*) FROM ipam_pools WHERE name <> 'keep'") == "0"


ALLOC_CASES = [
    ("unknown pool", dict(pool="nope", owner="o"), C.NOT_FOUND, "pool"),
    ("overlong owner", dict(pool="pods", owner="x" * 254), C.INVALID_ARGUMENT, "owner"),
    ("empty owner", dict(pool="pods", owner=""), C.INVALID_ARGUMENT, "owner"),
    ("non-printable owner", dict(pool="pods", owner="a b"), C.INVALID_ARGUMENT, "owner"),
    ("duplicate family in addresses", dict(pool="pods", owner="o", ip_family_policy=REQUIRE,
                                           addresses=["198.18.0.5", "198.18.0.6"]), C.INVALID_ARGUMENT, "addresses[1]"),
    ("mixed-up family", dict(pool="pods", owner="o", ip_family_policy=SINGLE, ip_families=[V4],
                             addresses=["fd00::5"]), C.INVALID_ARGUMENT, "addresses[0]"),
    ("malformed address", dict(pool="pods", owner="o", addresses=["198.18.0.300"]), C.INVALID_ARGUMENT,
     "addresses[0]"),
    ("address outside", dict(pool="pods", owner="o", addresses=["198.19.0.5"]), C.INVALID_ARGUMENT, "addresses[0]"),
    ("loopback address", dict(pool="pods", owner="o", addresses=["127.0.0.1"]), C.INVALID_ARGUMENT, "addresses[0]"),
    ("zone id", dict(pool="pods", owner="o", addresses=["fd00::6%a b\nc<script>"]), C.INVALID_ARGUMENT,
     "addresses[0]"),
    ("zone id second", dict(pool="pods", owner="o", ip_family_policy=REQUIRE,
                            addresses=["198.18.0.9", "fd00::6%eth0"]), C.INVALID_ARGUMENT, "addresses[1]"),
    ("duplicate ip_families", dict(pool="pods", owner="o", ip_families=[V6, V6]), C.INVALID_ARGUMENT,
     "ip_families[1]"),
    ("unknown family", dict(pool="pods", owner="o", ip_families=[7]), C.INVALID_ARGUMENT, "ip_families[0]"),
    ("unknown policy", dict(pool="pods", owner="o", ip_family_policy=9), C.INVALID_ARGUMENT, "ip_family_policy"),
    ("bad pool name", dict(pool="UPPER", owner="o"), C.INVALID_ARGUMENT, "pool"),
    ("too many attributes", dict(pool="pods", owner="o", attributes={f"k{i}": "v" for i in range(65)}),
     C.INVALID_ARGUMENT, "attributes"),
]


@pytest.mark.parametrize(("what", "fields", "code", "field"), ALLOC_CASES, ids=[c[0] for c in ALLOC_CASES])
def test_bad_allocate(stub, clean_db, what, fields, code, field):
    stub.CreatePool(pool("pods", "198.18.0.0/24", "fd00::/120"))
    stub.Allocate(pb.AllocateRequest(pool="pods", owner="existing", ip_family_policy=REQUIRE))
    before = psql(clean_db, SNAPSHOT_SQL)
    with pytest.raises(grpc.RpcError) as err:
        stub.Allocate(pb.AllocateRequest(**fields))
    assert err.value.code() == code, err.value.details()
    assert err.value.details().startswith(field + ":") or f" {field}" in err.value.details(), err.value.details()
    assert error_info(err.value).reason
    assert psql(clean_db, SNAPSHOT_SQL) == before


def test_bad_release_and_gets(stub, clean_db):
    stub.CreatePool(pool("pods", "198.18.0.0/24"))
    before = psql(clean_db, SNAPSHOT_SQL)
    for call, req, code, field in [
        (stub.Release, pb.ReleaseRequest(pool="nope", owner="o"), C.NOT_FOUND, "pool"),
        (stub.Release, pb.ReleaseRequest(pool="pods", owner="o" * 300), C.INVALID_ARGUMENT, "owner"),
        (stub.Release, pb.ReleaseRequest(pool="pods", owner="o", ip_families=[0]), C.INVALID_ARGUMENT,
         "ip_families[0]"),
        (stub.GetPool, pb.GetPoolRequest(name=""), C.INVALID_ARGUMENT, "name"),
        (stub.DeletePool, pb.DeletePoolRequest(name="nope"), C.NOT_FOUND, "name"),
        (stub.ListAllocations, pb.ListAllocationsRequest(pool="pods", page_size=5000), C.INVALID_ARGUMENT,
         "page_size"),
        (stub.ListAllocations, pb.ListAllocationsRequest(pool="pods", page_size=-1), C.INVALID_ARGUMENT, "page_size"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == code, (req, err.value.details())
        assert err.value.details().startswith(field + ":"), err.value.details()
    assert psql(clean_db, SNAPSHOT_SQL) == before
