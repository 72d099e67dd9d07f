"""Many client processes and one or two server processes racing on one pool.

4 client processes x 50 in-flight Allocates = 200 concurrent calls on a pool of a
/24 and a /120 (254 IPv4 pairs). Every owner gets a pair, no address is given
twice, and exhaustion comes exactly at capacity.
"""

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_helpers import pool
from support import psql, running_server

from dsipam.v1 import ipam_pb2_grpc

WORKER = str(Path(__file__).resolve().parent.parent / "alloc_worker.py")
PROCESSES = 4
IN_FLIGHT = 50
CAPACITY = 254  # 198.18.0.0/24 without network and broadcast; fd00::/120 has 255


def run_workers(targets, pool_name, prefix, per_process, release=False):
    procs = []
    for i in range(PROCESSES):
        args = [sys.executable, WORKER, targets[i % len(targets)], pool_name, f"{prefix}{i}", str(per_process),
                str(IN_FLIGHT)]
        if release:
            args.append("release")
        procs.append(subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # release the barrier for all at once
        p.stdin.write("go\n")
        p.stdin.flush()
    ok, errors = {}, {}
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0
        result = json.loads(out.strip().splitlines()[-1])
        ok.update(result["ok"])
        errors.update(result["errors"])
    return ok, errors


def fsck(db_url):
    from support import ROOT  # noqa: F401

    out = subprocess.run([sys.executable, "-m", "dsipam.server", "fsck", "race", "--database-url", db_url],
                         capture_output=True, text=True)
    return out.returncode, out.stdout


@pytest.mark.parametrize("servers", [1, 2], ids=["one-server", "two-servers"])
def test_concurrent_pairs_are_unique_and_exhaust_exactly_at_capacity(db_url, clean_db, tmp_path, servers):
    with running_server(db_url, tmp_path) as first:
        with grpc.insecure_channel(first.target) as ch:
            ipam_pb2_grpc.IpamServiceStub(ch).CreatePool(pool("race", "198.18.0.0/24", "fd00::/120", cooldown=0))
        extra = [running_server(db_url, tmp_path) for _ in range(servers - 1)]
        others = [cm.__enter__() for cm in extra]
        try:
            targets = [first.target] + [s.target for s in others]

            # Round 1: 200 owners, 200 in flight, all below capacity: every owner gets a pair.
            ok, errors = run_workers(targets, "race", "a", 50)
            assert errors == {}
            assert len(ok) == 200 and all(len(v) == 2 for v in ok.values())
            addrs = [ip for v in ok.values() for ip in v]
            assert len(addrs) == len(set(addrs)) == 400
            code, out = fsck(db_url)
            assert code == 0, out

            # Release them all concurrently, then race 300 owners for 254 pairs.
            ok_rel, err_rel = run_workers(targets, "race", "a", 50, release=True)
            assert err_rel == {} and len(ok_rel) == 200
            assert psql(db_url, "SELECT count(*) FROM ipam_allocations") == "0"

            ok, errors = run_workers(targets, "race", "b", 75)
            assert len(ok) == CAPACITY, (len(ok), set(errors.values()))
            assert len(errors) == 300 - CAPACITY
            assert all(e.startswith("RESOURCE_EXHAUSTED") for e in errors.values()), set(errors.values())
            addrs = [ip for v in ok.values() for ip in v]
            assert all(len(v) == 2 for v in ok.values())
            assert len(addrs) == len(set(addrs)) == 2 * CAPACITY
            # The database agrees: exactly the winners hold addresses, IPv6 left over was given back.
            assert psql(db_url, "SELECT count(*) FROM ipam_allocations WHERE ipv4 IS NOT NULL AND ipv6 IS NOT NULL") \
                == str(CAPACITY)
            assert psql(db_url, "SELECT count(*) FROM ipam_allocations") == str(CAPACITY)
            code, out = fsck(db_url)
            assert code == 0, out
        finally:
            for cm in extra:
                cm.__exit__(None, None, None)
