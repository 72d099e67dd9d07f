#!/usr/bin/env python3
"""Excludes and reservations at scale (issue 13, finding 3): what a pool with many of them costs.

For each count N (default 20,000 and 100,000), on a scratch database and one ``dsipam serve``:

* **create**: CreatePool of a pool of two ranges (198.18.0.0/15 and fd00:e::/104) with N excludes
  (mixed /32s, /128s and /28-/31, /124-/127 prefixes at random places, overlapping each other and
  the gateways), its wall time, and the slowest grpc.health.v1 Check answered meanwhile (a
  thread checks every 5 ms on its own channel);
* **reserve**: ReserveAddresses of N/10 more addresses and small CIDRs on that pool (one call),
  its time and the slowest health check meanwhile;
* **restart**: the server is stopped and started again next to that pool, with the metrics pool
  gauges on (they read every pool's layout): time to health SERVING (``start_empty_db_s`` is the
  same on the empty database, before the pool existed), the slowest health check
  over the first 3 s, and the first GetPool of the big pool (which reads its layout: built in a
  worker thread);
* **layout**: the pure layout computation in this process (parse N excludes, sort, merge, the
  available intervals), without the server.

    python bench/excludes.py                 # 20,000 and 100,000
    python bench/excludes.py --counts 20000

Loopback only; bounded in count and time; stops by itself. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from harness import Servers, log, machine_info, scratch_database  # noqa: E402

from dsipam.v1 import ipam_pb2 as pb  # noqa: E402
from dsipam.v1 import ipam_pb2_grpc  # noqa: E402

V4 = ipaddress.ip_network("198.18.0.0/15")
V6 = ipaddress.ip_network("fd00:e::/104")
MESSAGE_BYTES = 32 * 1024 * 1024


def blocks(rnd: random.Random, net: ipaddress.IPv4Network | ipaddress.IPv6Network, count: int) -> list[str]:
    """``count`` excludes in ``net``: mostly single addresses, some small prefixes, the gateway once."""
    bits = net.max_prefixlen
    out = [str(net.network_address + 1)]
    lo, span = int(net.network_address), net.num_addresses
    while len(out) < count:
        p = rnd.choice([bits] * 12 + [bits - 1, bits - 2, bits - 3, bits - 4])
        out.append(str(ipaddress.ip_network((lo + rnd.randrange(span), p), strict=False)))
    return out


class HealthProbe:
    """Checks health every 5 ms on its own channel; keeps the slowest answer."""

    def __init__(self, target: str) -> None:
        self.target, self.worst, self.count, self.failures = target, 0.0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not self._stop.is_set():
                t = time.perf_counter()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
                except grpc.RpcError:
                    self.failures += 1
                self.worst = max(self.worst, time.perf_counter() - t)
                self.count += 1
                time.sleep(0.005)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stub_for(target: str) -> tuple[grpc.Channel, ipam_pb2_grpc.IpamServiceStub]:
    ch = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", MESSAGE_BYTES),
                                                ("grpc.max_receive_message_length", MESSAGE_BYTES)])
    return ch, ipam_pb2_grpc.IpamServiceStub(ch)


def layout_seconds(excludes4: list[str], excludes6: list[str]) -> float:
    from dsipam.server.domain import build_range

    t = time.perf_counter()
    for net, ex in ((V4, excludes4), (V6, excludes6)):
        r = build_range(cidr=str(net), gateway=str(net.network_address + 1), exclude=ex)
        _ = r.size, r.first_block()
    return time.perf_counter() - t


def run(count: int, seed: int) -> dict[str, object]:
    rnd = random.Random(seed)
    ex4, ex6 = blocks(rnd, V4, count // 2), blocks(rnd, V6, count - count // 2)
    res = [str(ipaddress.ip_address(int(V4.network_address) + rnd.randrange(V4.num_addresses)))
           for _ in range(count // 20)]
    res += [str(ipaddress.ip_network((int(V6.network_address) + rnd.randrange(V6.num_addresses), 126), strict=False))
            for _ in range(count // 20)]
    out: dict[str, object] = {"excludes": count, "reservations": len(res)}
    out["layout_in_process_s"] = round(layout_seconds(ex4, ex6), 3)
    env = {"DSIPAM_MAX_MESSAGE_BYTES": str(MESSAGE_BYTES), "DSIPAM_MAX_EXCLUDES_PER_POOL": str(count),
           "DSIPAM_MAX_RESERVATIONS_PER_POOL": str(count), "DSIPAM_METRICS_LISTEN": "127.0.0.1:0",
           "DSIPAM_METRICS_POOL_INTERVAL": "2"}
    with scratch_database(f"dsipam_bench_ex{count}") as db_url:
        t = time.perf_counter()
        with Servers(db_url, env=env) as servers:
            out["start_empty_db_s"] = round(time.perf_counter() - t, 3)  # the baseline of restart_to_serving_s
            target = servers.targets[0]
            ch, stub = stub_for(target)
            request = pb.CreatePoolRequest(pool=pb.Pool(name="big", ranges=[
                pb.IpRange(cidr=str(V4), gateway=str(V4.network_address + 1), exclude=ex4),
                pb.IpRange(cidr=str(V6), gateway=str(V6.network_address + 1), exclude=ex6)]))
            with HealthProbe(target) as probe:
                t = time.perf_counter()
                created = stub.CreatePool(request, timeout=600)
                out["create_s"] = round(time.perf_counter() - t, 3)
            out["create_health_max_s"] = round(probe.worst, 3)
            out["create_health_checks"] = probe.count
            out["size"] = {u.family: u.size for u in created.usage}
            with HealthProbe(target) as probe:
                t = time.perf_counter()
                stub.ReserveAddresses(pb.ReserveAddressesRequest(pool="big", addresses=res), timeout=600)
                out["reserve_s"] = round(time.perf_counter() - t, 3)
            out["reserve_health_max_s"] = round(probe.worst, 3)
            ch.close()
        # A replica starting next to that pool.
        with Servers(db_url, env=env) as servers:
            pass  # warm-up start: imports cached
        t = time.perf_counter()
        restarted = Servers(db_url, env=env)
        with restarted:
            out["restart_to_serving_s"] = round(time.perf_counter() - t, 3)
            target = restarted.targets[0]
            with HealthProbe(target) as probe:
                ch, stub = stub_for(target)
                t = time.perf_counter()
                stub.GetPool(pb.GetPoolRequest(name="big"), timeout=600)
                out["restart_first_getpool_s"] = round(time.perf_counter() - t, 3)
                time.sleep(max(0.0, 3.0 - (time.perf_counter() - t)))
                ch.close()
            out["restart_health_max_s"] = round(probe.worst, 3)
    log(json.dumps(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--seed", type=int, default=13)
    a = ap.parse_args()
    if any(not 1 <= c <= 200_000 for c in a.counts):
        ap.error("--counts: each from 1 to 200,000")
    results = [run(c, a.seed) for c in a.counts]
    print(json.dumps({"machine": machine_info(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
