"""The real API server fixture (tests/kube.py): admin, a non-admin identity, ServiceAccount tokens under
RBAC, and a restart on the same port and etcd that keeps the objects."""

from __future__ import annotations

import pytest
from kube import ApiServer
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException


async def test_admin_and_rbac(kube_api: ApiServer) -> None:
    async with kube_api.api_client() as api:
        core = client.CoreV1Api(api)
        names = {ns.metadata.name for ns in (await core.list_namespace()).items}
        assert "default" in names
    async with kube_api.api_client(kube_api.viewer_token) as api:
        with pytest.raises(ApiException) as info:
            await client.CoreV1Api(api).list_namespace()
        assert info.value.status == 403


async def test_service_account_token_runs_under_its_rbac(kube_api: ApiServer) -> None:
    token = await kube_api.async_service_account_token("default", "fixture-probe")
    async with kube_api.api_client(token) as api:
        with pytest.raises(ApiException) as info:
            await client.CoreV1Api(api).list_node()
        assert info.value.status == 403
        assert "system:serviceaccount:default:fixture-probe" in info.value.body
    await kube_api.async_apply([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "fixture-probe"}, "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "fixture-probe"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "fixture-probe"},
         "subjects": [{"kind": "ServiceAccount", "name": "fixture-probe", "namespace": "default"}]},
    ])
    async with kube_api.api_client(token) as api:
        await client.CoreV1Api(api).list_node()


def test_restart_keeps_state(kube_api: ApiServer) -> None:
    import asyncio

    async def make() -> None:
        async with kube_api.api_client() as api:
            await client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="restart-probe")))

    async def read() -> str:
        async with kube_api.api_client() as api:
            return (await client.CoreV1Api(api).read_namespace("restart-probe")).metadata.name

    asyncio.run(make())
    port = kube_api.port
    kube_api.restart_apiserver()
    assert kube_api.port == port
    assert asyncio.run(read()) == "restart-probe"
