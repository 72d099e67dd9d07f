"""Attacks on the Kubernetes controller (issue 14 review): each test is a reproduction of a finding,
against a real API server, a real dsipam server and real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from kube import ApiServer, ControllerProcess, cluster_labels, load_yaml_files, wait_for
from kube_controller import GRACE, held, make_node, make_pod
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from dsipam.client import AsyncIpamClient
from dsipam.server.kube_auth import KubeAuthConfig, KubeAuthError, KubeTokenVerifier

CNI_YAML = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "cni.yaml"

def attrs(ns: str, pod: str, uid: str, node: str) -> dict[str, str]:
    return {"cni.containerID": pod, "cni.ifname": "eth0", "cni.node": node, "cni.network": "k8s-pod-network",
            "k8s.namespace": ns, "k8s.pod": pod, "k8s.podUID": uid}


async def test_node_deleted_and_recreated_within_the_grace_keeps_its_live_pods(
        start: Callable[..., ControllerProcess], core: client.CoreV1Api, ns: str, ipam: AsyncIpamClient, kube_api: ApiServer) -> None:
    """The kubelet re-registers a Node object that was deleted while it runs (``kubectl delete node``):
    its pods keep running with their addresses. A release of the node's allocations after the grace
    would hand a running pod's address to the next pod (a duplicate IP)."""
    await ipam.create_pool("rn", ["198.18.10.0/24"], cooldown=1, labels=await cluster_labels(kube_api))
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


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


async def test_a_flood_of_forged_tokens_does_not_lock_out_a_shim_already_verified(
        kube_api: ApiServer, core: client.CoreV1Api, ns: str, tmp_path: Path) -> None:
    """Anyone who reaches the server can forge JWTs that pass the cheap checks (listed ServiceAccount,
    audience, future expiry: all public) and so keep the TokenReview bucket empty. A shim's token
    is reviewed again every cacheSeconds: the flood must not turn its next re-review into
    TOKEN_REVIEW_BUSY (every CNI ADD on every node would fail while the flood lasts)."""
    await make_node(core, "node-f")
    pod = await core.create_namespaced_pod(ns, client.V1Pod(
        metadata=client.V1ObjectMeta(name="dsipam-cni-f"),
        spec=client.V1PodSpec(node_name="node-f", service_account_name="dsipam-cni",
                              containers=[client.V1Container(name="c", image="pause")])))
    token = await kube_api.async_service_account_token(ns, "dsipam-cni", audiences=["dsipam"],
                                                       bound_pod=(pod.metadata.name, pod.metadata.uid))
    await kube_api.async_apply([d for d in load_yaml_files([CNI_YAML])
                                if d["kind"] in ("ClusterRole", "ClusterRoleBinding")])
    try:
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="dsipam-system")))
    except ApiException as exc:
        if exc.status != 409:
            raise
    server_token = await kube_api.async_service_account_token("dsipam-system", "dsipam")
    cfg = KubeAuthConfig.from_mapping({
        "serviceAccounts": [{"namespace": ns, "name": "dsipam-cni", "role": "shim"}],
        "kubeconfig": str(kube_api.write_kubeconfig(tmp_path / "kubeconfig", server_token)),
        "cacheSeconds": 1, "reviewsPerSecond": 0.01, "reviewBurst": 5}, "test")
    verifier = KubeTokenVerifier(cfg)
    try:
        assert (await verifier.verify(token)).node == "node-f"
        sub = f"system:serviceaccount:{ns}:dsipam-cni"
        busy = 0
        for i in range(20):
            forged = ".".join((_b64({"alg": "RS256"}), _b64({"aud": ["dsipam"], "sub": sub, "jti": str(i),
                                                               "exp": int(time.time()) + 3600}), "c2ln"))
            with pytest.raises(KubeAuthError) as err:
                await verifier.verify(forged)
            busy += err.value.reason == "TOKEN_REVIEW_BUSY"
        assert busy >= 15  # the bucket is empty
        await asyncio.sleep(1.2)  # the shim's verified entry has expired: it is reviewed again
        entry = await verifier.verify(token)
        assert entry.node == "node-f"
        assert verifier.reviews["accepted"] == 2
    finally:
        await verifier.close()


async def test_a_static_pods_allocation_is_kept_while_its_mirror_pod_lives(
        start: Callable[..., ControllerProcess], core: client.CoreV1Api, ns: str, ipam: AsyncIpamClient, kube_api: ApiServer) -> None:
    """A static pod (a manifest on the node) runs under the UID the kubelet gives it, the hash of its
    manifest; that is the K8S_POD_UID the CNI plugin records. The API server only holds its mirror
    pod, whose metadata.uid is another one and whose annotation kubernetes.io/config.mirror names
    the static UID. A resync that knows only metadata.uid releases the running static pod's address."""
    await ipam.create_pool("sp", ["198.18.11.0/24"], cooldown=1, labels=await cluster_labels(kube_api))
    await make_node(core, "node-s")
    static_uid = uuid.uuid4().hex  # what the kubelet derives from the manifest
    mirror_uid = await make_pod(core, ns, "static-web-node-s", "node-s", annotations={
        "kubernetes.io/config.mirror": static_uid, "kubernetes.io/config.hash": static_uid,
        "kubernetes.io/config.source": "file"})
    assert mirror_uid != static_uid
    await ipam.allocate("sp", "static/eth0", node="node-s", attributes=attrs(ns, "static-web-node-s", static_uid,
                                                                             "node-s"))
    await asyncio.sleep(GRACE + 0.5)  # older than the grace
    ctl = start("--grace", str(GRACE), "--resync-interval", "1")
    await wait_for(ctl.is_leader, 30, what="leader")
    await asyncio.sleep(2 * GRACE + 3)  # several resyncs, each past the grace
    assert ctl.metric("dsipam_controller_reconciles_total", kind="resync") >= 3
    assert await held(ipam, "sp", "static/eth0"), "a running static pod's address was released"


async def test_a_replica_whose_clock_runs_ahead_does_not_take_a_lease_that_is_being_renewed(
        start: Callable[..., ControllerProcess], kube_api: ApiServer) -> None:
    """The holder renews the Lease every 0.5 s, but its clock is 20 s behind (its renewTime looks 20 s
    old, older than the 4 s lease duration). A standby that compares renewTime with its own clock
    takes the Lease from a live leader: two replicas act. The standby must expire the Lease by how
    long it has watched it unchanged (client-go's observedTime), not by the holder's clock."""
    import datetime as dt

    stop = asyncio.Event()

    async with kube_api.api_client() as raw:
        coord = client.CoordinationV1Api(raw)

        async def write(lease: client.V1Lease | None) -> None:
            spec = client.V1LeaseSpec(holder_identity="skewed-leader", lease_duration_seconds=4,
                                      renew_time=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=20),
                                      acquire_time=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60))
            if lease is None:
                await coord.create_namespaced_lease("dsipam-system", client.V1Lease(
                    metadata=client.V1ObjectMeta(name="dsipam-controller"), spec=spec))
            else:
                lease.spec = spec
                await coord.replace_namespaced_lease("dsipam-controller", "dsipam-system", lease)

        async def renew() -> None:
            while not stop.is_set():
                try:
                    lease = await coord.read_namespaced_lease("dsipam-controller", "dsipam-system")
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    lease = None
                if lease is not None and lease.spec.holder_identity not in (None, "skewed-leader"):
                    return  # taken
                await write(lease)
                await asyncio.sleep(0.5)

        renewer = asyncio.create_task(renew())
        try:
            await asyncio.sleep(1)
            ctl = start("--grace", "60", "--resync-interval", "3600", identity="ahead")
            await asyncio.sleep(8)  # two lease durations with the holder renewing
            assert not ctl.is_leader(), "a standby took the Lease from a holder that renews it"
            stop.set()
            await renewer
            await wait_for(ctl.is_leader, 15, what="the standby takes over once the holder stops renewing")
        finally:
            stop.set()
            await asyncio.gather(renewer, return_exceptions=True)


async def test_an_ippool_whose_block_size_exceeds_its_range_is_not_rewritten_on_every_pass(
        start: Callable[..., ControllerProcess], kube_api: ApiServer) -> None:
    """blockSize 65536 on a /24 passes the CRD (a power of two up to 65536) and the server makes the
    range's blocks 256 addresses. Compared with the spec as written, the range looked changed on
    every status pass: removed (dropping its cooldown) and added again, while Synced said True."""
    g, v, p = "ipam.dsipam.io", "v1alpha1", "ippools"
    ctl = start("--grace", "60", "--resync-interval", "3600", "--status-interval", "0.3", identity="blocks")
    await wait_for(ctl.is_leader, 30, what="leader")
    async with kube_api.api_client() as raw:
        custom = client.CustomObjectsApi(raw)
        await custom.create_cluster_custom_object(g, v, p, {
            "apiVersion": f"{g}/{v}", "kind": "IPPool", "metadata": {"name": "wide-blocks"},
            "spec": {"ranges": [{"cidr": "198.18.12.0/24", "blockSize": 65536, "exclude": ["198.18.12.7"]},
                                {"cidr": "fd00:12::/120", "blockSize": 1024}, {"cidr": "198.18.13.0/24"}]}})
        try:
            await wait_for(lambda: ctl.metric("dsipam_controller_pool_writes_total", op="create") == 1, 20,
                           what="pool created")
            await asyncio.sleep(3)  # ten status passes
            assert ctl.metric("dsipam_controller_pool_writes_total", op="remove-range") == 0
            assert ctl.metric("dsipam_controller_pool_writes_total", op="add-range") == 0
            obj = await custom.get_cluster_custom_object(g, v, p, "wide-blocks")
            synced = {c["type"]: c for c in obj["status"]["conditions"]}["Synced"]
            assert synced["status"] == "True", synced
        finally:
            await custom.patch_cluster_custom_object(g, v, p, "wide-blocks",
                                                     {"metadata": {"annotations": {"ipam.dsipam.io/force-delete": "true"}}},
                                                     _content_type="application/merge-patch+json")
            await custom.delete_cluster_custom_object(g, v, p, "wide-blocks")
            await wait_for(lambda: _ippool_gone(custom, "wide-blocks"), 15, what="IPPool deleted")


async def _ippool_gone(custom: client.CustomObjectsApi, name: str) -> bool:
    try:
        await custom.get_cluster_custom_object("ipam.dsipam.io", "v1alpha1", "ippools", name)
    except ApiException as exc:
        return exc.status == 404
    return False
