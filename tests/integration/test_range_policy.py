"""Issue 17, findings 6-8 at the RPC level: the range policy, the overlap policy (pool networks)
and zone IDs. Real server, real PostgreSQL; every refusal changes nothing in the database."""

from __future__ import annotations

import ipaddress
import itertools
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_helpers import PREFER, REQUIRE, SINGLE, V4, V6, error_info, ips, pool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import psql, running_server, scratch_database

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

C = grpc.StatusCode

SNAPSHOT_SQL = """
SELECT md5(coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM ipam_pools t), '') ||
           coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM ipam_ranges t), '') ||
           coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM ipam_blocks t), '') ||
           coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM ipam_reservations t), '') ||
           coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM ipam_allocations t), ''))
"""
# Pairs of ranges of different pools in one network that overlap: must always be none.
OVERLAPS_SQL = """
SELECT count(*) FROM ipam_ranges a JOIN ipam_ranges b
    ON a.network = b.network AND a.pool_id < b.pool_id AND a.cidr && b.cidr
"""


def _pool_in(name: str, network: str, *ranges: str) -> pb.CreatePoolRequest:
    request = pool(name, *ranges)
    request.pool.network = network
    return request


def _fails(call, request, code: grpc.StatusCode) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(request)
    assert err.value.code() == code, (err.value.code(), err.value.details())
    return err.value


# -- finding 6: the range policy ---------------------------------------------------------------

REFUSED = [
    ("0.0.0.0/0", "is a /0"),
    ("::/0", "is a /0"),
    ("127.0.0.0/8", "127.0.0.0/8 is loopback (RFC 1122); pods cannot hold it"),
    ("0.0.0.0/8", '"this network"'),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/24", "multicast"),
    ("240.0.0.0/24", "reserved"),
    ("255.255.255.255/32", "limited broadcast"),
    ("192.0.2.0/24", "documentation-only"),
    ("198.51.100.0/24", "documentation-only"),
    ("203.0.113.0/24", "documentation-only"),
    ("::1/128", "loopback"),
    ("fe80::/64", "link-local"),
    ("ff02::/120", "multicast"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("2001:db8::/64", "documentation-only"),
    ("3fff::/64", "documentation-only"),
]


@pytest.mark.parametrize(("cidr", "words"), REFUSED, ids=[c for c, _ in REFUSED])
def test_ranges_pods_cannot_hold_are_refused_on_create_and_add(stub, clean_db, cidr, words):
    stub.CreatePool(pool("keep", "198.18.0.0/24", "fd00::/120"))
    before = psql(clean_db, SNAPSHOT_SQL)
    err = _fails(stub.CreatePool, pool("bad", "198.18.1.0/24", cidr), C.INVALID_ARGUMENT)
    assert err.details().startswith("pool.ranges[1].cidr: "), err.details()
    assert words in err.details() and err.details().endswith("pods cannot hold it"), err.details()
    assert error_info(err).reason == "RANGE_NOT_ALLOWED"
    assert error_info(err).metadata["field"] == "pool.ranges[1].cidr"
    err = _fails(stub.AddPoolRange, pb.AddPoolRangeRequest(pool="keep", range=pb.IpRange(cidr=cidr)),
                 C.INVALID_ARGUMENT)
    assert err.details().startswith("range.cidr: ") and words in err.details(), err.details()
    assert psql(clean_db, SNAPSHOT_SQL) == before


def test_slash_zero_hands_out_nothing_and_benchmarking_and_ula_ranges_stay_allowed(stub, clean_db):
    # The finding: 0.0.0.0/0 was accepted and handed out 0.0.4.0/0, and --ip 127.0.0.1 worked.
    _fails(stub.CreatePool, pool("all", "0.0.0.0/0"), C.INVALID_ARGUMENT)
    _fails(stub.CreatePool, pool("all6", "::/0"), C.INVALID_ARGUMENT)
    assert psql(clean_db, "SELECT count(*) FROM ipam_pools") == "0"
    created = stub.CreatePool(pool("bench", "198.18.0.0/15", "fd00::/8"))
    assert [r.cidr for r in created.ranges] == ["198.18.0.0/15", "fd00::/8"]
    got = stub.Allocate(pb.AllocateRequest(pool="bench", owner="o", ip_family_policy=REQUIRE)).allocation
    v4, v6 = (ipaddress.ip_address(a) for a in ips(got))
    assert v4 in ipaddress.ip_network("198.18.0.0/15") and v6 in ipaddress.ip_network("fd00::/8")


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0", "255.255.255.255", "224.0.0.1", "::1", "fe80::1", "::",
                                     "::ffff:198.18.0.5", "198.19.0.5", "fd01::5"])
def test_specific_addresses_outside_the_pool_are_refused(stub, clean_db, address):
    stub.CreatePool(pool("pods", "198.18.0.0/24", "fd00::/120"))
    before = psql(clean_db, SNAPSHOT_SQL)
    err = _fails(stub.Allocate, pb.AllocateRequest(pool="pods", owner="o", addresses=[address]), C.INVALID_ARGUMENT)
    assert err.details().startswith("addresses[0]: "), err.details()
    assert psql(clean_db, SNAPSHOT_SQL) == before


# -- finding 8: zone IDs -----------------------------------------------------------------------

HOSTILE = "fd70::6%a b\nc<script>"


def test_zone_ids_in_allocate_are_refused_and_the_plain_address_then_works(stub, clean_db):
    stub.CreatePool(pool("zones", "198.18.0.0/24", "fd70::/120"))
    before = psql(clean_db, SNAPSHOT_SQL)
    request = pb.AllocateRequest(pool="zones", owner="c1/eth0", ip_family_policy=SINGLE, ip_families=[V6],
                                 addresses=[HOSTILE])
    for _ in range(2):  # the retry is refused the same way (it was FAILED_PRECONDITION)
        err = _fails(stub.Allocate, request, C.INVALID_ARGUMENT)
        assert err.details().startswith("addresses[0]: "), err.details()
        assert "zone IDs are not allowed" in err.details()
        assert "\n" not in err.details() and "<script>" in repr(err.details())  # echoed escaped, one line
        assert error_info(err).metadata["field"] == "addresses[0]"
    assert psql(clean_db, SNAPSHOT_SQL) == before
    err = _fails(stub.Allocate, pb.AllocateRequest(pool="zones", owner="o", ip_family_policy=PREFER,
                                                   addresses=["198.18.0.9", "fe80::1%eth0"]), C.INVALID_ARGUMENT)
    assert err.details().startswith("addresses[1]: ") and "zone IDs are not allowed" in err.details()
    plain = pb.AllocateRequest(pool="zones", owner="c1/eth0", ip_family_policy=SINGLE, ip_families=[V6],
                               addresses=["fd70::6"])
    assert ips(stub.Allocate(plain).allocation) == ["fd70::6"]
    again = stub.Allocate(plain)
    assert ips(again.allocation) == ["fd70::6"] and not again.created


def test_zone_ids_are_refused_in_every_field_that_takes_an_address(stub, clean_db):
    stub.CreatePool(pool("zones", "198.18.0.0/24", "fd70::/120"))
    before = psql(clean_db, SNAPSHOT_SQL)
    cases = [
        (stub.CreatePool, pool("z2", "fd71::%eth0/120"), "pool.ranges[0].cidr"),
        (stub.CreatePool, pool("z2", pb.IpRange(cidr="fd71::/120", gateway="fd71::1%eth0")), "pool.ranges[0].gateway"),
        (stub.CreatePool, pool("z2", pb.IpRange(cidr="fd71::/120", first="fd71::5%1")), "pool.ranges[0].first"),
        (stub.CreatePool, pool("z2", pb.IpRange(cidr="fd71::/120", last="fd71::9%1")), "pool.ranges[0].last"),
        (stub.CreatePool, pool("z2", pb.IpRange(cidr="fd71::/120", exclude=["fd71::8%1"])),
         "pool.ranges[0].exclude[0]"),
        (stub.AddPoolRange, pb.AddPoolRangeRequest(pool="zones", range=pb.IpRange(cidr="fd72::%x/120")), "range.cidr"),
        (stub.ReserveAddresses, pb.ReserveAddressesRequest(pool="zones", addresses=["fd70::7%eth0"]), "addresses[0]"),
        (stub.ReserveAddresses, pb.ReserveAddressesRequest(pool="zones", addresses=["fd70::%e/126"]), "addresses[0]"),
        (stub.UnreserveAddresses, pb.UnreserveAddressesRequest(pool="zones", addresses=["fd70::7%1"]),
         "addresses[0]"),
        (stub.RemovePoolRange, pb.RemovePoolRangeRequest(pool="zones", cidr="fd70::%eth0/120"), "cidr"),
    ]
    for call, request, field in cases:
        err = _fails(call, request, C.INVALID_ARGUMENT)
        assert err.details().startswith(field + ": ") and "zone IDs are not allowed" in err.details(), err.details()
    assert psql(clean_db, SNAPSHOT_SQL) == before


# -- finding 7: the overlap policy -------------------------------------------------------------


def test_pools_of_one_network_do_not_overlap(stub, clean_db):
    stub.CreatePool(pool("a", "198.18.0.0/24", "fd00:1::/120"))
    before = psql(clean_db, SNAPSHOT_SQL)
    err = _fails(stub.CreatePool, pool("b", "198.18.0.0/25"), C.FAILED_PRECONDITION)
    assert err.details().startswith(
        "pool.ranges[0].cidr: 198.18.0.0/25 overlaps 198.18.0.0/24 of pool 'a' in the default network"
    ), err.details()
    info = error_info(err)
    assert info.reason == "POOLS_OVERLAP"
    assert (info.metadata["pool"], info.metadata["cidr"], info.metadata["field"]) == (
        "a", "198.18.0.0/24", "pool.ranges[0].cidr")
    err = _fails(stub.CreatePool, pool("b", "198.18.1.0/24", "fd00:1::80/121"), C.FAILED_PRECONDITION)
    assert err.details().startswith("pool.ranges[1].cidr: fd00:1::80/121 overlaps fd00:1::/120 of pool 'a'")
    err = _fails(stub.CreatePool, pool("b", "198.18.0.0/16"), C.FAILED_PRECONDITION)  # a supernet overlaps too
    assert "of pool 'a'" in err.details()
    assert psql(clean_db, SNAPSHOT_SQL) == before

    # AddPoolRange: the same rule for a range added to a live pool.
    stub.CreatePool(pool("c", "198.18.1.0/24"))
    before = psql(clean_db, SNAPSHOT_SQL)
    err = _fails(stub.AddPoolRange, pb.AddPoolRangeRequest(pool="c", range=pb.IpRange(cidr="198.18.0.128/25")),
                 C.FAILED_PRECONDITION)
    assert err.details().startswith("range.cidr: 198.18.0.128/25 overlaps 198.18.0.0/24 of pool 'a'"), err.details()
    assert psql(clean_db, SNAPSHOT_SQL) == before

    # Once 'a' is gone its space is free again.
    stub.DeletePool(pb.DeletePoolRequest(name="a"))
    stub.AddPoolRange(pb.AddPoolRangeRequest(pool="c", range=pb.IpRange(cidr="198.18.0.128/25")))
    stub.CreatePool(pool("b", "198.18.0.0/25"))
    assert psql(clean_db, OVERLAPS_SQL) == "0"


def test_pools_in_different_networks_may_overlap_and_keep_their_network(stub, clean_db):
    a = stub.CreatePool(pool("a", "198.18.0.0/24", "fd00:1::/120"))
    assert a.network == ""
    b = stub.CreatePool(_pool_in("b", "lab", "198.18.0.0/25", "fd00:1::/120"))
    assert b.network == "lab"
    err = _fails(stub.CreatePool, _pool_in("c", "lab", "198.18.0.64/26"), C.FAILED_PRECONDITION)
    assert "of pool 'b' in network 'lab'" in err.details(), err.details()
    same = ["198.18.0.9", "fd00:1::9"]  # one address in two address spaces
    for name in ("a", "b"):
        got = stub.Allocate(pb.AllocateRequest(pool=name, owner="o", ip_family_policy=REQUIRE, addresses=same))
        assert ips(got.allocation) == same
    # A range added to 'b' is checked against network 'lab' only.
    stub.AddPoolRange(pb.AddPoolRangeRequest(pool="b", range=pb.IpRange(cidr="198.18.0.128/25")))
    assert stub.GetPool(pb.GetPoolRequest(name="b")).network == "lab"
    assert {p.name: p.network for p in stub.ListPools(pb.ListPoolsRequest()).pools} == {"a": "", "b": "lab"}
    assert psql(clean_db, "SELECT string_agg(DISTINCT r.network, ',') FROM ipam_ranges r JOIN ipam_pools p "
                          "ON p.id = r.pool_id WHERE p.name = 'b'") == "lab"
    # The network is fixed at creation.
    update = pb.UpdatePoolRequest(pool=pb.Pool(name="b", network="other"))
    update.update_mask.paths.append("network")
    err = _fails(stub.UpdatePool, update, C.INVALID_ARGUMENT)
    assert err.details().startswith("update_mask: 'network' cannot be updated")


def test_creating_an_existing_pool_again_is_already_exists_not_an_overlap(stub, clean_db):
    # The same request twice (a retried create): the pool's name decides, not its ranges, which
    # overlap only the pool itself.
    request = pool("again", "198.18.0.0/24", "fd00:1::/120")
    stub.CreatePool(request)
    err = _fails(stub.CreatePool, request, C.ALREADY_EXISTS)
    assert "pool.name: pool 'again' already exists" in err.details(), err.details()
    assert error_info(err).reason != "POOLS_OVERLAP"


def test_the_network_name_default_is_reserved(stub, clean_db):
    # An outside review: "default" was a network of its own beside the default network "", so a
    # pool written with network: default could overlap a pool of the default network.
    stub.CreatePool(pool("p1", "198.18.0.0/24"))
    err = _fails(stub.CreatePool, _pool_in("p2", "default", "198.18.0.0/26"), C.INVALID_ARGUMENT)
    assert "pool.network: 'default' is reserved" in err.details(), err.details()
    assert [p.name for p in stub.ListPools(pb.ListPoolsRequest()).pools] == ["p1"]


@pytest.mark.parametrize("network", ["Lab", "-x", "a b", "x" * 129, "a/b", "ü"])
def test_bad_network_names_are_refused(stub, clean_db, network):
    err = _fails(stub.CreatePool, _pool_in("p", network, "198.18.0.0/24"), C.INVALID_ARGUMENT)
    assert err.details().startswith("pool.network: "), err.details()
    assert psql(clean_db, "SELECT count(*) FROM ipam_pools") == "0"


def _race(target: str, calls: list) -> list[grpc.StatusCode]:  # type: ignore[type-arg]
    """Runs each (method name, request) at once from its own channel; returns the codes."""
    barrier = threading.Barrier(len(calls))
    codes: list[grpc.StatusCode | None] = [None] * len(calls)

    def run(i: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = ipam_pb2_grpc.IpamServiceStub(channel)
            grpc.channel_ready_future(channel).result(timeout=10)
            method, request = calls[i]
            barrier.wait()
            try:
                getattr(stub, method)(request, timeout=30)
                codes[i] = C.OK
            except grpc.RpcError as exc:
                codes[i] = exc.code()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes  # type: ignore[return-value]


def test_concurrent_overlapping_creates_never_both_succeed(stub, target, clean_db, server_proc):
    # Every shape holds 198.18.n.64: any two of them overlap, so exactly one may win a round.
    shapes = ["198.18.{n}.0/24", "198.18.{n}.0/25", "198.18.{n}.64/26", "198.18.{n}.0/23", "198.18.{n}.64/27",
              "198.18.{n}.64/30"]
    for round_ in range(6):
        n = 20 + 2 * round_
        calls = [("CreatePool", pool(f"race{round_}-{i}", shape.format(n=n), f"fd00:{round_ + 1}:{i}::/120"))
                 for i, shape in enumerate(shapes)]
        codes = _race(target, calls)
        assert codes.count(C.OK) == 1, codes
        assert set(codes) == {C.OK, C.FAILED_PRECONDITION}, codes
    # A create racing AddPoolRanges of other pools for the same space: one wins.
    for name, cidr in (("live1", "198.18.60.0/24"), ("live2", "198.18.61.0/24")):
        stub.CreatePool(pool(name, cidr))
    calls = [("CreatePool", pool("newcomer", "198.18.62.0/24")),
             ("AddPoolRange", pb.AddPoolRangeRequest(pool="live1", range=pb.IpRange(cidr="198.18.62.0/25"))),
             ("AddPoolRange", pb.AddPoolRangeRequest(pool="live2", range=pb.IpRange(cidr="198.18.62.128/25")))]
    codes = _race(target, calls)
    assert codes.count(C.FAILED_PRECONDITION) >= 1 and C.OK in codes, codes
    assert set(codes) <= {C.OK, C.FAILED_PRECONDITION}, codes
    assert psql(clean_db, OVERLAPS_SQL) == "0"
    # The network lock decided every race: the exclusion constraint (the backstop) never fired.
    assert "ex_ipam_ranges_network_cidr" not in server_proc.log()


# -- hypothesis: random CIDRs and addresses through the validation ---------------------------

_SPECIAL = ["0.0.0.0/0", "::/0", "127.0.0.0/8", "224.0.0.0/4", "fe80::/10", "::ffff:0:0/96", "2001:db8::/32",
            "192.0.2.0/24", "255.255.255.255/32", "240.0.0.0/4", "169.254.0.0/16", "3fff::/20", "::1/128", "::/128"]
_V4 = st.builds(lambda n, p: str(ipaddress.ip_network((n, p), strict=False)), st.integers(0, 2**32 - 1),
                st.integers(0, 32))
_OURS = st.builds(lambda a, p: f"198.{18 + (a >> 8 & 1)}.{a & 255}.0/{p}", st.integers(0, 511), st.integers(15, 24))
_OURS6 = st.builds(lambda a, p: f"fd00:{a:x}::/{p}", st.integers(0, 0xFFFF), st.integers(8, 126))
_CIDRS = st.one_of(st.sampled_from(_SPECIAL), _V4, _OURS, _OURS6,
                   st.builds(lambda c, z: c.replace("/", f"%{z}/"), _OURS6, st.text(max_size=6)),
                   st.text(max_size=20))
_ADDRESSES = st.one_of(st.sampled_from(["127.0.0.1", "::1", "fe80::1%eth0", "0.0.0.0", "198.18.0.1", "fd00::1",
                                        HOSTILE, "::ffff:198.18.0.1", "224.0.0.1", "198.18.0.0", "fd00::"]),
                       st.builds(lambda a: f"198.18.{a >> 8 & 255}.{a & 255}", st.integers(0, 65535)),
                       st.builds(lambda a, z: f"fd00::{a:x}%{z}", st.integers(0, 0xFFFF), st.text(max_size=5)),
                       st.text(max_size=16))
_counter = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cidrs=st.lists(_CIDRS, min_size=1, max_size=3), address=_ADDRESSES, network=st.sampled_from(["", "h"]))
def test_random_ranges_and_addresses_get_clean_answers(stub, clean_db, cidrs, address, network):
    clean = {C.OK, C.INVALID_ARGUMENT, C.FAILED_PRECONDITION}
    name = f"hyp-{next(_counter)}"
    try:
        stub.CreatePool(_pool_in(name, network, *cidrs))
    except grpc.RpcError as exc:
        assert exc.code() in clean, (cidrs, exc.code(), exc.details())
        assert "internal" not in exc.details().lower()
        return
    try:
        for call, request in (
            (stub.Allocate, pb.AllocateRequest(pool=name, owner="o", ip_family_policy=PREFER, addresses=[address])),
            (stub.ReserveAddresses, pb.ReserveAddressesRequest(pool=name, addresses=[address])),
            (stub.AddPoolRange, pb.AddPoolRangeRequest(pool=name, range=pb.IpRange(cidr=address))),
        ):
            try:
                call(request)
            except grpc.RpcError as exc:
                assert exc.code() in clean, (cidrs, address, exc.code(), exc.details())
    finally:
        stub.DeletePool(pb.DeletePoolRequest(name=name, force=True))
    assert psql(clean_db, OVERLAPS_SQL) == "0"


# -- the migration: overlapping pools of an older database -----------------------------------


def _alembic(url: str, action: str, revision: str) -> None:
    code = ("import sys; from alembic import command; from dsipam.server.migrate import alembic_config; "
            f"command.{action}(alembic_config(sys.argv[1]), {revision!r})")
    subprocess.run([sys.executable, "-c", code, url], check=True, capture_output=True, text=True)


ALLOCS_SQL = ("SELECT string_agg(p.name || ':' || a.owner || ':' || coalesce(host(a.ipv4), '-') || ':' || "
              "coalesce(host(a.ipv6), '-'), ',' ORDER BY p.name, a.owner) FROM ipam_allocations a "
              "JOIN ipam_pools p ON p.id = a.pool_id")


def test_migration_moves_overlapping_pools_to_networks_of_their_own(tmp_path):
    with scratch_database("dsipam_netmig") as url:
        # Pools that overlap, made as an older server made them: same network now, then 0011.
        with running_server(url, tmp_path) as server, grpc.insecure_channel(server.target) as channel:
            stub = ipam_pb2_grpc.IpamServiceStub(channel)
            stub.CreatePool(pool("a", "198.18.0.0/24", "fd00:1::/120"))
            stub.CreatePool(_pool_in("b", "x", "198.18.0.0/25"))
            stub.CreatePool(_pool_in("c", "y", "198.18.0.128/25", "fd00:1::/124"))
            stub.CreatePool(pool("d", "198.18.1.0/24"))
            stub.CreatePool(_pool_in("e", "z", "198.18.1.0/26", "fd00:2::/120"))  # overlaps d, not a
            for name in "abcde":
                for owner in ("o1", "o2"):
                    stub.Allocate(pb.AllocateRequest(pool=name, owner=owner, ip_family_policy=PREFER))
        _alembic(url, "downgrade", "0011")
        assert psql(url, "SELECT version_num FROM alembic_version") == "0011"
        allocations = psql(url, ALLOCS_SQL)
        assert allocations.count("198.18.0.1:") >= 2  # one address held twice: the finding
        blocks = psql(url, "SELECT count(*) FROM ipam_blocks")

        done = subprocess.run([sys.executable, "-m", "dsipam.server", "migrate", "--database-url", url],
                              capture_output=True, text=True, check=True)
        report = done.stderr
        for moved, other in (("b", "a"), ("c", "a"), ("e", "d")):
            assert f"pool '{moved}' overlaps pool '{other}'" in report, report
            assert f"network 'migrated-{moved}'" in report, report
        assert "pool 'a' overlaps" not in report and "pool 'd' overlaps" not in report
        networks = psql(url, "SELECT string_agg(name || '=' || network, ',' ORDER BY name) FROM ipam_pools")
        assert networks == "a=,b=migrated-b,c=migrated-c,d=,e=migrated-e"
        assert psql(url, "SELECT count(*) FROM ipam_ranges r JOIN ipam_pools p ON p.id = r.pool_id "
                         "WHERE r.network <> p.network") == "0"
        assert psql(url, ALLOCS_SQL) == allocations  # nothing lost
        assert psql(url, "SELECT count(*) FROM ipam_blocks") == blocks
        assert psql(url, OVERLAPS_SQL) == "0"
        for name in "abcde":
            out = subprocess.run([sys.executable, "-m", "dsipam.server", "fsck", name, "--database-url", url],
                                 capture_output=True, text=True)
            assert out.returncode == 0 and "clean" in out.stdout, (name, out.stdout, out.stderr)

        with running_server(url, tmp_path) as server, grpc.insecure_channel(server.target) as channel:
            stub = ipam_pb2_grpc.IpamServiceStub(channel)
            assert stub.GetPool(pb.GetPoolRequest(name="b")).network == "migrated-b"
            got = stub.Allocate(pb.AllocateRequest(pool="b", owner="o1", ip_family_policy=PREFER)).allocation
            assert ips(got) == ["198.18.0.1"]  # the owner keeps what it held
            new = stub.Allocate(pb.AllocateRequest(pool="b", owner="o3", ip_family_policy=PREFER)).allocation
            assert new.addresses[0].family == V4
            # The default network is still guarded after the migration.
            with pytest.raises(grpc.RpcError) as err:
                stub.CreatePool(pool("f", "198.18.0.0/25"))
            assert err.value.code() == C.FAILED_PRECONDITION and "of pool 'a'" in err.value.details()
