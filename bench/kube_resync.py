#!/usr/bin/env python3
"""One full resync of the dsipam controller at cluster scale: N pods over M nodes (default 10,000
over 100), each with a dual-stack allocation carrying the CNI plugin's attributes (k8s.podUID, ...),
against a real kube-apiserver + etcd (KUBEBUILDER_ASSETS, as the tests), a real dsipam server and
real PostgreSQL. The real ``dsipam controller`` process runs under its ServiceAccount's token
(deploy/kubernetes/controller.yaml) with ``--grace 0``; it resyncs at start and every
``--interval`` seconds. Before it starts, ``--leaked`` pods are deleted, so the first resync also
releases their allocations; the next ones find nothing to do (the steady state).

Prints each resync's time (from the controller's log line) and the controller's RSS (VmRSS, and
the peak VmHWM) from /proc. Results: docs/performance.md, "Kubernetes controller resync".

  KUBEBUILDER_ASSETS=../shared/k8s python bench/kube_resync.py            # 10,000 pods, 100 nodes
  KUBEBUILDER_ASSETS=../shared/k8s python bench/kube_resync.py --pods 2000 --nodes 20
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from kube import ApiServer, ControllerProcess, find_assets, install_controller_manifests  # noqa: E402
from support import running_server, scratch_database  # noqa: E402

RESYNC = re.compile(r"resync: (\d+) pool\(s\), (\d+) pod allocation\(s\), (\d+) pod\(s\), (\d+) node\(s\); "
                    r"(\d+) leaked, (\d+) released, nodes gone (.*); ([0-9.]+)s")


def rss(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


async def populate(api: ApiServer, target: str, pods: int, nodes: int, leaked: int, concurrency: int) -> None:
    from kubernetes_asyncio import client

    from dsipam.client import AsyncIpamClient

    sem = asyncio.Semaphore(concurrency)
    async with api.api_client() as k, AsyncIpamClient(target) as ipam:
        core = client.CoreV1Api(k)
        await ipam.create_pool("bench", ["198.18.0.0/17", "fd00:be::/112"], cooldown=0)
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="bench")))
        for n in range(nodes):
            await core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=f"node-{n:03d}")))
        t0 = time.monotonic()

        async def one(i: int) -> None:
            node = f"node-{i % nodes:03d}"
            async with sem:
                pod = client.V1Pod(metadata=client.V1ObjectMeta(name=f"p{i:05d}", namespace="bench"),
                                   spec=client.V1PodSpec(node_name=node, containers=[client.V1Container(
                                       name="c", image="pause")]))
                uid = (await core.create_namespaced_pod("bench", pod)).metadata.uid
                container = f"{i:064x}"
                await ipam.allocate("bench", f"{container}/eth0", node=node, policy="require_dual_stack",
                                    attributes={"cni.containerID": container, "cni.ifname": "eth0", "cni.node": node,
                                                "cni.network": "k8s-pod-network", "k8s.namespace": "bench",
                                                "k8s.pod": f"p{i:05d}", "k8s.podUID": uid})

        await asyncio.gather(*(one(i) for i in range(pods)))
        print(f"created {pods} pods and their allocations over {nodes} nodes in {time.monotonic() - t0:.1f}s",
              flush=True)
        for i in range(leaked):
            await core.delete_namespaced_pod(f"p{i * (pods // max(leaked, 1)):05d}", "bench", grace_period_seconds=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--leaked", type=int, default=100, help="pods deleted before the controller starts")
    ap.add_argument("--resyncs", type=int, default=3, help="resyncs to time (the first releases the leaks)")
    ap.add_argument("--interval", type=float, default=15.0, help="seconds between resyncs")
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    found = find_assets()
    if isinstance(found, str):
        print(f"no API server: {found}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="kube-resync-"))
    # SIGTERM (a `timeout`) unwinds through the finally blocks: etcd and kube-apiserver are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    api = ApiServer(*found)
    try:
        api.start()
        with scratch_database("dsipam_bench") as url, running_server(url, tmp) as server:
            kubeconfig = asyncio.run(install_controller_manifests(api, tmp))
            asyncio.run(populate(api, server.target, args.pods, args.nodes, args.leaked, args.concurrency))
            ctl = ControllerProcess(kubeconfig, server.target, tmp / "controller.log", identity="bench",
                                    args=["--grace", "0", "--resync-interval", str(args.interval),
                                          "--status-interval", "3600"], env={"DSIPAM_LOG_LEVEL": "INFO"})
            try:
                seen: list[re.Match] = []
                deadline = time.monotonic() + 600
                while len(seen) < args.resyncs and time.monotonic() < deadline:
                    seen = list(RESYNC.finditer(ctl.log()))
                    if ctl.proc.poll() is not None:
                        print(ctl.log(), file=sys.stderr)
                        return 1
                    time.sleep(0.2)
                now, peak = rss(ctl.proc.pid)
                for i, m in enumerate(seen):
                    print(f"resync {i + 1}: {m.group(2)} pod allocations vs {m.group(3)} pods over {m.group(4)} nodes; "
                          f"{m.group(5)} leaked, {m.group(6)} released; {m.group(8)}s")
                print(f"controller RSS {now} MiB (peak {peak} MiB); errors {ctl.errors():.0f}")
            finally:
                ctl.terminate()
    finally:
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
