"""Start-up order: no LoadBalancer Service is reconciled before the namespaces (and IPPools) are in
the controller's caches. A Service that relies on its namespace's ``ipam.dsipam.io/pool`` annotation
would otherwise get the ``--lb-default-pool`` address, from the wrong pool.

The namespace list is held back honestly: the controller starts under a ServiceAccount whose
ClusterRole is the real one less ``namespaces`` (its namespace list is refused, 403, and retried),
and the real ClusterRole is bound to it only after the Services have been listed and swept. Real
API server, dsipam server and PostgreSQL."""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kube import (
    CONTROLLER_NS,
    DEPLOY,
    ApiServer,
    ControllerProcess,
    install_controller_manifests,
    load_yaml_files,
    wait_for,
)
from kube_controller import LEASE
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from dsipam.client import AllocationNotFound, AsyncIpamClient

SA = "dsipam-ctl-late-ns"
ROLE = "dsipam-controller-no-namespaces"
SERVICES_LABEL = {"ipam.dsipam.io/services": "allowed"}


@pytest.fixture
async def rbac(kube_api: ApiServer, tmp_path: Path) -> AsyncIterator[Path]:
    """A kubeconfig of ServiceAccount ``SA``: the controller's rights less namespaces, the Lease Role."""
    await install_controller_manifests(kube_api, tmp_path)
    docs = load_yaml_files([DEPLOY / "controller.yaml"])
    role = copy.deepcopy(next(d for d in docs if d["kind"] == "ClusterRole"))
    role["metadata"]["name"] = ROLE
    role["rules"] = [r for r in role["rules"] if "namespaces" not in r["resources"]]
    assert len(role["rules"]) == len(next(d for d in docs if d["kind"] == "ClusterRole")["rules"]) - 1
    subject = [{"kind": "ServiceAccount", "name": SA, "namespace": CONTROLLER_NS}]
    rb = "rbac.authorization.k8s.io"
    await kube_api.async_apply([
        role,
        {"apiVersion": f"{rb}/v1", "kind": "ClusterRoleBinding", "metadata": {"name": ROLE},
         "roleRef": {"apiGroup": rb, "kind": "ClusterRole", "name": ROLE}, "subjects": subject},
        {"apiVersion": f"{rb}/v1", "kind": "RoleBinding", "metadata": {"name": SA, "namespace": CONTROLLER_NS},
         "roleRef": {"apiGroup": rb, "kind": "Role", "name": "dsipam-controller-leader"}, "subjects": subject},
    ])
    token = await kube_api.async_service_account_token(CONTROLLER_NS, SA)
    yield kube_api.write_kubeconfig(tmp_path / "late-ns.kubeconfig", token)
    async with kube_api.api_client() as c:
        api = client.RbacAuthorizationV1Api(c)
        for name in (ROLE, f"{SA}-full"):
            try:
                await api.delete_cluster_role_binding(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


async def test_a_service_waits_for_its_namespaces_pool_annotation(
        rbac: Path, kube_api: ApiServer, target: str, tmp_path: Path, ipam: AsyncIpamClient) -> None:
    await ipam.create_pool("nspool", ["198.18.44.0/24"], labels=SERVICES_LABEL, cooldown=0)
    await ipam.create_pool("dflt", ["198.18.45.0/24"], labels=SERVICES_LABEL, cooldown=0)
    ns = f"late-{uuid.uuid4().hex[:6]}"
    async with kube_api.api_client() as c:
        core = client.CoreV1Api(c)
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
            name=ns, annotations={"ipam.dsipam.io/pool": "nspool"})))
        svc = await core.create_namespaced_service(ns, {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "ipam.dsipam.io/lb", "ipFamilyPolicy": "SingleStack",
                     "ipFamilies": ["IPv4"], "ports": [{"port": 80, "protocol": "TCP"}]}})
        owner = f"svc/{ns}/web/{svc.metadata.uid}"
        ctl = ControllerProcess(rbac, target, tmp_path / "late-ns.log", identity="late-ns",
                                args=[*LEASE, "--cluster-id", "late-ns-test", "--lb-default-pool", "dflt",
                                      "--resync-interval", "3600"])
        try:
            await wait_for(ctl.is_leader, 30, what="leader")
            # The Services and IPPools are listed, the namespace list refused twice (seconds apart):
            # before the fix the Service was swept and reconciled by now, with the default pool.
            for kind in ("services", "ippools"):
                await wait_for(lambda kind=kind: ctl.metric("dsipam_controller_relists_total", kind=kind) >= 1,
                               20, what=f"the {kind} listed")
            await wait_for(lambda: ctl.metric("dsipam_controller_watch_restarts_total", kind="namespaces",
                                              reason="error") >= 2, 20, what="the namespace list refused twice")
            for pool in ("dflt", "nspool"):
                with pytest.raises(AllocationNotFound):
                    await ipam.get_allocation(pool, owner)
            s = await core.read_namespaced_service_status("web", ns)
            assert not (s.status.load_balancer and s.status.load_balancer.ingress), s.status
            assert ctl.metric("dsipam_controller_reconciles_total", kind="service") == 0

            # Namespaces allowed: the list goes through at its next try, then the Service is served
            # from its namespace's pool.
            rb = "rbac.authorization.k8s.io"
            await kube_api.async_apply([{
                "apiVersion": f"{rb}/v1", "kind": "ClusterRoleBinding", "metadata": {"name": f"{SA}-full"},
                "roleRef": {"apiGroup": rb, "kind": "ClusterRole", "name": "dsipam-controller"},
                "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": CONTROLLER_NS}]}])

            async def served() -> list[str]:
                st = (await core.read_namespaced_service_status("web", ns)).status
                return [e.ip for e in (st.load_balancer.ingress or ())] if st.load_balancer else []

            ips = await wait_for(served, 30, what="the Service served once namespaces are listed")
            assert [str(x.ip) for x in (await ipam.get_allocation("nspool", owner)).addresses] == ips
            with pytest.raises(AllocationNotFound):
                await ipam.get_allocation("dflt", owner)
            assert "Traceback" not in ctl.log(), ctl.log()[-3000:]
            assert ctl.errors() == 0, ctl.log()[-3000:]
        finally:
            ctl.terminate()
            await core.patch_namespaced_service("web", ns, {"metadata": {"finalizers": None}},
                                                _content_type="application/merge-patch+json")
            await core.delete_namespace(ns)
