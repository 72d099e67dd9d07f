"""Node-affine blocks: each node's pods share a routable prefix per family."""

import ipaddress
import subprocess
import sys
import threading
from collections import Counter

import grpc
from grpc_helpers import REQUIRE, pool

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

C = grpc.StatusCode


def run_nodes(target, pool_name, per_node, nodes, threads_per_node=8):
    """Allocates ``per_node`` pairs for each node from ``threads_per_node`` threads per node."""
    results, errors = {}, []
    lock = threading.Lock()

    def worker(node, idx):
        with grpc.insecure_channel(target) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            for i in range(idx, per_node, threads_per_node):
                owner = f"{node}/pod-{i}"
                try:
                    resp = stub.Allocate(pb.AllocateRequest(pool=pool_name, owner=owner, node=node,
                                                            ip_family_policy=REQUIRE), timeout=60)
                    with lock:
                        results[owner] = resp.allocation
                except grpc.RpcError as e:
                    with lock:
                        errors.append((node, e.code(), e.details()))

    threads = [threading.Thread(target=worker, args=(n, t)) for n in nodes for t in range(threads_per_node)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def blocks(stub, pool_name, node=""):
    out, token = [], ""
    while True:
        page = stub.ListBlocks(pb.ListBlocksRequest(pool=pool_name, node=node, page_token=token))
        out += list(page.blocks)
        token = page.next_page_token
        if not token:
            return out


def fsck(db_url, name):
    out = subprocess.run([sys.executable, "-m", "dsipam.server", "fsck", name, "--database-url", db_url],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_two_nodes_get_the_fewest_affine_blocks(stub, target, clean_db):
    stub.CreatePool(pool("aff", "198.18.0.0/24", "fd00::/120"))  # four /26 and four /122 blocks
    results, errors = run_nodes(target, "aff", 100, ["node-a", "node-b"])
    assert errors == []
    assert len(results) == 200
    all_blocks = blocks(stub, "aff")
    # No block has two owners: each block row names one node.
    by_cidr = {b.cidr: b for b in all_blocks}
    assert len(by_cidr) == len(all_blocks)
    for node in ("node-a", "node-b"):
        mine = blocks(stub, "aff", node)
        assert Counter(b.family for b in mine) == {pb.IP_FAMILY_IPV4: 2, pb.IP_FAMILY_IPV6: 2}  # 100 > 64 > 50
        nets = [ipaddress.ip_network(b.cidr) for b in mine]
        for owner, alloc in results.items():
            if not owner.startswith(node + "/"):
                continue
            assert alloc.node == node and not alloc.borrowed
            for a in alloc.addresses:
                assert any(ipaddress.ip_address(a.ip) in n for n in nets), (owner, a.ip)
        assert sum(b.used for b in mine) == 200
    ips = [a.ip for alloc in results.values() for a in alloc.addresses]
    assert len(ips) == len(set(ips)) == 400
    fsck(clean_db, "aff")


def test_strict_mode_names_the_node_and_borrow_mode_lends(stub, target, clean_db):
    load = ["node-a", "node-b", "node-c"]  # 3 x 80 = 240 of 253 addresses, but 6 blocks for 4
    stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(
        name="strict", ranges=[pb.IpRange(cidr="198.18.0.0/24"), pb.IpRange(cidr="fd00::/120")],
        node_affinity=pb.NODE_AFFINITY_STRICT)))
    results, errors = run_nodes(target, "strict", 80, load)
    assert errors, "strict affinity must run out of blocks"
    for node, code, details in errors:
        assert code == C.RESOURCE_EXHAUSTED
        assert f"node {node!r}" in details and "strict" in details
    assert not any(a.borrowed for a in results.values())

    stub.CreatePool(pool("borrow", "198.18.1.0/24", "fd00:1::/120"))
    results, errors = run_nodes(target, "borrow", 80, load)
    assert errors == []
    assert len(results) == 240
    lent = [o for o, a in results.items() if a.borrowed]
    assert lent, "some allocations must be borrowed from other nodes' blocks"
    listed = stub.ListAllocations(pb.ListAllocationsRequest(pool="borrow", page_size=1000)).allocations
    assert sorted(a.owner for a in listed if a.borrowed) == sorted(lent)
    fsck(clean_db, "strict")
    fsck(clean_db, "borrow")


def test_node_removal_frees_empty_blocks_for_other_nodes(stub, target, clean_db):
    stub.CreatePool(pool("rm", "198.18.0.0/25", "fd00::/121", cooldown=0))  # two blocks per family
    for i in range(70):  # node-a needs both blocks of each family
        stub.Allocate(pb.AllocateRequest(pool="rm", owner=f"a{i}", node="node-a", ip_family_policy=REQUIRE))
    # node-a drains all but one pod: one block per family still holds it.
    for i in range(1, 70):
        stub.Release(pb.ReleaseRequest(pool="rm", owner=f"a{i}"))
    out = stub.ReleaseNode(pb.ReleaseNodeRequest(pool="rm", node="node-a"))
    assert len(out.released) == 2 and len(out.kept) == 2
    assert all(b.used == 0 and b.node == "" for b in out.released)
    assert all(b.used == 1 and b.node == "node-a" for b in out.kept)
    freed = {b.cidr for b in out.released}
    stub.Allocate(pb.AllocateRequest(pool="rm", owner="b0", node="node-b", ip_family_policy=REQUIRE))
    claimed = {b.cidr for b in blocks(stub, "rm", "node-b")}
    assert claimed == freed
    fsck(clean_db, "rm")


def test_allocations_without_a_node_behave_as_before(stub):
    stub.CreatePool(pool("mix", "198.18.0.0/24", "fd00::/120"))
    stub.Allocate(pb.AllocateRequest(pool="mix", owner="n", node="node-a", ip_family_policy=REQUIRE))
    plain = stub.Allocate(pb.AllocateRequest(pool="mix", owner="p", ip_family_policy=REQUIRE)).allocation
    assert plain.node == "" and not plain.borrowed
    node_blocks = {b.cidr for b in blocks(stub, "mix", "node-a")}
    assert not any(ipaddress.ip_address(a.ip) in ipaddress.ip_network(c) for a in plain.addresses
                   for c in node_blocks)
    again = stub.Allocate(pb.AllocateRequest(pool="mix", owner="n", node="node-a", ip_family_policy=REQUIRE))
    assert not again.created
