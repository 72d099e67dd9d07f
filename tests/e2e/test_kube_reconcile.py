"""Must-shows 2 and 3: pod-leak and node reconciliation against a real API server, a real dsipam
server and real PostgreSQL. Allocations are made by the CNI plugin's own ADD code (dsipam.cni,
with K8S_POD_UID etc. in CNI_ARGS) or by the SDK with the same attributes."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Callable

from kube import ApiServer, ControllerProcess, cluster_labels, wait_for
from kube_controller import GRACE, held, make_node, make_pod
from kubernetes_asyncio import client

from dsipam.client import AsyncIpamClient
from dsipam.cni import _plugin


def cni_add(target: str, pool: str, node: str, container: str, ns: str, pod: str, uid: str) -> dict:
    """The CNI plugin's ADD, in-process: the attributes it records are the ones under test."""
    conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "dsipam",
            "ipam": {"type": "dsipam", "endpoint": target, "pool": pool, "node": node,
                     "ipFamilyPolicy": "RequireDualStack"}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": container, "CNI_IFNAME": "eth0", "CNI_NETNS": "/var/run/netns/x",
           "CNI_PATH": "/opt/cni/bin",
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_UID={uid}"}
    rc, out = _plugin.run(env, json.dumps(conf).encode())
    assert rc == 0, out
    return json.loads(out)


def attrs(ns: str, pod: str, uid: str, node: str, container: str) -> dict[str, str]:
    return {"cni.containerID": container, "cni.ifname": "eth0", "cni.node": node, "cni.network": "k8s-pod-network",
            "k8s.namespace": ns, "k8s.pod": pod, "k8s.podUID": uid}


async def test_deleted_and_finished_pods_are_released_after_the_grace(
        start: Callable[..., ControllerProcess], core: client.CoreV1Api, ns: str, ipam: AsyncIpamClient,
        target: str, kube_api: ApiServer) -> None:
    await ipam.create_pool("leak", ["198.18.0.0/24", "fd00:1::/120"], labels=await cluster_labels(kube_api))
    await make_node(core, "node-a")
    pods = {}
    for i in range(4):
        uid = await make_pod(core, ns, f"p{i}", "node-a")
        await asyncio.to_thread(cni_add, target, "leak", "node-a", f"ctr{i}", ns, f"p{i}", uid)
        pods[i] = uid
    # Not the controller's: no k8s.podUID (an RPC client's allocation), and a pod that never existed.
    await ipam.allocate("leak", "rpc/eth0", node="node-a", attributes={"app": "vm"})
    await ipam.allocate("leak", "ghost/eth0", node="node-a",
                        attributes=attrs(ns, "ghost", str(uuid.uuid4()), "node-a", "ghost"))
    ctl = start("--grace", str(GRACE), "--resync-interval", "3600")
    await wait_for(ctl.is_leader, 30, what="leader")

    # Deleting pod 0's object and finishing pod 1 (phase Failed): released, but only after the grace.
    await core.delete_namespaced_pod("p0", ns, grace_period_seconds=0)
    pod1 = await core.read_namespaced_pod_status("p1", ns)
    pod1.status.phase = "Failed"
    await core.replace_namespaced_pod_status("p1", ns, pod1)
    t0 = time.monotonic()
    await asyncio.sleep(GRACE / 2)
    assert await held(ipam, "leak", "ctr0/eth0") and await held(ipam, "leak", "ctr1/eth0")
    await wait_for(lambda: _released(ipam, "leak", ["ctr0/eth0", "ctr1/eth0"]), GRACE + 10, what="pod pair released")
    took = time.monotonic() - t0
    assert took >= GRACE * 0.9
    # The ghost (no pod ever): seen gone by the first resync, released a grace later; the others stay.
    await wait_for(lambda: _released(ipam, "leak", ["ghost/eth0"]), GRACE + 10, what="ghost released")
    for owner in ("ctr2/eth0", "ctr3/eth0", "rpc/eth0"):
        assert await held(ipam, "leak", owner), owner
    assert ctl.metric("dsipam_controller_leaks_released_total", pool="leak") == 3
    # The finished pod (phase Failed) is not called gone: its object is still there.
    assert f"released leak/ctr1/eth0: pod {pods[1]} is gone or finished" in ctl.log(), ctl.log()[-3000:]
    print(f"\npod deleted -> pair released after {took:.2f}s (grace {GRACE}s)")


async def _released(ipam: AsyncIpamClient, pool: str, owners: list[str]) -> bool:
    for owner in owners:
        if await held(ipam, pool, owner):
            return False
    return True


async def test_pod_created_during_resync_is_never_collected(
        start: Callable[..., ControllerProcess], core: client.CoreV1Api, ns: str, ipam: AsyncIpamClient, kube_api: ApiServer) -> None:
    """Resyncs run back to back with NO grace (0 s), so only the order (allocations listed before
    pods) protects a pod that is being created: each round creates a pod and at once allocates for
    it, as the CNI plugin does after the API server has the pod. Meanwhile pods deleted in the same
    rounds must be collected (the test can fail both ways)."""
    await ipam.create_pool("race", ["198.18.4.0/22", "fd00:4::/118"], labels=await cluster_labels(kube_api))
    await make_node(core, "node-r")
    ctl = start("--grace", "0", "--resync-interval", "0.05")
    await wait_for(ctl.is_leader, 30, what="leader")
    rounds, deleted = 120, []
    rng = random.Random(14)
    owners = []
    for i in range(rounds):
        uid = await make_pod(core, ns, f"r{i}", "node-r")
        await asyncio.sleep(rng.random() * 0.02)
        owner = f"race{i}/eth0"
        await ipam.allocate("race", owner, node="node-r", policy="require_dual_stack",
                            attributes=attrs(ns, f"r{i}", uid, "node-r", f"race{i}"))
        owners.append(owner)
        if i % 10 == 9:  # some pods go away: those must be collected
            await core.delete_namespaced_pod(f"r{i - 5}", ns, grace_period_seconds=0)
            deleted.append(f"race{i - 5}/eth0")
    await wait_for(lambda: _released(ipam, "race", deleted), 15, what="deleted pods collected")
    resyncs = ctl.metric("dsipam_controller_reconciles_total", kind="resync")
    alive = [o for o in owners if o not in deleted]
    missing = [o for o in alive if not await held(ipam, "race", o)]
    print(f"\nrace: {rounds} pods created during back-to-back resyncs ({resyncs:.0f} resyncs, grace 0 s): "
          f"{len(missing)} live pod(s) collected, {len(deleted)} deleted pods collected")
    assert not missing, missing
    assert resyncs >= 10
    assert ctl.metric("dsipam_controller_leaks_released_total", pool="race") == len(deleted)


async def test_deleted_node_releases_its_allocations_and_blocks_in_every_pool(
        start: Callable[..., ControllerProcess], core: client.CoreV1Api, ns: str, ipam: AsyncIpamClient,
        target: str, kube_api: ApiServer) -> None:
    await ipam.create_pool("na", ["198.18.8.0/24", "fd00:8::/120"], cooldown=1, labels=await cluster_labels(kube_api))
    await ipam.create_pool("nb", ["198.18.9.0/24"], cooldown=1, labels=await cluster_labels(kube_api))
    for node in ("node-x", "node-y"):
        await make_node(core, node)
    for i, (pool, node) in enumerate([("na", "node-x"), ("na", "node-x"), ("nb", "node-x"), ("na", "node-y"),
                                      ("nb", "node-y")]):
        uid = await make_pod(core, ns, f"n{i}", node)  # the pods stay (no pod GC here): only the node goes
        if pool == "na":
            await asyncio.to_thread(cni_add, target, pool, node, f"n{i}", ns, f"n{i}", uid)
        else:
            await ipam.allocate(pool, f"n{i}/eth0", node=node, attributes=attrs(ns, f"n{i}", uid, node, f"n{i}"))
    assert [b async for b in ipam.iter_blocks("na", node="node-x")]
    assert [b async for b in ipam.iter_blocks("nb", node="node-x")]
    ctl = start("--grace", str(GRACE), "--resync-interval", "3600")
    await wait_for(ctl.is_leader, 30, what="leader")
    await asyncio.sleep(1)

    await core.delete_node("node-x")
    t0 = time.monotonic()
    await asyncio.sleep(GRACE / 2)
    assert await held(ipam, "na", "n0/eth0")  # not before the grace
    await wait_for(lambda: _released(ipam, "na", ["n0/eth0", "n1/eth0"]), GRACE + 10, what="node-x released (na)")
    await wait_for(lambda: _released(ipam, "nb", ["n2/eth0"]), 5, what="node-x released (nb)")
    took = time.monotonic() - t0
    # The blocks go once their released addresses are out of the pools' cooldown (1 s here).
    for pool in ("na", "nb"):
        await wait_for(lambda p=pool: _no_blocks(ipam, p, "node-x"), 10, what=f"node-x blocks freed in {pool}")
    blocks_took = time.monotonic() - t0
    assert await held(ipam, "na", "n3/eth0") and await held(ipam, "nb", "n4/eth0")
    assert [b async for b in ipam.iter_blocks("na", node="node-y")]
    assert ctl.metric("dsipam_controller_nodes_released_total") == 1
    assert ctl.metric("dsipam_controller_node_allocations_released_total") == 3

    # The node comes back under the same name: it starts clean, and what it allocates now stays.
    await make_node(core, "node-x")
    uid = await make_pod(core, ns, "again", "node-x")
    await asyncio.to_thread(cni_add, target, "na", "node-x", "again", ns, "again", uid)
    blocks = [b async for b in ipam.iter_blocks("na", node="node-x")]
    assert sum(b.used for b in blocks) == 2  # the new pod's pair only
    await asyncio.sleep(GRACE + 1)
    assert await held(ipam, "na", "again/eth0")
    print(f"\nnode deleted -> 3 allocations in 2 pools released after {took:.2f}s, its blocks after "
          f"{blocks_took:.2f}s (grace {GRACE}s, cooldown 1s)")


async def _no_blocks(ipam: AsyncIpamClient, pool: str, node: str) -> bool:
    return [b async for b in ipam.iter_blocks(pool, node=node)] == []
