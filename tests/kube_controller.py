"""Helpers shared by the controller's reconcile tests (test_kube_reconcile.py, test_kube_attack.py);
their fixtures (start, core, ns, ipam) are in tests/e2e/conftest.py."""

from __future__ import annotations

from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from dsipam.client import AllocationNotFound, AsyncIpamClient

GRACE = 3.0
LEASE = ["--lease-duration", "4", "--renew-deadline", "3", "--retry-period", "0.5", "--status-interval", "30"]


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


async def held(ipam: AsyncIpamClient, pool: str, owner: str) -> bool:
    try:
        await ipam.get_allocation(pool, owner)
        return True
    except AllocationNotFound:
        return False
