"""Two clusters, one dsipam server: each cluster's controller keeps the other's addresses.

Cluster A is the session's API server, cluster B a second one (etcd + kube-apiserver) started for
this module; each runs its own controller under the controller's RBAC, with its default cluster id
(its kube-system Namespace's UID). Both serve LoadBalancer Services from one shared pool, and each
has pods in a pool labelled with its own id. Before the cluster id, each controller's resync
released the other's Service addresses (their Service UIDs are not in its cluster), its pods'
addresses (not its pods) and, through the node path, everything the other's nodes held (not its
nodes). The test also shows that each still reclaims its own: a gone Service's and a gone pod's
allocations, made the way the controller and the CNI plugin make them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from kube import (
    CLUSTER_LABEL,
    ApiServer,
    ControllerProcess,
    cluster_id,
    install_controller_manifests,
    running_api_server,
    wait_for,
)
from kube_controller import LEASE, held, make_node, make_pod
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from dsipam.client import AsyncIpamClient

CLASS = "ipam.dsipam.io/lb"


@pytest.fixture(scope="module")
def kube_b() -> Iterator[ApiServer]:
    yield from running_api_server()


def lb_service(name: str, pool: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "annotations": {"ipam.dsipam.io/pool": pool}},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": CLASS, "ipFamilyPolicy": "SingleStack",
                     "ipFamilies": ["IPv4"], "ports": [{"port": 80, "protocol": "TCP"}]}}


def pod_attrs(ns: str, pod: str, uid: str, node: str) -> dict[str, str]:
    return {"cni.containerID": pod, "cni.ifname": "eth0", "cni.node": node, "cni.network": "k8s-pod-network",
            "k8s.namespace": ns, "k8s.pod": pod, "k8s.podUID": uid}


def svc_attrs(cluster: str | None, ns: str, name: str, uid: str) -> dict[str, str]:
    out = {"k8s.kind": "Service", "k8s.namespace": ns, "k8s.service": name, "k8s.serviceUID": uid}
    if cluster is not None:
        out["k8s.cluster"] = cluster
    return out


async def strip_and_delete(core: client.CoreV1Api, ns: str) -> None:
    for svc in (await core.list_namespaced_service(ns)).items:
        try:
            if svc.metadata.finalizers:
                await core.patch_namespaced_service(svc.metadata.name, ns, {"metadata": {"finalizers": None}},
                                                    _content_type="application/merge-patch+json")
            await core.delete_namespaced_service(svc.metadata.name, ns)
        except ApiException as exc:
            if exc.status != 404:
                raise
    await core.delete_collection_namespaced_pod(ns, grace_period_seconds=0)
    await core.delete_namespace(ns)


@pytest.fixture
async def clusters(kube_api: ApiServer, kube_b: ApiServer) -> AsyncIterator[dict[str, tuple]]:
    """{"a": (api server, core client, namespace), "b": ...}; the namespaces go afterwards."""
    out = {}
    clients = []
    try:
        for key, api in (("a", kube_api), ("b", kube_b)):
            c = api.api_client()
            clients.append(c)
            core = client.CoreV1Api(c)
            ns = f"mc{key}-{uuid.uuid4().hex[:6]}"
            await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
            out[key] = (api, core, ns)
        yield out
    finally:
        for _, core, ns in out.values():
            await strip_and_delete(core, ns)
        for c in clients:
            await c.close()


async def test_two_clusters_on_one_dsipam_keep_each_others_addresses(
        clusters: dict[str, tuple], start: Callable[..., ControllerProcess], target: str, tmp_path: Path,
        ipam: AsyncIpamClient) -> None:
    ids = {k: await cluster_id(api) for k, (api, _, _) in clusters.items()}
    assert ids["a"] != ids["b"]
    await ipam.create_pool("mc-lb", ["198.18.40.0/24"], labels={"ipam.dsipam.io/services": "allowed"}, cooldown=0)
    for k in ids:
        await ipam.create_pool(f"mc-pods-{k}", [f"198.18.{41 if k == 'a' else 42}.0/24"],
                               labels={CLUSTER_LABEL: ids[k]}, cooldown=0)
    # Each cluster: a live pod on a live node with its address, a Service to be served; and what
    # each one's controller must reclaim: a gone pod's address, a gone Service's address.
    keep: list[tuple[str, str]] = []  # (pool, owner) that must stay
    reclaim: list[tuple[str, str]] = []  # (pool, owner) that its own cluster's controller releases
    for k, (_, core, ns) in clusters.items():
        node = f"node-{k}"  # each cluster's node is absent from the other
        await make_node(core, node)
        uid = await make_pod(core, ns, "web", node)
        await ipam.allocate(f"mc-pods-{k}", f"web-{k}/eth0", node=node, attributes=pod_attrs(ns, "web", uid, node))
        keep.append((f"mc-pods-{k}", f"web-{k}/eth0"))
        ghost = str(uuid.uuid4())
        await ipam.allocate(f"mc-pods-{k}", f"ghost-{k}/eth0", node=node,
                            attributes=pod_attrs(ns, "ghost", ghost, node))
        reclaim.append((f"mc-pods-{k}", f"ghost-{k}/eth0"))
        gone = str(uuid.uuid4())
        owner = f"svc/{ns}/gone/{gone}"
        await ipam.allocate("mc-lb", owner, attributes=svc_attrs(ids[k], ns, "gone", gone))
        reclaim.append(("mc-lb", owner))
        await core.create_namespaced_service(ns, lb_service("web", "mc-lb"))
    # Made before the cluster id existed, by a Service neither cluster has: kept by both (it may be
    # a third cluster's), named in their logs.
    legacy = str(uuid.uuid4())
    legacy_owner = f"svc/elsewhere/old/{legacy}"
    await ipam.allocate("mc-lb", legacy_owner, attributes=svc_attrs(None, "elsewhere", "old", legacy))
    keep.append(("mc-lb", legacy_owner))

    args = ["--grace", "1", "--resync-interval", "1"]
    ctl_a = start(*args, identity="mc-a")
    kubeconfig_b = await install_controller_manifests(clusters["b"][0], tmp_path)
    ctl_b = ControllerProcess(kubeconfig_b, target, tmp_path / "mc-b.log", identity="mc-b", args=[*LEASE, *args])
    try:
        for ctl in (ctl_a, ctl_b):
            await wait_for(ctl.is_leader, 30, what=f"{ctl.identity} leads")
        owners = {}
        for k, (_, core, ns) in clusters.items():
            svc = await core.read_namespaced_service("web", ns)
            owners[k] = f"svc/{ns}/web/{svc.metadata.uid}"

            async def served(core: client.CoreV1Api = core, ns: str = ns) -> bool:
                s = await core.read_namespaced_service_status("web", ns)
                return bool(s.status.load_balancer and s.status.load_balancer.ingress)

            await wait_for(served, 20, what=f"cluster {k}'s Service served")
            a = await ipam.get_allocation("mc-lb", owners[k])
            assert a.attributes["k8s.cluster"] == ids[k], a.attributes
            keep.append(("mc-lb", owners[k]))

        async def reclaimed() -> bool:
            return not any([await held(ipam, p, o) for p, o in reclaim])

        await wait_for(reclaimed, 15, what=f"each cluster's own gone pod and Service released: {reclaim}")

        # Several resyncs of both kinds on both sides, past the grace: the other's addresses stay.
        def resyncs(ctl: ControllerProcess) -> float:
            return min(ctl.metric("dsipam_controller_reconciles_total", kind="resync"),
                       ctl.metric("dsipam_controller_reconciles_total", kind="service-resync"))

        base = {c.identity: resyncs(c) for c in (ctl_a, ctl_b)}
        await wait_for(lambda: all(resyncs(c) >= base[c.identity] + 3 for c in (ctl_a, ctl_b)), 20,
                       what="three more resyncs on each side")
        await asyncio.sleep(1.5)  # a node or pod first seen gone by the last resync: past its grace too
        lost = [(p, o) for p, o in keep if not await held(ipam, p, o)]
        assert not lost, f"released another cluster's addresses: {lost}\n--- A\n{ctl_a.log()[-3000:]}\n" \
                         f"--- B\n{ctl_b.log()[-3000:]}"
        for ctl in (ctl_a, ctl_b):
            assert f"Service allocation {legacy_owner} in pool(s) mc-lb has no k8s.cluster attribute" in ctl.log()
            assert ctl.metric("dsipam_controller_node_allocations_released_total") == 0
        ctl_b.check()
    finally:
        ctl_b.terminate()
