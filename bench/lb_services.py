#!/usr/bin/env python3
"""N LoadBalancer Services created at once (default 1,000) get dsipam addresses: issue 15, must-show 5.

Against a real kube-apiserver + etcd (KUBEBUILDER_ASSETS, as the tests; dual-stack service CIDRs),
a real dsipam server and real PostgreSQL. The real ``dsipam controller`` process runs under its
ServiceAccount's token (deploy/kubernetes/controller.yaml); the default pool is an IPPool marked
``spec.services: Default`` (a /20 and a /116). Half the Services are RequireDualStack [IPv4, IPv6],
a quarter RequireDualStack [IPv6, IPv4], a quarter SingleStack IPv4.

All N creates are sent at once (``--concurrency`` in flight); the clock runs from the first create
until a watch has seen every Service with its full ``status.loadBalancer.ingress``. Then: no address
twice, each Service's addresses in its ipFamilies order, dsipam holds exactly the ingress addresses.
Prints the time, the rate, the creates' own time, and the controller's work and RSS. The API
server runs with a /16 of IPv4 ClusterIPs (the tests' /24 holds 253 Services).

``--backlog``: the Services are created first and the controller started after; the clock runs from
its start (Lease, lists, index) to the last ingress: the controller's own throughput, without the
creates competing for the API server. The pool is then made by RPC and named by --lb-default-pool.
Results: docs/performance.md, "LoadBalancer Services".

  KUBEBUILDER_ASSETS=../shared/k8s python bench/lb_services.py              # 1,000 Services at once
  KUBEBUILDER_ASSETS=../shared/k8s python bench/lb_services.py --backlog
  KUBEBUILDER_ASSETS=../shared/k8s python bench/lb_services.py --services 200 --lb-concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from kube import ApiServer, ControllerProcess, find_assets, install_controller_manifests  # noqa: E402
from support import running_server, scratch_database  # noqa: E402

NS = "lb-bench"
SHAPES = [("RequireDualStack", ["IPv4", "IPv6"]), ("RequireDualStack", ["IPv6", "IPv4"]),
          ("RequireDualStack", ["IPv4", "IPv6"]), ("SingleStack", ["IPv4"])]


def rss(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


async def prepare(api: ApiServer, target: str, *, rpc_pool: bool) -> None:
    """The default pool (an IPPool marked spec.services: Default, or a pool made by RPC with the
    services label) and the namespace."""
    from kubernetes_asyncio import client

    from dsipam.client import AsyncIpamClient

    ranges = ["198.18.32.0/20", "fd00:32::/116"]
    async with api.api_client() as k:
        if rpc_pool:
            async with AsyncIpamClient(target) as ipam:
                await ipam.create_pool("lb", ranges, labels={"ipam.dsipam.io/services": "default"})
        else:
            await client.CustomObjectsApi(k).create_cluster_custom_object("ipam.dsipam.io", "v1alpha1", "ippools", {
                "apiVersion": "ipam.dsipam.io/v1alpha1", "kind": "IPPool", "metadata": {"name": "lb"},
                "spec": {"ranges": [{"cidr": r} for r in ranges], "services": "Default"}})
        await client.CoreV1Api(k).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))


async def ready(api: ApiServer, target: str) -> None:
    """The controller created the pool from the IPPool (label services=default)."""
    from dsipam.client import AsyncIpamClient, PoolNotFound

    async with AsyncIpamClient(target) as ipam:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                pool = await ipam.get_pool("lb")
                if pool.labels.get("ipam.dsipam.io/services") == "default":
                    return
            except PoolNotFound:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError("pool lb not created by the controller")


async def run(api: ApiServer, target: str, n: int, concurrency: int, within: float,
              start_controller: Callable[[], object] | None = None) -> tuple[float, float, list[dict]]:
    """Creates the Services and waits for their ingress; returns (seconds from the first create, or
    from ``start_controller`` when given: the backlog mode; seconds the creates took; the Services)."""
    from kubernetes_asyncio import client

    from dsipam.kube._watch import _RawWatch

    async with api.api_client() as k:
        core = client.CoreV1Api(k)
        # The watch starts before the first create: every status update is seen.
        rv = (await core.list_namespaced_service(NS)).metadata.resource_version
        done: dict[str, dict] = {}
        all_done = asyncio.Event()

        def full(obj: dict) -> bool:
            ing = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            want = 1 if obj["spec"].get("ipFamilyPolicy") == "SingleStack" else 2
            return len(ing) == want

        async def follow() -> None:
            w = _RawWatch()  # events as the API server's JSON
            async with w:
                async for ev in w.stream(core.list_namespaced_service, NS, resource_version=rv,
                                         timeout_seconds=900):
                    obj = ev["raw_object"]
                    if ev["type"] != "DELETED" and full(obj):
                        done[obj["metadata"]["name"]] = obj
                        if len(done) == n:
                            all_done.set()
                            return

        watcher = asyncio.create_task(follow())
        sem = asyncio.Semaphore(concurrency)

        async def create(i: int) -> None:
            policy, fams = SHAPES[i % len(SHAPES)]
            body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc-{i:05d}"},
                    "spec": {"type": "LoadBalancer", "loadBalancerClass": "ipam.dsipam.io/lb",
                             "ipFamilyPolicy": policy, "ipFamilies": fams,
                             "ports": [{"port": 80, "protocol": "TCP"}]}}
            async with sem:
                resp = await core.create_namespaced_service(NS, body, _preload_content=False)
                try:
                    text = await resp.read()
                finally:
                    resp.release()
                if resp.status != 201:  # this mode does not raise (a full service CIDR: 422)
                    raise SystemExit(f"creating svc-{i:05d}: HTTP {resp.status} {text[:300]!r}")

        t0 = time.monotonic()
        await asyncio.gather(*(create(i) for i in range(n)))
        created = time.monotonic() - t0
        if start_controller is not None:  # backlog: the clock starts with the controller
            t0 = time.monotonic()
            await asyncio.to_thread(start_controller)
        try:
            await asyncio.wait_for(all_done.wait(), within)
        except TimeoutError:
            raise SystemExit(f"only {len(done)} of {n} Services got their ingress within {within:g}s") from None
        finally:
            watcher.cancel()
        took = time.monotonic() - t0
        return took, created, list(done.values())


async def check(target: str, services: list[dict]) -> None:
    from dsipam.client import AsyncIpamClient

    ips = [e["ip"] for s in services for e in s["status"]["loadBalancer"]["ingress"]]
    assert len(ips) == len(set(ips)), "an address twice"
    for s in services:
        fams = [f"IPv{ipaddress.ip_address(e['ip']).version}" for e in s["status"]["loadBalancer"]["ingress"]]
        assert fams == s["spec"]["ipFamilies"], (s["metadata"]["name"], fams)
    async with AsyncIpamClient(target) as ipam:
        held = sorted([str(x.ip) async for a in ipam.iter_allocations("lb", page_size=1000) for x in a.addresses])
    assert held == sorted(ips), f"dsipam holds {len(held)} addresses, the Services show {len(ips)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=100, help="Service creates in flight")
    ap.add_argument("--lb-concurrency", type=int, default=16, help="the controller's --lb-concurrency")
    ap.add_argument("--backlog", action="store_true",
                    help="create the Services first, then start the controller (its own throughput, no creates "
                         "competing); the pool is made by RPC and named by --lb-default-pool")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every Service's ingress")
    ap.add_argument("--log-level", default="WARNING", help="the controller's (its log: the temporary directory)")
    args = ap.parse_args()
    found = find_assets()
    if isinstance(found, str):
        print(f"no API server: {found}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="lb-bench-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` still stops etcd and the API server
    # The tests' service CIDRs hold 253 IPv4 ClusterIPs; every Service here needs one (and the LoadBalancer
    # addresses come from dsipam, not from these ranges).
    api = ApiServer(*found, service_cidrs="10.0.0.0/16,fd00:10::/108")
    try:
        api.start()
        with scratch_database("dsipam_bench") as url, running_server(url, tmp) as server:
            kubeconfig = asyncio.run(install_controller_manifests(api, tmp))
            asyncio.run(prepare(api, server.target, rpc_pool=args.backlog))
            ctl_args = ["--resync-interval", "3600", "--status-interval", "3600",
                        "--lb-concurrency", str(args.lb_concurrency)]
            if args.backlog:
                ctl_args += ["--lb-default-pool", "lb"]
            started: list[ControllerProcess] = []

            def start() -> ControllerProcess:
                started.append(ControllerProcess(kubeconfig, server.target, tmp / "controller.log", identity="bench",
                                                 args=ctl_args, env={"DSIPAM_LOG_LEVEL": args.log_level}))
                print(f"controller log: {tmp / 'controller.log'}", flush=True)
                return started[0]

            try:
                if not args.backlog:
                    start()
                    asyncio.run(ready(api, server.target))
                try:
                    took, created, services = asyncio.run(run(api, server.target, args.services, args.concurrency,
                                                              args.timeout, start if args.backlog else None))
                except SystemExit as exc:  # what the controller says about it, then the reason
                    if started:
                        print("\n".join(line for line in started[0].metrics().splitlines()
                                        if line.startswith("dsipam_controller_") and "_created" not in line
                                        and ("service" in line or "error" in line or "conflict" in line)))
                    raise exc
                ctl = started[0]
                asyncio.run(check(server.target, services))
                now, peak = rss(ctl.proc.pid)
                addresses = sum(len(s["status"]["loadBalancer"]["ingress"]) for s in services)
                if args.backlog:
                    print(f"{args.services} LoadBalancer Services ({addresses} addresses) created first "
                          f"({created:.2f}s, {args.concurrency} in flight), then the controller started: all with "
                          f"their ingress {took:.2f}s after its start ({args.services / took:.0f} Services/s); no "
                          "address twice, dsipam holds exactly the ingress addresses")
                else:
                    print(f"{args.services} LoadBalancer Services ({addresses} addresses): all with their ingress "
                          f"{took:.2f}s after the first create ({args.services / took:.0f} Services/s); the creates "
                          f"alone took {created:.2f}s ({args.concurrency} in flight), the last ingress came "
                          f"{took - created:.2f}s after the last create; no address twice, dsipam holds exactly "
                          "the ingress addresses")
                print(f"controller (--lb-concurrency {args.lb_concurrency}): "
                      f"{ctl.metric('dsipam_controller_reconciles_total', kind='service'):.0f} Service reconciles, "
                      f"{ctl.metric('dsipam_controller_service_status_writes_total'):.0f} status writes, "
                      f"{ctl.metric('dsipam_controller_conflicts_total'):.0f} conflicts, "
                      f"errors {ctl.errors():.0f}; RSS {now} MiB (peak {peak} MiB)")
                ctl.check()
            finally:
                for c in started:
                    c.terminate()
    finally:
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
