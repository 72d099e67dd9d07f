"""Address lifecycle: GC, cooldown, reservations, live ranges, migration, usage, filters, watch."""

import threading
import time

import grpc
from google.protobuf import duration_pb2, field_mask_pb2
from grpc_helpers import PREFER, REQUIRE, SINGLE, V4, V6, expect_error, families, ips, next_owners, pool
from support import running_server

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

C = grpc.StatusCode


def alloc(stub, name, owner, policy=REQUIRE, fams=(), addresses=(), **attrs):
    return stub.Allocate(pb.AllocateRequest(pool=name, owner=owner, ip_family_policy=policy, ip_families=fams,
                                            addresses=addresses, attributes=attrs))


def usage(stub, name):
    return {u.family: u for u in stub.GetPool(pb.GetPoolRequest(name=name)).usage}


def fsck_clean(db_url, name):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dsipam.server", "fsck", name, "--database-url", db_url],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# -- cooldown ---------------------------------------------------------------------------


def test_cooldown_holds_released_addresses_and_reports_them(stub, clean_db):
    stub.CreatePool(pool("cool", "198.18.0.0/29", cooldown=60))  # 6 usable
    got = [ips(alloc(stub, "cool", f"o{i}", SINGLE).allocation)[0] for i in range(6)]
    stub.Release(pb.ReleaseRequest(pool="cool", owner="o0"))
    u = usage(stub, "cool")[V4]
    assert (u.size, u.allocated, u.cooldown, u.free) == (6, 5, 1, 0)
    err = expect_error(lambda r: alloc(stub, "cool", "new", SINGLE), None, C.RESOURCE_EXHAUSTED, "POOL_EXHAUSTED")
    assert "'cool'" in err.details()
    # Asking for it explicitly names the cooldown; its last holder may take it back.
    expect_error(lambda r: alloc(stub, "cool", "new", SINGLE, addresses=[got[0]]), None, C.FAILED_PRECONDITION,
                 "ADDRESS_IN_COOLDOWN", "cooldown")
    back = alloc(stub, "cool", "o0", SINGLE, addresses=[got[0]])
    assert ips(back.allocation) == [got[0]]
    assert usage(stub, "cool")[V4].cooldown == 0
    fsck_clean(clean_db, "cool")


def test_cooldown_survives_a_server_restart(db_url, clean_db, tmp_path):
    cooldown = 10.0
    with running_server(db_url, tmp_path) as first:
        with grpc.insecure_channel(first.target) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            stub.CreatePool(pool("cool", "198.18.0.0/29", cooldown=cooldown))
            held = {f"o{i}": ips(alloc(stub, "cool", f"o{i}", SINGLE).allocation)[0] for i in range(6)}
            stub.Release(pb.ReleaseRequest(pool="cool", owner="o3"))
            released_at = time.monotonic()
    # A new server process: nothing about the cooldown lives in memory.
    with running_server(db_url, tmp_path) as second:
        with grpc.insecure_channel(second.target) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            assert time.monotonic() - released_at < cooldown - 1  # the restart left time to try early
            attempts = 0
            while True:
                try:
                    resp = alloc(stub, "cool", "late", SINGLE)
                    break
                except grpc.RpcError as e:
                    assert e.code() == C.RESOURCE_EXHAUSTED
                    attempts += 1
                    time.sleep(0.25)
            waited = time.monotonic() - released_at
            assert ips(resp.allocation) == [held["o3"]]
            assert attempts > 0
            assert waited >= cooldown - 0.5  # not reissued before its time (0.5 s for clock granularity)
    fsck_clean(db_url, "cool")


# -- garbage collection -----------------------------------------------------------------


def test_gc_races_allocate_and_never_takes_a_young_owner(db_url, clean_db, stub, target):
    """Rounds of: stale owners age past the grace, then fresh owners are allocated while
    GarbageCollect runs again and again. A released owner must have been older than the grace
    when that GC call started; every stale owner is released; valid owners never are."""
    grace = 2.0
    stub.CreatePool(pool("gc", "198.18.0.0/20", "fd00::/116", cooldown=0))
    thread_errors: list[str] = []
    keep = [f"keep-{i}" for i in range(10)]
    for o in keep:
        alloc(stub, "gc", o)
    allocated_at: dict[str, float] = {}  # owner -> when its Allocate was sent (client clock)
    stale: list[str] = []
    released: dict[str, float] = {}  # owner -> its create_time (server clock), for released owners
    too_young: list[tuple[str, float]] = []
    for rnd in range(4):
        batch = [f"stale-{rnd}-{i}" for i in range(25)]
        for o in batch:
            allocated_at[o] = time.time()
            alloc(stub, "gc", o)
        stale += batch
        time.sleep(grace + 0.2)
        stop = threading.Event()

        def allocate_fresh(tag, rnd=rnd, stop=stop):
            with grpc.insecure_channel(target) as ch:
                s = ipam_pb2_grpc.IpamServiceStub(ch)
                i = 0
                while not stop.is_set():
                    o = f"fresh-{rnd}-{tag}-{i}"
                    allocated_at[o] = time.time()
                    try:
                        alloc(s, "gc", o)
                    except grpc.RpcError as e:
                        thread_errors.append(f"{o}: {e.code()} {e.details()}")
                        return
                    i += 1

        threads = [threading.Thread(target=allocate_fresh, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        for _ in range(5):
            out = stub.GarbageCollect(pb.GarbageCollectRequest(
                pool="gc", valid_owners=keep, grace=duration_pb2.Duration(seconds=int(grace))))
            ended = time.time()  # the GC's own clock reading was at or before this
            for a in out.released:
                created = a.create_time.seconds + a.create_time.nanos / 1e9
                released[a.owner] = created
                if created > ended - grace:
                    too_young.append((a.owner, ended - created))
        stop.set()
        for t in threads:
            t.join()
        assert set(stale) <= set(released), set(stale) - set(released)
    assert too_young == []
    assert thread_errors == []
    assert not (set(keep) & set(released))
    assert any(o.startswith("fresh-") for o in allocated_at)
    fsck_clean(db_url, "gc")


# -- reservations -----------------------------------------------------------------------


def test_reservations_on_a_live_pool(stub, clean_db):
    stub.CreatePool(pool("res", "198.18.0.0/29", cooldown=0))  # .1 - .6
    a = ips(alloc(stub, "res", "a", SINGLE, addresses=["198.18.0.2"]).allocation)[0]
    reserved = stub.ReserveAddresses(pb.ReserveAddressesRequest(pool="res", addresses=["198.18.0.5", "198.18.0.6"]))
    assert sorted(reserved.reservations) == ["198.18.0.5/32", "198.18.0.6/32"]
    u = {x.family: x for x in reserved.usage}[V4]
    assert (u.size, u.allocated, u.reserved, u.free) == (6, 1, 2, 3)
    expect_error(stub.ReserveAddresses, pb.ReserveAddressesRequest(pool="res", addresses=[a]), C.FAILED_PRECONDITION,
                 "ADDRESS_ALLOCATED", "owner 'a'")
    expect_error(stub.ReserveAddresses, pb.ReserveAddressesRequest(pool="res", addresses=["198.19.0.1"]),
                 C.INVALID_ARGUMENT, None, "addresses[0]")
    stub.ReserveAddresses(pb.ReserveAddressesRequest(pool="res", addresses=[a], force=True))
    got = {ips(alloc(stub, "res", f"o{i}", SINGLE).allocation)[0] for i in range(3)}
    assert got == {"198.18.0.1", "198.18.0.3", "198.18.0.4"}
    expect_error(lambda r: alloc(stub, "res", "x", SINGLE), None, C.RESOURCE_EXHAUSTED)
    expect_error(lambda r: alloc(stub, "res", "x", SINGLE, addresses=["198.18.0.5"]), None, C.INVALID_ARGUMENT,
                 None, "is reserved")
    stub.Release(pb.ReleaseRequest(pool="res", owner="a"))  # force-reserved: never re-issued
    expect_error(lambda r: alloc(stub, "res", "x", SINGLE), None, C.RESOURCE_EXHAUSTED)
    stub.UnreserveAddresses(pb.UnreserveAddressesRequest(pool="res", addresses=["198.18.0.6/32"]))
    assert ips(alloc(stub, "res", "x", SINGLE).allocation) == ["198.18.0.6"]
    expect_error(stub.UnreserveAddresses, pb.UnreserveAddressesRequest(pool="res", addresses=["198.18.0.1"]),
                 C.INVALID_ARGUMENT, None, "not reserved")
    fsck_clean(clean_db, "res")


# -- ranges on a live pool --------------------------------------------------------------


def test_add_and_remove_ranges_on_a_live_pool(stub, clean_db):
    stub.CreatePool(pool("live", "198.18.0.0/24"))
    expect_error(lambda r: alloc(stub, "live", "a", REQUIRE), None, C.FAILED_PRECONDITION, "FAMILY_NOT_IN_POOL")
    grown = stub.AddPoolRange(pb.AddPoolRangeRequest(pool="live", range=pb.IpRange(cidr="fd00::/120")))
    assert [r.cidr for r in grown.ranges] == ["198.18.0.0/24", "fd00::/120"]
    assert families(alloc(stub, "live", "a", REQUIRE).allocation) == [V4, V6]
    expect_error(stub.AddPoolRange, pb.AddPoolRangeRequest(pool="live", range=pb.IpRange(cidr="fd00::/121")),
                 C.INVALID_ARGUMENT, None, "range.cidr")
    stub.AddPoolRange(pb.AddPoolRangeRequest(pool="live", range=pb.IpRange(cidr="fd00:1::/120")))
    expect_error(stub.RemovePoolRange, pb.RemovePoolRangeRequest(pool="live", cidr="fd00::/120"),
                 C.FAILED_PRECONDITION, "ADDRESS_ALLOCATED", "owner 'a'")
    after = stub.RemovePoolRange(pb.RemovePoolRangeRequest(pool="live", cidr="fd00:1::/120"))
    assert [r.cidr for r in after.ranges] == ["198.18.0.0/24", "fd00::/120"]
    expect_error(stub.RemovePoolRange, pb.RemovePoolRangeRequest(pool="live", cidr="fd00:9::/120"), C.NOT_FOUND,
                 "RANGE_NOT_FOUND")
    fsck_clean(clean_db, "live")


def test_update_pool_labels_and_cooldown(stub):
    stub.CreatePool(pool("upd", "198.18.0.0/24", team="a"))
    new = pb.Pool(name="upd", labels={"team": "b"}, cooldown=duration_pb2.Duration(seconds=5))
    got = stub.UpdatePool(pb.UpdatePoolRequest(pool=new, update_mask=field_mask_pb2.FieldMask(paths=["labels"])))
    assert dict(got.labels) == {"team": "b"} and got.cooldown.seconds == 30
    got = stub.UpdatePool(pb.UpdatePoolRequest(pool=new, update_mask=field_mask_pb2.FieldMask(paths=["cooldown"])))
    assert got.cooldown.seconds == 5
    expect_error(stub.UpdatePool, pb.UpdatePoolRequest(pool=new, update_mask=field_mask_pb2.FieldMask(paths=["name"])),
                 C.INVALID_ARGUMENT, None, "update_mask")


# -- migration --------------------------------------------------------------------------


def test_migrating_1000_ipv4_owners_to_dual_stack(stub, clean_db):
    stub.CreatePool(pool("mig", "198.18.0.0/22"))
    owners = [f"pod-{i:04d}" for i in range(1000)]
    before = {}
    for o in owners:
        before[o] = ips(alloc(stub, "mig", o, SINGLE).allocation)
    stub.AddPoolRange(pb.AddPoolRangeRequest(pool="mig", range=pb.IpRange(cidr="fd00::/112")))
    progress = list(stub.MigratePool(pb.MigratePoolRequest(pool="mig", ip_family_policy=REQUIRE, batch_size=200)))
    assert [p.processed for p in progress[:5]] == [200, 400, 600, 800, 1000]
    last = progress[-1]
    assert (last.total, last.processed, last.upgraded, last.failed) == (1000, 1000, 1000, 0)
    v6 = set()
    token = ""
    seen = 0
    while True:
        page = stub.ListAllocations(pb.ListAllocationsRequest(pool="mig", page_size=500, page_token=token))
        for a in page.allocations:
            assert families(a) == [V4, V6]
            assert a.addresses[0].ip == before[a.owner][0]  # kept its IPv4 address
            v6.add(a.addresses[1].ip)
            seen += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == 1000 and len(v6) == 1000
    fsck_clean(clean_db, "mig")


# -- lists ------------------------------------------------------------------------------


def test_list_allocations_filters_by_attribute_and_family(stub):
    stub.CreatePool(pool("flt", "198.18.0.0/24", "fd00::/120"))
    alloc(stub, "flt", "a", REQUIRE, node="n1")
    alloc(stub, "flt", "b", SINGLE, [V6], node="n1")
    alloc(stub, "flt", "c", REQUIRE, node="n2")
    names = lambda **kw: [a.owner for a in stub.ListAllocations(pb.ListAllocationsRequest(pool="flt", **kw)).allocations]  # noqa: E731
    assert names(attribute_selector={"node": "n1"}) == ["a", "b"]
    assert names(attribute_selector={"node": "n1"}, ip_family=V4) == ["a"]
    assert names(ip_family=V6) == ["a", "b", "c"]
    assert names(attribute_selector={"node": "n3"}) == []


# -- watch ------------------------------------------------------------------------------


def _event_key(e):
    return (e.type, e.owner, tuple(a.ip for a in e.addresses))


def test_watch_resumes_without_gaps(stub, target):
    stub.CreatePool(pool("w", "198.18.0.0/24", "fd00::/120", cooldown=0))
    expected = []

    def do_alloc(o, policy=REQUIRE):
        resp = alloc(stub, "w", o, policy)
        expected.append((pb.EVENT_TYPE_ALLOCATED, o, tuple(ips(resp.allocation))))

    def do_release(o):
        resp = stub.Release(pb.ReleaseRequest(pool="w", owner=o))
        order = {a.ip: a.family for a in resp.released}
        expected.append((pb.EVENT_TYPE_RELEASED, o, tuple(sorted(order, key=lambda ip: order[ip]))))

    with grpc.insecure_channel(target) as ch:
        watch = ipam_pb2_grpc.IpamServiceStub(ch).WatchAllocations(pb.WatchAllocationsRequest(pool="w"))
        first = next(watch)
        assert first.type == pb.EVENT_TYPE_BOOKMARK and first.resume_token
        for i in range(5):
            do_alloc(f"o{i}")
        do_release("o1")
        got, token = [], first.resume_token
        while len(got) < 6:
            e = next(watch)
            if e.type != pb.EVENT_TYPE_BOOKMARK:
                got.append(_event_key(e))
            token = e.resume_token
        watch.cancel()
    # Away: these happen while nobody watches.
    for i in range(5, 12):
        do_alloc(f"o{i}", SINGLE if i % 2 else REQUIRE)
    do_release("o7")
    do_alloc("o7")
    do_release("o3")
    with grpc.insecure_channel(target) as ch:
        watch = ipam_pb2_grpc.IpamServiceStub(ch).WatchAllocations(pb.WatchAllocationsRequest(pool="w",
                                                                                             resume_token=token))
        while len(got) < len(expected):
            e = next(watch)
            if e.type != pb.EVENT_TYPE_BOOKMARK:
                got.append(_event_key(e))
        watch.cancel()
    assert got == expected
    expect_error(lambda r: list(stub.WatchAllocations(pb.WatchAllocationsRequest(pool="w", resume_token="junk"))),
                 None, C.INVALID_ARGUMENT, None, "resume_token")


def test_prefer_upgrade_keeps_address_when_other_family_is_full(stub):
    stub.CreatePool(pool("pf", "198.18.0.0/24", "fd00::/127"))  # two IPv6 addresses
    a = alloc(stub, "pf", "a", SINGLE, [V4]).allocation
    alloc(stub, "pf", "x", SINGLE, [V6])
    alloc(stub, "pf", "y", SINGLE, [V6])
    up = alloc(stub, "pf", "a", PREFER)
    assert not up.created and ips(up.allocation) == ips(a)


def test_a_new_watch_starts_from_now(stub, target):
    stub.CreatePool(pool("wn", "198.18.0.0/24", "fd00::/120"))
    alloc(stub, "wn", "before")
    with grpc.insecure_channel(target) as ch:
        watch = ipam_pb2_grpc.IpamServiceStub(ch).WatchAllocations(pb.WatchAllocationsRequest(pool="wn"))
        assert next(watch).type == pb.EVENT_TYPE_BOOKMARK
        alloc(stub, "wn", "after")
        e = next(watch)
        while e.type == pb.EVENT_TYPE_BOOKMARK:
            e = next(watch)
        assert e.owner == "after"
        watch.cancel()


def test_a_new_watch_skips_what_committed_before_it_behind_an_older_running_transaction(stub, target, clean_db):
    """A new watch starts at the oldest running transaction (so nothing that commits later is
    missed): an allocation that committed before the watch, while an older transaction still ran,
    is above that start and must still not be sent; what that older transaction commits after the
    watch started must be (a CI run of the test above failed on the first part)."""
    import asyncio

    import asyncpg

    from dsipam.server.store._fast import asyncpg_dsn

    stub.CreatePool(pool("wo", "198.18.0.0/24", "fd00::/120"))
    loop = asyncio.new_event_loop()
    older = loop.run_until_complete(asyncpg.connect(asyncpg_dsn(clean_db)))
    try:
        loop.run_until_complete(older.execute("BEGIN"))
        loop.run_until_complete(older.fetchval("SELECT pg_current_xact_id()"))  # its xid is now the oldest
        for i in range(30):  # more transactions above the start than a token could name one by one
            alloc(stub, "wo", f"before{i}")
        with grpc.insecure_channel(target) as ch:
            watch = ipam_pb2_grpc.IpamServiceStub(ch).WatchAllocations(pb.WatchAllocationsRequest(pool="wo"),
                                                                       timeout=20)
            first = next(watch)
            assert first.type == pb.EVENT_TYPE_BOOKMARK
            alloc(stub, "wo", "after")
            loop.run_until_complete(older.execute(
                "INSERT INTO ipam_events (pool_id, type, owner, ipv4, ipv6) "
                "SELECT pool_id, type, 'older', ipv4, ipv6 FROM ipam_events WHERE owner = 'after'"))
            loop.run_until_complete(older.execute("COMMIT"))
            owners = next_owners(watch, 2)
            watch.cancel()
            # A stream resumed from the watch's first bookmark (taken while "before" was above its
            # position) sends the same: the token carries what to skip.
            resumed = ipam_pb2_grpc.IpamServiceStub(ch).WatchAllocations(
                pb.WatchAllocationsRequest(pool="wo", resume_token=first.resume_token), timeout=20)
            again = next_owners(resumed, 2)
            resumed.cancel()
        assert owners == ["older", "after"]  # in the order of their xids; no "before" ever
        assert again == owners
    finally:
        loop.run_until_complete(older.close())
        loop.close()


def test_migrate_keeps_the_owners_node(stub, clean_db):
    stub.CreatePool(pool("mn", "198.18.0.0/24"))
    for i in range(5):
        stub.Allocate(pb.AllocateRequest(pool="mn", owner=f"p{i}", node="node-a", ip_family_policy=SINGLE))
    stub.AddPoolRange(pb.AddPoolRangeRequest(pool="mn", range=pb.IpRange(cidr="fd00::/120")))
    progress = list(stub.MigratePool(pb.MigratePoolRequest(pool="mn", ip_family_policy=REQUIRE)))
    assert len(progress) == 1 and progress[0].upgraded == 5
    v6_blocks = [b.cidr for b in stub.ListBlocks(pb.ListBlocksRequest(pool="mn", node="node-a")).blocks
                 if b.family == V6]
    assert len(v6_blocks) == 1
    fsck_clean(clean_db, "mn")
