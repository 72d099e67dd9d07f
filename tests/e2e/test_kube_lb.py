"""LoadBalancer Services get dsipam addresses with Kubernetes' own ipFamilyPolicy semantics (issue 15),
against the real API server (dual-stack service CIDRs 10.0.0.0/24,fd00:10::/108, tests/kube.py), the real
dsipam server and PostgreSQL; the controller runs as a process under deploy/kubernetes/controller.yaml's
RBAC. Must-shows 1-4 and a 50-Service version of 5 (the 1,000-Service figure: bench/lb_services.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from kube import ApiServer, ControllerProcess, cluster_id, delete_all_ippools, wait_for
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from dsipam.client import AllocationNotFound, AsyncIpamClient, Range

CLASS = "ipam.dsipam.io/lb"
FINALIZER = "ipam.dsipam.io/load-balancer"
CONDITION = "ipam.dsipam.io/AddressesAllocated"
FAST = ["--resync-interval", "3600"]
SERVICES_LABEL = {"ipam.dsipam.io/services": "allowed"}


@pytest.fixture
async def lb_ns(core: client.CoreV1Api) -> AsyncIterator[str]:
    """A namespace whose Services are deleted after the test (finalizers stripped: the controller
    may be stopped), so no later controller meets them."""
    name = f"lb-{uuid.uuid4().hex[:8]}"
    await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    for svc in (await core.list_namespaced_service(name)).items:
        try:
            if svc.metadata.finalizers:
                await core.patch_namespaced_service(svc.metadata.name, name, {"metadata": {"finalizers": None}},
                                                    _content_type="application/merge-patch+json")
            await core.delete_namespaced_service(svc.metadata.name, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
    await core.delete_namespace(name)


def service(name: str, policy: str | None = None, families: list[str] | None = None, *, cls: str | None = CLASS,
            annotations: dict[str, str] | None = None, type_: str = "LoadBalancer", **spec: object) -> dict:
    body: dict = {"type": type_, "ports": [{"port": 80, "protocol": "TCP"}], **spec}
    if cls:
        body["loadBalancerClass"] = cls
    if policy:
        body["ipFamilyPolicy"] = policy
    if families:
        body["ipFamilies"] = families
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "annotations": annotations or {}},
            "spec": body}


async def raw(core: client.CoreV1Api, ns: str, name: str) -> dict:
    resp = await core.read_namespaced_service(name, ns, _preload_content=False)
    try:
        return json.loads(await resp.read())
    finally:
        resp.release()


def ingress_ips(svc: dict) -> list[str]:
    return [e["ip"] for e in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ()]


def condition(svc: dict) -> dict | None:
    return next((c for c in (svc.get("status") or {}).get("conditions") or () if c["type"] == CONDITION), None)


async def wait_ingress(core: client.CoreV1Api, ns: str, name: str, n: int, within: float = 20.0,
                       keep: list[str] | None = None) -> dict:
    async def check() -> dict | None:
        svc = await raw(core, ns, name)
        ips = ingress_ips(svc)
        return svc if len(ips) == n and (keep is None or ips[:len(keep)] == keep) else None

    return await wait_for(check, within, what=f"{ns}/{name} with {n} ingress address(es)")


async def wait_condition(core: client.CoreV1Api, ns: str, name: str, reason: str, within: float = 20.0) -> dict:
    async def check() -> dict | None:
        svc = await raw(core, ns, name)
        c = condition(svc)
        return svc if c and c["reason"] == reason else None

    return await wait_for(check, within, what=f"{ns}/{name} condition {reason}")


async def events(core: client.CoreV1Api, ns: str, name: str) -> list[client.CoreV1Event]:
    items = (await core.list_namespaced_event(ns)).items
    return [e for e in items if e.involved_object.name == name and e.involved_object.kind == "Service"]


def owner(svc: dict) -> str:
    m = svc["metadata"]
    return f"svc/{m['namespace']}/{m['name']}/{m['uid']}"


async def held(ipam: AsyncIpamClient, pool: str, svc: dict) -> list[str]:
    try:
        a = await ipam.get_allocation(pool, owner(svc))
    except AllocationNotFound:
        return []
    return [str(x.ip) for x in a.addresses]


def family(ip: str) -> str:
    return f"IPv{ipaddress.ip_address(ip).version}"


async def test_policies_and_family_orders(start: Callable[..., ControllerProcess], core: client.CoreV1Api,
                                          lb_ns: str, ipam: AsyncIpamClient, target: str,
                                          kube_api: ApiServer) -> None:
    """Must-show 1: each policy x family order gets the right families in ipFamilies order, dsipam
    holds exactly those; PreferDualStack against a one-family pool gets the primary; Services of
    another class, of no class, and ClusterIP ones are never touched."""
    await ipam.create_pool("lb1", ["198.18.20.0/24", "fd00:20::/120"], labels=SERVICES_LABEL, cooldown=0)
    await ipam.create_pool("lb4", ["198.18.21.0/24"], labels=SERVICES_LABEL, cooldown=0)
    ctl = start(*FAST)
    await wait_for(ctl.is_leader, 30, what="leader")
    cluster = await cluster_id(kube_api)  # the default: the kube-system Namespace's UID
    cases = {  # name: (policy, families asked, pool, families expected in ingress order)
        "single-v4": ("SingleStack", ["IPv4"], "lb1", ["IPv4"]),
        "single-v6": ("SingleStack", ["IPv6"], "lb1", ["IPv6"]),
        "prefer-46": ("PreferDualStack", ["IPv4", "IPv6"], "lb1", ["IPv4", "IPv6"]),
        "prefer-64": ("PreferDualStack", ["IPv6", "IPv4"], "lb1", ["IPv6", "IPv4"]),
        "require-46": ("RequireDualStack", ["IPv4", "IPv6"], "lb1", ["IPv4", "IPv6"]),
        "require-64": ("RequireDualStack", ["IPv6", "IPv4"], "lb1", ["IPv6", "IPv4"]),
        "prefer-46-v4pool": ("PreferDualStack", ["IPv4", "IPv6"], "lb4", ["IPv4"]),
    }
    for name, (policy, fams, pool, _) in cases.items():
        await core.create_namespaced_service(lb_ns, service(name, policy, fams,
                                                            annotations={"ipam.dsipam.io/pool": pool}))
    await core.create_namespaced_service(lb_ns, service("metallb", "RequireDualStack", ["IPv4", "IPv6"],
                                                        cls="metallb.io/metallb",
                                                        annotations={"ipam.dsipam.io/pool": "lb1"}))
    await core.create_namespaced_service(lb_ns, service("noclass", annotations={"ipam.dsipam.io/pool": "lb1"},
                                                        cls=None))
    await core.create_namespaced_service(lb_ns, service("plain", type_="ClusterIP", cls=None,
                                                        annotations={"ipam.dsipam.io/pool": "lb1"}))
    # PreferDualStack with IPv6 primary against an IPv4-only pool: never the secondary alone.
    await core.create_namespaced_service(lb_ns, service("prefer-64-v4pool", "PreferDualStack", ["IPv6", "IPv4"],
                                                        annotations={"ipam.dsipam.io/pool": "lb4"}))

    seen: set[str] = set()
    for name, (policy, fams, pool, expect) in cases.items():
        svc = await wait_ingress(core, lb_ns, name, len(expect))
        assert svc["spec"]["ipFamilies"] == fams and svc["spec"]["ipFamilyPolicy"] == policy
        ips = ingress_ips(svc)
        assert [family(ip) for ip in ips] == expect, (name, ips)
        assert all(e["ipMode"] == "VIP" for e in svc["status"]["loadBalancer"]["ingress"])
        assert sorted(await held(ipam, pool, svc)) == sorted(ips), name  # dsipam holds exactly those
        assert FINALIZER in svc["metadata"]["finalizers"]
        c = condition(svc)
        assert c["status"] == "True" and pool in c["message"], c
        a = await ipam.get_allocation(pool, owner(svc))
        assert a.attributes == {"k8s.kind": "Service", "k8s.namespace": lb_ns, "k8s.service": name,
                                "k8s.serviceUID": svc["metadata"]["uid"], "k8s.cluster": cluster}
        assert not seen & set(ips)
        seen |= set(ips)
    assert condition(await raw(core, lb_ns, "prefer-46-v4pool"))["reason"] == "SingleFamilyPool"
    bad = await wait_condition(core, lb_ns, "prefer-64-v4pool", "FamilyNotInPool")
    assert condition(bad)["status"] == "False" and ingress_ips(bad) == []
    assert "no IPv6 range" in condition(bad)["message"]
    assert any(e.reason == "FamilyNotInPool" and e.type == "Warning" for e in await events(core, lb_ns,
                                                                                          "prefer-64-v4pool"))
    # dsipam holds nothing more than the ingress shows, in both pools.
    total = [str(x.ip) for p in ("lb1", "lb4") async for a in ipam.iter_allocations(p) for x in a.addresses]
    assert sorted(total) == sorted(seen)
    for name in ("metallb", "noclass", "plain"):  # never touched
        other = await raw(core, lb_ns, name)
        assert not other["metadata"].get("finalizers") and not ingress_ips(other) and condition(other) is None
    # `dsipam alloc list` shows what holds each address.
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "dsipam.server", "--target", target, "alloc",
                                                   "list", "lb1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    require = await raw(core, lb_ns, "require-64")
    assert owner(require) in out.stdout and ingress_ips(require)[0] in out.stdout
    ctl.check()


async def test_require_dual_stack_waits_for_a_full_family(start: Callable[..., ControllerProcess],
                                                          core: client.CoreV1Api, lb_ns: str,
                                                          ipam: AsyncIpamClient) -> None:
    """Must-show 2: RequireDualStack against a pool whose IPv6 range is full holds nothing, and says so
    (Event and condition); it gets both once an IPv6 address is freed."""
    await ipam.create_pool("full6", ["198.18.22.0/24", Range("fd00:22::/120", first="fd00:22::10",
                                                              last="fd00:22::11")],
                           labels=SERVICES_LABEL, cooldown=0)
    for i in range(2):
        await ipam.allocate("full6", f"vm{i}", policy="single", families=["ipv6"])
    ctl = start(*FAST)
    await wait_for(ctl.is_leader, 30, what="leader")
    await core.create_namespaced_service(lb_ns, service("both", "RequireDualStack", ["IPv4", "IPv6"],
                                                        annotations={"ipam.dsipam.io/pool": "full6"}))
    svc = await wait_condition(core, lb_ns, "both", "PoolExhausted")
    c = condition(svc)
    assert c["status"] == "False" and "IPv6" in c["message"], c
    assert ingress_ips(svc) == [] and await held(ipam, "full6", svc) == []
    usage = {str(u.family): u.allocated for u in (await ipam.get_pool("full6")).usage}
    assert usage == {"ipv4": 0, "ipv6": 2}  # no IPv4 address held for it either
    evs = await events(core, lb_ns, "both")
    assert any(e.reason == "PoolExhausted" and e.type == "Warning" and "IPv6" in e.message for e in evs), evs
    # PreferDualStack against the same pool: the primary now, the secondary once free.
    await core.create_namespaced_service(lb_ns, service("pref", "PreferDualStack", ["IPv4", "IPv6"],
                                                        annotations={"ipam.dsipam.io/pool": "full6"}))
    pref = await wait_ingress(core, lb_ns, "pref", 1)
    assert family(ingress_ips(pref)[0]) == "IPv4" and condition(pref)["reason"] == "SecondaryFamilyPending"

    await ipam.release("full6", "vm0")
    await ipam.release("full6", "vm1")
    svc = await wait_ingress(core, lb_ns, "both", 2, within=15)
    assert [family(ip) for ip in ingress_ips(svc)] == ["IPv4", "IPv6"]
    assert sorted(await held(ipam, "full6", svc)) == sorted(ingress_ips(svc))
    assert condition(svc)["status"] == "True" and condition(svc)["reason"] == "Allocated"
    pref = await wait_ingress(core, lb_ns, "pref", 2, within=15, keep=ingress_ips(pref))
    ctl.check()


async def test_upgrade_and_downgrade_in_place(start: Callable[..., ControllerProcess], core: client.CoreV1Api,
                                              lb_ns: str, ipam: AsyncIpamClient) -> None:
    """Must-show 3: SingleStack -> RequireDualStack (the API server appends the secondary family) keeps
    the primary address and adds the secondary; back to SingleStack releases the secondary only.
    The same from an IPv6 primary, through PreferDualStack."""
    await ipam.create_pool("up", ["198.18.23.0/24", "fd00:23::/120"], labels=SERVICES_LABEL, cooldown=0)
    ctl = start(*FAST)
    await wait_for(ctl.is_leader, 30, what="leader")
    ann = {"ipam.dsipam.io/pool": "up"}
    await core.create_namespaced_service(lb_ns, service("web", "SingleStack", ["IPv4"], annotations=ann))
    await core.create_namespaced_service(lb_ns, service("web6", "SingleStack", ["IPv6"], annotations=ann))
    for name, policy, fams in (("web", "RequireDualStack", ["IPv4", "IPv6"]),
                               ("web6", "PreferDualStack", ["IPv6", "IPv4"])):
        one = await wait_ingress(core, lb_ns, name, 1)
        primary = ingress_ips(one)
        await core.patch_namespaced_service(name, lb_ns, {"spec": {"ipFamilyPolicy": policy}})
        two = await wait_ingress(core, lb_ns, name, 2, keep=primary)
        assert two["spec"]["ipFamilies"] == fams  # appended by the API server
        assert [family(ip) for ip in ingress_ips(two)] == fams
        assert sorted(await held(ipam, "up", two)) == sorted(ingress_ips(two))
        secondary = ingress_ips(two)[1]

        await core.patch_namespaced_service(name, lb_ns, {"spec": {"ipFamilyPolicy": "SingleStack"}})
        back = await wait_ingress(core, lb_ns, name, 1, keep=primary)
        assert back["spec"]["ipFamilies"] == fams[:1]  # dropped by the API server
        assert await held(ipam, "up", back) == primary
        # the secondary address is free again: nobody holds it
        assert secondary not in [str(x.ip) async for a in ipam.iter_allocations("up") for x in a.addresses]
    assert ctl.metric("dsipam_controller_service_addresses_total", op="release") == 2
    ctl.check()


async def test_requested_addresses_pool_choice_and_bad_annotations(
        start: Callable[..., ControllerProcess], core: client.CoreV1Api, lb_ns: str, ipam: AsyncIpamClient,
        kube_api: ApiServer) -> None:
    """Requested addresses (annotation, and the deprecated spec.loadBalancerIP); a taken or
    out-of-pool address, a bad annotation, a missing or non-Service pool: Events and conditions, never
    a crash. Pool choice: the Service's annotation, else its namespace's, else the default; a change
    of pool moves the Service only when it is annotated to."""
    await ipam.create_pool("req", ["198.18.24.0/24", "fd00:24::/120"], labels=SERVICES_LABEL, cooldown=0)
    await ipam.create_pool("other", ["198.18.25.0/24", "fd00:25::/120"], labels=SERVICES_LABEL, cooldown=0)
    await ipam.create_pool("dflt", ["198.18.26.0/24"], cooldown=0)  # no label: usable as the set default only
    await ipam.create_pool("pods", ["198.18.27.0/24"], cooldown=0)  # not for Services
    ctl = start(*FAST, "--lb-default-pool", "dflt")
    await wait_for(ctl.is_leader, 30, what="leader")
    req = {"ipam.dsipam.io/pool": "req"}
    await core.create_namespaced_service(lb_ns, service(
        "exact", "RequireDualStack", ["IPv6", "IPv4"],
        annotations={**req, "ipam.dsipam.io/load-balancer-ips": "198.18.24.77, fd00:24::77"}))
    await core.create_namespaced_service(lb_ns, service("legacy", "SingleStack", ["IPv4"], annotations=req,
                                                        loadBalancerIP="198.18.24.78"))
    exact = await wait_ingress(core, lb_ns, "exact", 2)
    assert ingress_ips(exact) == ["fd00:24::77", "198.18.24.77"]
    assert ingress_ips(await wait_ingress(core, lb_ns, "legacy", 1)) == ["198.18.24.78"]

    bad = {  # name: (annotations, spec extras, reason)
        "taken": ({**req, "ipam.dsipam.io/load-balancer-ips": "198.18.24.77"}, {}, "AddressInUse"),
        "outside": ({**req, "ipam.dsipam.io/load-balancer-ips": "198.18.99.1"}, {}, "AddressNotInPool"),
        "garbage": ({**req, "ipam.dsipam.io/load-balancer-ips": "198.18.24.1,\u202e,x" * 3}, {},
                    "InvalidAnnotation"),
        "wrongfam": ({**req, "ipam.dsipam.io/load-balancer-ips": "fd00:24::9"}, {}, "InvalidAddress"),
        "lbip": (req, {"loadBalancerIP": "not-an-address"}, "InvalidAddress"),
        "badpool": ({"ipam.dsipam.io/pool": "Not_A_Pool"}, {}, "InvalidAnnotation"),
        "nopool": ({"ipam.dsipam.io/pool": "absent"}, {}, "PoolNotFound"),
        "podpool": ({"ipam.dsipam.io/pool": "pods"}, {}, "PoolNotAllowed"),
    }
    for name, (ann, extra, _) in bad.items():
        await core.create_namespaced_service(lb_ns, service(name, "SingleStack", ["IPv4"], annotations=ann, **extra))
    for name, (_, _, reason) in bad.items():
        svc = await wait_condition(core, lb_ns, name, reason)
        assert condition(svc)["status"] == "False" and ingress_ips(svc) == [], name
        evs = await events(core, lb_ns, name)
        assert [e.reason for e in evs if e.type == "Warning"] == [reason], (name, evs)
        assert all(e.source.component == "dsipam-controller" for e in evs)
    taken = condition(await raw(core, lb_ns, "taken"))["message"]
    assert "198.18.24.77" in taken and lb_ns not in taken  # the holder is not revealed
    # "taken" gets its address once "exact" lets it go (a changed request releases the old one).
    await core.patch_namespaced_service("exact", lb_ns, {"metadata": {"annotations": {
        "ipam.dsipam.io/load-balancer-ips": "198.18.24.79,fd00:24::77"}}})
    exact = await wait_ingress(core, lb_ns, "exact", 2)
    await wait_for(lambda: _ips_are(core, lb_ns, "exact", ["fd00:24::77", "198.18.24.79"]), 15, what="exact moved")
    assert ingress_ips(await wait_ingress(core, lb_ns, "taken", 1, within=15)) == ["198.18.24.77"]

    # Pool choice: the namespace's annotation, else the default pool.
    await core.create_namespaced_service(lb_ns, service("plain", "SingleStack", ["IPv4"]))
    plain = await wait_ingress(core, lb_ns, "plain", 1)
    assert ipaddress.ip_address(ingress_ips(plain)[0]) in ipaddress.ip_network("198.18.26.0/24")
    await core.patch_namespace(lb_ns, {"metadata": {"annotations": {"ipam.dsipam.io/pool": "other"}}})
    svc = await wait_condition(core, lb_ns, "plain", "PoolChangeNotApplied")
    assert ingress_ips(svc) == ingress_ips(plain) and await held(ipam, "dflt", svc) == ingress_ips(plain)
    assert "namespace asks for pool other" in condition(svc)["message"]
    await core.create_namespaced_service(lb_ns, service("nsdefault", "SingleStack", ["IPv4"]))
    nsd = await wait_ingress(core, lb_ns, "nsdefault", 1)
    assert ipaddress.ip_address(ingress_ips(nsd)[0]) in ipaddress.ip_network("198.18.25.0/24")
    # Asked to move: the new pool's address first, then the old one goes.
    await core.patch_namespaced_service("plain", lb_ns, {"metadata": {"annotations": {
        "ipam.dsipam.io/allow-pool-change": "true"}}})
    moved = await wait_condition(core, lb_ns, "plain", "Allocated")
    assert ipaddress.ip_address(ingress_ips(moved)[0]) in ipaddress.ip_network("198.18.25.0/24")
    assert await held(ipam, "dflt", moved) == [] and await held(ipam, "other", moved) == ingress_ips(moved)
    ctl.check()


async def _ips_are(core: client.CoreV1Api, ns: str, name: str, ips: list[str]) -> bool:
    return ingress_ips(await raw(core, ns, name)) == ips


async def test_delete_type_change_class_change_and_controller_down(
        start: Callable[..., ControllerProcess], core: client.CoreV1Api, lb_ns: str, ipam: AsyncIpamClient) -> None:
    """Must-show 4: deleting the Service, changing its type, changing its class each release its
    addresses; a Service deleted while the controller is stopped is released (and its finalizer
    removed) when it comes back, and so is one whose finalizer was stripped by hand meanwhile."""
    await ipam.create_pool("rel", ["198.18.28.0/24", "fd00:28::/120"], labels=SERVICES_LABEL, cooldown=0)
    ctl = start(*FAST)
    await wait_for(ctl.is_leader, 30, what="leader")
    ann = {"ipam.dsipam.io/pool": "rel"}
    names = ["deleted", "typed", "classed", "while-down", "stripped", "stays"]
    for name in names:
        await core.create_namespaced_service(lb_ns, service(name, "RequireDualStack", ["IPv4", "IPv6"],
                                                            annotations=ann))
    svcs = {name: await wait_ingress(core, lb_ns, name, 2) for name in names}
    assert [len(await held(ipam, "rel", s)) for s in svcs.values()] == [2] * len(names)

    await core.delete_namespaced_service("deleted", lb_ns)
    await core.patch_namespaced_service("typed", lb_ns, {"spec": {"type": "ClusterIP"}})
    # The class cannot change while the type stays LoadBalancer: away and back with another class.
    await core.patch_namespaced_service("classed", lb_ns, {"spec": {"type": "ClusterIP"}})
    await core.patch_namespaced_service("classed", lb_ns, {"spec": {"type": "LoadBalancer",
                                                                    "loadBalancerClass": "example.com/other"}})
    for name in ("deleted", "typed", "classed"):
        await wait_for(lambda n=name: _released(ipam, "rel", svcs[n]), 15, what=f"{name} released")
    await wait_for(lambda: _gone(core, lb_ns, "deleted"), 15, what="deleted Service gone (finalizer removed)")
    for name in ("typed", "classed"):
        s = await wait_for(lambda n=name: _no_finalizer(core, lb_ns, n), 15, what=f"{name} finalizer removed")
        assert ingress_ips(s) == [] and condition(s) is None, s["status"]

    # The controller stops; one Service is deleted (its finalizer holds it), another loses its
    # finalizer by hand and is deleted for good.
    assert ctl.terminate() == 0
    await core.delete_namespaced_service("while-down", lb_ns)
    await core.patch_namespaced_service("stripped", lb_ns, {"metadata": {"finalizers": None}},
                                        _content_type="application/merge-patch+json")
    await core.delete_namespaced_service("stripped", lb_ns)
    await asyncio.sleep(0.5)
    terminating = await raw(core, lb_ns, "while-down")
    assert terminating["metadata"].get("deletionTimestamp") and await held(ipam, "rel", terminating)
    assert await _gone(core, lb_ns, "stripped") and await held(ipam, "rel", svcs["stripped"])

    ctl2 = start(*FAST, identity="lb-test-2")
    await wait_for(ctl2.is_leader, 30, what="second leader")
    await wait_for(lambda: _released(ipam, "rel", svcs["while-down"]), 20, what="while-down released")
    await wait_for(lambda: _gone(core, lb_ns, "while-down"), 15, what="while-down gone")
    await wait_for(lambda: _released(ipam, "rel", svcs["stripped"]), 20, what="stripped released")
    assert len(await held(ipam, "rel", svcs["stays"])) == 2
    remaining = [a.owner async for a in ipam.iter_allocations("rel")]
    assert remaining == [owner(svcs["stays"])]
    assert "its Service is gone" in ctl2.log()
    ctl2.check()


async def _released(ipam: AsyncIpamClient, pool: str, svc: dict) -> bool:
    return await held(ipam, pool, svc) == []


async def _gone(core: client.CoreV1Api, ns: str, name: str) -> bool:
    try:
        await core.read_namespaced_service(name, ns)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


async def _no_finalizer(core: client.CoreV1Api, ns: str, name: str) -> dict | None:
    svc = await raw(core, ns, name)
    return None if svc["metadata"].get("finalizers") else svc


async def test_fifty_services_at_once(start: Callable[..., ControllerProcess], core: client.CoreV1Api,
                                      lb_ns: str, ipam: AsyncIpamClient, kube_api: ApiServer) -> None:
    """Must-show 5, small: 50 LoadBalancer Services created at once all get addresses, none twice
    (bench/lb_services.py does 1,000 and times it). The default pool here is an IPPool marked
    spec.services: Default."""
    custom = client.CustomObjectsApi(core.api_client)
    await custom.create_cluster_custom_object("ipam.dsipam.io", "v1alpha1", "ippools", {
        "apiVersion": "ipam.dsipam.io/v1alpha1", "kind": "IPPool", "metadata": {"name": "lb-default"},
        "spec": {"ranges": [{"cidr": "198.18.30.0/24"}, {"cidr": "fd00:30::/120"}], "cooldown": "0s",
                 "services": "Default"}})
    n = 50
    try:
        ctl = start(*FAST)
        await wait_for(ctl.is_leader, 30, what="leader")
        await asyncio.gather(*(core.create_namespaced_service(lb_ns, service(
            f"s{i:02d}", "RequireDualStack", ["IPv4", "IPv6"] if i % 2 else ["IPv6", "IPv4"])) for i in range(n)))

        async def all_ready() -> list[dict] | None:
            resp = await core.list_namespaced_service(lb_ns, _preload_content=False)
            try:
                items = json.loads(await resp.read())["items"]
            finally:
                resp.release()
            return items if sum(len(ingress_ips(s)) == 2 for s in items) == n else None

        items = await wait_for(all_ready, 60, interval=0.5, what=f"{n} Services with 2 addresses")
        ips = [ip for s in items for ip in ingress_ips(s)]
        assert len(ips) == len(set(ips)) == 2 * n
        for s in items:
            assert [family(ip) for ip in ingress_ips(s)] == s["spec"]["ipFamilies"], s["metadata"]["name"]
        pool = await ipam.get_pool("lb-default")
        assert pool.labels["ipam.dsipam.io/services"] == "default"
        assert {str(u.family): u.allocated for u in pool.usage} == {"ipv4": n, "ipv6": n}
        ctl.check()
        assert ctl.terminate() == 0  # before its IPPool goes (the test strips that one's finalizer)
    finally:
        await delete_all_ippools(kube_api)
