"""Must-show 1: IPPool objects on a real API server drive real dsipam pools (real server, real
PostgreSQL): apply creates the pool, edits add and remove ranges, status shows usage and Ready, the
API server's schema rejects bad objects, the finalizer holds a deletion while allocations live, and
pools made by RPC are left alone. The controller runs under its ServiceAccount's token with the
RBAC of deploy/kubernetes/controller.yaml."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kube import (
    ApiServer,
    ControllerProcess,
    cluster_labels,
    delete_all_ippools,
    install_controller_manifests,
    wait_for,
)
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from dsipam.client import AsyncIpamClient, PoolNotFound

G, V, P = "ipam.dsipam.io", "v1alpha1", "ippools"
FAST = ["--grace", "2", "--resync-interval", "5", "--status-interval", "0.5", "--lease-duration", "4",
        "--renew-deadline", "3", "--retry-period", "0.5"]


@pytest.fixture
async def ctl(kube_api: ApiServer, target: str, tmp_path: Path) -> AsyncIterator[ControllerProcess]:
    kubeconfig = await install_controller_manifests(kube_api, tmp_path)
    proc = ControllerProcess(kubeconfig, target, tmp_path / "controller.log", identity="ippool-test", args=FAST)
    try:
        await wait_for(proc.is_leader, 30, what="controller leads")
        yield proc
        proc.check()
    finally:
        proc.terminate()
        await delete_all_ippools(kube_api)


@pytest.fixture
async def custom(kube_api: ApiServer) -> AsyncIterator[client.CustomObjectsApi]:
    async with kube_api.api_client() as api:
        yield client.CustomObjectsApi(api)


@pytest.fixture
async def ipam(target: str) -> AsyncIterator[AsyncIpamClient]:
    async with AsyncIpamClient(target) as c:
        yield c


def ippool(name: str, ranges: list[dict], **spec: object) -> dict:
    return {"apiVersion": f"{G}/{V}", "kind": "IPPool", "metadata": {"name": name}, "spec": {"ranges": ranges, **spec}}


async def get(custom: client.CustomObjectsApi, name: str) -> dict:
    return await custom.get_cluster_custom_object(G, V, P, name)


def cond(obj: dict, ctype: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or ():
        if c["type"] == ctype:
            return c
    return None


async def test_apply_edit_status_and_delete(ctl: ControllerProcess, custom: client.CustomObjectsApi,
                                            ipam: AsyncIpamClient, kube_api: ApiServer) -> None:
    await custom.create_cluster_custom_object(G, V, P, ippool(
        "pods-a", [{"cidr": "198.18.0.0/24", "gateway": "198.18.0.1", "exclude": ["198.18.0.128/25"]},
                   {"cidr": "fd00:a::/120", "blockSize": 16}],
        cooldown="5s", nodeAffinity="Strict", labels={"team": "net"}))

    async def ready() -> dict | None:
        obj = await get(custom, "pods-a")
        c = cond(obj, "Ready")
        return obj if c and c["status"] == "True" and obj["status"].get("observedGeneration") == 1 else None

    obj = await wait_for(ready, 20, what="IPPool Ready")
    pool = await ipam.get_pool("pods-a")
    assert {str(r.cidr) for r in pool.ranges} == {"198.18.0.0/24", "fd00:a::/120"}
    assert pool.labels == {"team": "net", "ipam.dsipam.io/managed-by": "dsipam-controller",
                           **await cluster_labels(kube_api)}
    assert pool.cooldown.total_seconds() == 5 and str(pool.node_affinity) == "strict"
    v6 = next(r for r in pool.ranges if r.cidr.version == 6)
    assert v6.block_size == 16
    assert "ipam.dsipam.io/pool" in obj["metadata"]["finalizers"]
    assert cond(obj, "Synced")["status"] == "True"
    usage = {u["family"]: u for u in obj["status"]["usage"]}
    assert usage["IPv4"]["size"] == 126 and usage["IPv4"]["allocated"] == 0  # .1-.127 minus the gateway
    assert usage["IPv6"]["allocated"] == 0 and obj["status"]["ipv4Usage"] == "0/126"

    # Usage follows allocations (status refresh).
    for i in range(3):
        await ipam.allocate("pods-a", f"c{i}/eth0", policy="require_dual_stack", node="n1")
    obj = await wait_for(lambda: _usage_is(custom, "pods-a", "3/126"), 10, what="usage 3/126")
    assert {u["family"]: u["allocated"] for u in obj["status"]["usage"]} == {"IPv4": 3, "IPv6": 3}

    # Edit: add a v4 range, change labels; remove the v6 range, which holds allocations: blocked.
    obj = await get(custom, "pods-a")
    obj["spec"]["ranges"] = [obj["spec"]["ranges"][0], {"cidr": "198.18.1.0/24"}]
    obj["spec"]["labels"] = {"team": "infra"}
    await custom.replace_cluster_custom_object(G, V, P, "pods-a", obj)

    async def blocked() -> dict | None:
        o = await get(custom, "pods-a")
        c = cond(o, "Synced")
        return o if c and c["reason"] == "RangeRemovalBlocked" and o["status"]["observedGeneration"] == 2 else None

    obj = await wait_for(blocked, 15, what="RangeRemovalBlocked")
    assert "fd00:a::/120" in cond(obj, "Synced")["message"]
    assert cond(obj, "Ready")["status"] == "True"
    pool = await ipam.get_pool("pods-a")
    assert {str(r.cidr) for r in pool.ranges} == {"198.18.0.0/24", "198.18.1.0/24", "fd00:a::/120"}
    assert pool.labels["team"] == "infra"
    restarts_before = ctl.metric("dsipam_controller_errors_total")

    # Released: the removal goes through on a later pass; no crash loop meanwhile.
    for i in range(3):
        await ipam.release("pods-a", f"c{i}/eth0")

    async def synced() -> dict | None:
        o = await get(custom, "pods-a")
        c = cond(o, "Synced")
        return o if c and c["status"] == "True" else None

    obj = await wait_for(synced, 15, what="Synced after release")
    pool = await ipam.get_pool("pods-a")
    assert {str(r.cidr) for r in pool.ranges} == {"198.18.0.0/24", "198.18.1.0/24"}
    assert [u["family"] for u in obj["status"]["usage"]] == ["IPv4"]
    assert ctl.metric("dsipam_controller_errors_total") == restarts_before == 0

    # Deletion with a live allocation: held by the finalizer, with a condition; then released.
    await ipam.allocate("pods-a", "last/eth0")
    await custom.delete_cluster_custom_object(G, V, P, "pods-a")

    async def deletion_blocked() -> dict | None:
        o = await get(custom, "pods-a")
        c = cond(o, "Ready")
        return o if c and c["reason"] == "DeletionBlocked" else None

    obj = await wait_for(deletion_blocked, 15, what="DeletionBlocked")
    assert "1 allocated" in cond(obj, "Ready")["message"]
    assert (await ipam.get_pool("pods-a")).name == "pods-a"
    await ipam.release("pods-a", "last/eth0")
    await wait_for(lambda: _gone(custom, "pods-a"), 15, what="IPPool deleted")
    with pytest.raises(PoolNotFound):
        await ipam.get_pool("pods-a")


async def _usage_is(custom: client.CustomObjectsApi, name: str, text: str) -> dict | None:
    obj = await get(custom, name)
    return obj if (obj.get("status") or {}).get("ipv4Usage") == text else None


async def _gone(custom: client.CustomObjectsApi, name: str) -> bool:
    try:
        await get(custom, name)
    except ApiException as exc:
        return exc.status == 404
    return False


async def test_force_annotation_deletes_with_allocations(ctl: ControllerProcess, custom: client.CustomObjectsApi,
                                                         ipam: AsyncIpamClient) -> None:
    await custom.create_cluster_custom_object(G, V, P, ippool("pods-f", [{"cidr": "198.18.2.0/24"}]))
    await wait_for(lambda: _ready(custom, "pods-f"), 20, what="Ready")
    await ipam.allocate("pods-f", "a/eth0")
    await custom.patch_cluster_custom_object(G, V, P, "pods-f",
                                             {"metadata": {"annotations": {"ipam.dsipam.io/force-delete": "true"}}},
                                             _content_type="application/merge-patch+json")
    await custom.delete_cluster_custom_object(G, V, P, "pods-f")
    await wait_for(lambda: _gone(custom, "pods-f"), 15, what="IPPool deleted")
    with pytest.raises(PoolNotFound):
        await ipam.get_pool("pods-f")


async def _ready(custom: client.CustomObjectsApi, name: str) -> bool:
    c = cond(await get(custom, name), "Ready")
    return bool(c and c["status"] == "True")


async def test_pool_made_by_rpc_is_left_alone(ctl: ControllerProcess, custom: client.CustomObjectsApi,
                                              ipam: AsyncIpamClient) -> None:
    await ipam.create_pool("rpc-pool", ["198.18.3.0/24"], labels={"owner": "rpc"})
    await ipam.allocate("rpc-pool", "x/eth0")
    await custom.create_cluster_custom_object(G, V, P, ippool("rpc-pool", [{"cidr": "198.18.4.0/24"}]))

    async def not_managed() -> dict | None:
        o = await get(custom, "rpc-pool")
        c = cond(o, "Ready")
        return o if c and c["reason"] == "PoolNotManaged" else None

    obj = await wait_for(not_managed, 15, what="PoolNotManaged")
    assert cond(obj, "Ready")["status"] == "False"
    pool = await ipam.get_pool("rpc-pool")
    assert [str(r.cidr) for r in pool.ranges] == ["198.18.3.0/24"] and pool.labels == {"owner": "rpc"}
    # Deleting the IPPool does not delete a pool that the controller did not make.
    await custom.delete_cluster_custom_object(G, V, P, "rpc-pool")
    await wait_for(lambda: _gone(custom, "rpc-pool"), 15, what="IPPool deleted")
    assert (await ipam.get_pool("rpc-pool")).name == "rpc-pool"
    assert ctl.metric("dsipam_controller_pool_writes_total") == 0


BAD = [
    ("host bits", {"ranges": [{"cidr": "198.18.0.1/24"}]}, "cidr"),
    ("not a cidr", {"ranges": [{"cidr": "pods"}]}, "cidr"),
    ("no ranges", {"ranges": []}, "ranges"),
    ("gateway outside", {"ranges": [{"cidr": "198.18.0.0/24", "gateway": "198.18.9.1"}]}, "gateway"),
    ("first not an IP", {"ranges": [{"cidr": "198.18.0.0/24", "first": "x"}]}, "first"),
    ("block size", {"ranges": [{"cidr": "198.18.0.0/24", "blockSize": 48}]}, "blockSize"),
    ("exclude", {"ranges": [{"cidr": "198.18.0.0/24", "exclude": ["nope"]}]}, "exclude"),
    ("cooldown", {"ranges": [{"cidr": "198.18.0.0/24"}], "cooldown": "5 minutes"}, "cooldown"),
    ("cooldown too long", {"ranges": [{"cidr": "198.18.0.0/24"}], "cooldown": "25h"}, "cooldown"),
    ("affinity", {"ranges": [{"cidr": "198.18.0.0/24"}], "nodeAffinity": "Sometimes"}, "nodeAffinity"),
    ("network", {"ranges": [{"cidr": "198.18.0.0/24"}], "network": "Blue Net"}, "network"),
    ("unknown field", {"ranges": [{"cidr": "198.18.0.0/24", "cidrs": "x"}]}, "cidrs"),
    ("duplicate cidr", {"ranges": [{"cidr": "198.18.0.0/24"}, {"cidr": "198.18.0.0/24"}]}, "ranges"),
]


@pytest.mark.parametrize(("why", "spec", "field"), BAD, ids=[b[0] for b in BAD])
async def test_invalid_ippool_is_rejected_by_the_api_server(kube_api: ApiServer, tmp_path: Path,
                                                            custom: client.CustomObjectsApi,
                                                            why: str, spec: dict, field: str) -> None:
    await install_controller_manifests(kube_api, tmp_path)
    body = {"apiVersion": f"{G}/{V}", "kind": "IPPool", "metadata": {"name": "bad"}, "spec": copy.deepcopy(spec)}
    with pytest.raises(ApiException) as info:
        await custom.create_cluster_custom_object(G, V, P, body, field_validation="Strict")
    assert info.value.status == 422 or (why == "unknown field" and info.value.status == 400), info.value.body
    assert field in info.value.body


async def test_invalid_name_and_network_change_rejected(kube_api: ApiServer, tmp_path: Path,
                                                        custom: client.CustomObjectsApi) -> None:
    await install_controller_manifests(kube_api, tmp_path)
    with pytest.raises(ApiException) as info:
        await custom.create_cluster_custom_object(G, V, P, ippool("a.b", [{"cidr": "198.18.0.0/24"}]))
    assert info.value.status == 422 and "DNS label" in info.value.body
    await custom.create_cluster_custom_object(G, V, P, ippool("netfix", [{"cidr": "198.18.0.0/24"}], network="blue"))
    try:
        with pytest.raises(ApiException) as info:
            await custom.patch_cluster_custom_object(G, V, P, "netfix", {"spec": {"network": "red"}},
                                                     _content_type="application/merge-patch+json")
        assert info.value.status == 422 and "network" in info.value.body
    finally:
        await delete_all_ippools(kube_api)


async def test_printer_columns_show_usage_and_ready(ctl: ControllerProcess, kube_api: ApiServer,
                                                    custom: client.CustomObjectsApi) -> None:
    await custom.create_cluster_custom_object(G, V, P, ippool("cols", [{"cidr": "198.18.5.0/28"},
                                                                       {"cidr": "fd00:c::/124"}]))
    await wait_for(lambda: _ready(custom, "cols"), 20, what="Ready")
    await wait_for(lambda: _usage_is(custom, "cols", "0/14"), 10, what="usage")
    # What `kubectl get ippools` prints: the server-side Table of the CRD's printer columns.
    async with kube_api.api_client() as api:
        raw = await api.call_api(f"/apis/{G}/{V}/{P}", "GET", header_params={
            "Accept": "application/json;as=Table;g=meta.k8s.io;v=v1"}, auth_settings=["BearerToken"],
            _return_http_data_only=True, _preload_content=False)
        resp = json.loads(await raw.read())
    names = [c["name"] for c in resp["columnDefinitions"]]
    row = dict(zip(names, resp["rows"][0]["cells"], strict=False))
    assert row["Name"] == "cols" and row["IPv4"] == "0/14" and row["IPv6"] == "0/15" and row["Ready"] == "True"


def test_manifests_are_the_files_in_deploy() -> None:
    # The fixture applies these very files (no copy in the tests).
    from kube import DEPLOY

    assert (DEPLOY / "crd-ippool.yaml").is_file() and (DEPLOY / "controller.yaml").is_file()


async def test_controller_without_rbac_is_refused(kube_api: ApiServer, target: str, tmp_path: Path) -> None:
    """A token without the controller's bindings cannot run it: the RBAC in controller.yaml is what
    makes the other tests pass (a missing verb fails them)."""
    await install_controller_manifests(kube_api, tmp_path)
    token = await kube_api.async_service_account_token("dsipam-system", "no-rights")
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "norights.kubeconfig", token)
    proc = ControllerProcess(kubeconfig, target, tmp_path / "c.log", identity="norights", args=FAST)
    try:
        await asyncio.sleep(3)
        assert not proc.is_leader()
        assert "forbidden in namespace dsipam-system" in proc.log(), proc.log()
    finally:
        proc.terminate()


async def test_what_only_dsipam_can_judge_shows_as_a_condition(ctl: ControllerProcess,
                                                               custom: client.CustomObjectsApi,
                                                               ipam: AsyncIpamClient) -> None:
    """Overlap with another pool of the network passes the schema; dsipam refuses it, and the
    IPPool says so (no crash loop: the controller counts no error and retries on later passes)."""
    await custom.create_cluster_custom_object(G, V, P, ippool("ov-a", [{"cidr": "198.18.40.0/24"}]))
    await wait_for(lambda: _ready(custom, "ov-a"), 20, what="ov-a Ready")
    await custom.create_cluster_custom_object(G, V, P, ippool("ov-b", [{"cidr": "198.18.40.128/25"}]))

    async def refused() -> dict | None:
        o = await get(custom, "ov-b")
        c = cond(o, "Synced")
        return o if c and c["status"] == "False" else None

    obj = await wait_for(refused, 15, what="ov-b refused")
    assert cond(obj, "Synced")["reason"] == "PoolsOverlap", obj["status"]
    assert "ov-a" in cond(obj, "Synced")["message"]
    assert cond(obj, "Ready")["status"] == "False"
    with pytest.raises(PoolNotFound):
        await ipam.get_pool("ov-b")
    # Fixing the spec lets it through.
    obj["spec"]["ranges"] = [{"cidr": "198.18.41.0/24"}]
    await custom.replace_cluster_custom_object(G, V, P, "ov-b", obj)
    await wait_for(lambda: _ready(custom, "ov-b"), 15, what="ov-b Ready after the fix")
    assert [str(r.cidr) for r in (await ipam.get_pool("ov-b")).ranges] == ["198.18.41.0/24"]
