"""Attacks on the Kubernetes controller (issue 14 review): each test is a reproduction of a finding,
against a real API server, a real dsipam server and real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from kube import ApiServer, ControllerProcess, install_controller_manifests, wait_for
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from dsipam.client import AllocationNotFound, AsyncIpamClient

GRACE = 3.0
LEASE = ["--lease-duration", "4", "--renew-deadline", "3", "--retry-period", "0.5", "--status-interval", "30"]


@pytest.fixture
async def start(kube_api: ApiServer, target: str, tmp_path: Path) -> AsyncIterator[Callable[..., ControllerProcess]]:
    kubeconfig = await install_controller_manifests(kube_api, tmp_path)
    started: list[ControllerProcess] = []

    def _start(*args: str, identity: str = "attack-test") -> ControllerProcess:
        proc = ControllerProcess(kubeconfig, target, tmp_path / f"{identity}-{len(started)}.log", identity=identity,
                                 args=[*LEASE, *args])
        started.append(proc)
        return proc

    try:
        yield _start
        for proc in started:
            proc.check()
    finally:
        for proc in started:
            proc.terminate()


@pytest.fixture
async def core(kube_api: ApiServer) -> AsyncIterator[client.CoreV1Api]:
    async with kube_api.api_client() as api:
        yield client.CoreV1Api(api)


@pytest.fixture
async def ns(core: client.CoreV1Api) -> AsyncIterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    await core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
    await core.delete_namespace(name)


@pytest.fixture
async def ipam(target: str) -> AsyncIterator[AsyncIpamClient]:
    async with AsyncIpamClient(target) as c:
        yield c


async def make_node(core: client.CoreV1Api, name: str) -> None:
    try:
        await core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name)))
    except ApiException as exc:
        if exc.status != 409:
            raise


async def make_pod(core: client.CoreV1Api, ns: str, name: str, node: str,
                   annotations: dict[str, str] | None = None) -> str:
    pod = client.V1Pod(metadata=client.V1ObjectMeta(name=name, namespace=ns, annotations=annotations),
                       spec=client.V1PodSpec(node_name=node, containers=[client.V1Container(name="c", image="pause")]))
    return (await core.create_namespaced_pod(ns, pod)).metadata.uid


def attrs(ns: str, pod: str, uid: str, node: str) -> dict[str, str]:
    return {"cni.containerID": pod, "cni.ifname": "eth0", "cni.node": node, "cni.network": "k8s-pod-network",
            "k8s.namespace": ns, "k8s.pod": pod, "k8s.podUID": uid}


async def held(ipam: AsyncIpamClient, pool: str, owner: str) -> bool:
    try:
        await ipam.get_allocation(pool, owner)
        return True
    except AllocationNotFound:
        return False


async def test_node_deleted_and_recreated_within_the_grace_keeps_its_live_pods(
        start: Callable[..., ControllerProcess], core: client.CoreV1Api, ns: str, ipam: AsyncIpamClient) -> None:
    """The kubelet re-registers a Node object that was deleted while it runs (``kubectl delete node``):
    its pods keep running with their addresses. A release of the node's allocations after the grace
    would hand a running pod's address to the next pod (a duplicate IP)."""
    await ipam.create_pool("rn", ["198.18.10.0/24"], cooldown=1)
    await make_node(core, "node-r")
    uid = await make_pod(core, ns, "live", "node-r")
    await ipam.allocate("rn", "live/eth0", node="node-r", attributes=attrs(ns, "live", uid, "node-r"))
    ctl = start("--grace", str(GRACE), "--resync-interval", "3600")
    await wait_for(ctl.is_leader, 30, what="leader")
    await asyncio.sleep(1)
    await core.delete_node("node-r")
    await asyncio.sleep(0.3)
    await make_node(core, "node-r")  # the kubelet registers it again
    await asyncio.sleep(GRACE + 3)
    assert await held(ipam, "rn", "live/eth0"), "a running pod's address was released: its node came back"
    assert ctl.metric("dsipam_controller_node_allocations_released_total") == 0
