"""LoadBalancer Services under hostile or careless input (issue 15, an attacker's review): what a
Service holds and what its status says stay true to each other whatever its editor asks for.

Same parts as test_kube_lb.py (its helpers and the namespace fixture are reused): the real API
server, the real dsipam server and PostgreSQL, the controller as a process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from kube import ApiServer, ControllerProcess, delete_all_ippools, wait_for
from kubernetes_asyncio import client
from test_kube_lb import (  # noqa: F401 - lb_ns is a fixture
    FAST,
    SERVICES_LABEL,
    condition,
    events,
    held,
    ingress_ips,
    lb_ns,
    raw,
    service,
    wait_condition,
    wait_ingress,
)

from dsipam.client import AsyncIpamClient

IPS = "ipam.dsipam.io/load-balancer-ips"


async def test_a_refused_address_change_keeps_the_address(start: Callable[..., ControllerProcess],
                                                           core: client.CoreV1Api, lb_ns: str,  # noqa: F811
                                                           ipam: AsyncIpamClient) -> None:
    """A Service asked to move to another address that it cannot get (taken, outside the pool) keeps
    the address it has, and its ingress shows only what dsipam holds for it: the old address is
    neither lost nor shown by two Services. Once the asked-for address is freed it moves."""
    await ipam.create_pool("swap", ["198.18.40.0/24", "fd00:40::/120"], labels=SERVICES_LABEL, cooldown=0)
    ctl = start(*FAST)
    await wait_for(ctl.is_leader, 30, what="leader")
    pool = {"ipam.dsipam.io/pool": "swap"}
    await core.create_namespaced_service(lb_ns, service("a", "SingleStack", ["IPv4"], annotations=pool))
    await core.create_namespaced_service(lb_ns, service("b", "SingleStack", ["IPv4"],
                                                        annotations={**pool, IPS: "198.18.40.50"}))
    await core.create_namespaced_service(lb_ns, service("d", "RequireDualStack", ["IPv6", "IPv4"],
                                                        annotations=pool))
    a = await wait_ingress(core, lb_ns, "a", 1)
    x = ingress_ips(a)
    assert ingress_ips(await wait_ingress(core, lb_ns, "b", 1)) == ["198.18.40.50"]
    d = await wait_ingress(core, lb_ns, "d", 2)
    dx = ingress_ips(d)

    async def truthful(name: str, expect: list[str]) -> None:
        svc = await raw(core, lb_ns, name)
        assert ingress_ips(svc) == expect, (name, svc["status"])
        assert sorted(await held(ipam, "swap", svc)) == sorted(expect), name

    # Held by another dsipam owner (not a Service): a gives x back to try, fails, takes x back (no
    # one else waits for x), and keeps showing only x.
    await ipam.allocate("swap", "vm-1", policy="single", families=["ipv4"], addresses=["198.18.40.60"])
    await core.patch_namespaced_service("a", lb_ns, {"metadata": {"annotations": {IPS: "198.18.40.60"}}})
    svc = await wait_condition(core, lb_ns, "a", "AddressInUse")
    await truthful("a", x)
    assert "198.18.40.60" in condition(svc)["message"] and f"keeps {x[0]}" in condition(svc)["message"], svc
    # Outside the pool: refused before anything is given back.
    await core.patch_namespaced_service("a", lb_ns, {"metadata": {"annotations": {IPS: "198.18.99.9"}}})
    await wait_condition(core, lb_ns, "a", "AddressNotInPool")
    await truthful("a", x)
    # The secondary of a dual-stack Service asked to change to vm-1's address: both kept.
    await core.patch_namespaced_service("d", lb_ns, {"metadata": {"annotations": {
        IPS: f"{dx[0]},198.18.40.60"}}})
    await wait_condition(core, lb_ns, "d", "AddressInUse")
    await truthful("d", dx)
    # c waits for x; a asks for b's address meanwhile: x is not given back (c would take it).
    await core.create_namespaced_service(lb_ns, service("c", "SingleStack", ["IPv4"],
                                                        annotations={**pool, IPS: x[0]}))
    await wait_condition(core, lb_ns, "c", "AddressInUse")
    await core.patch_namespaced_service("a", lb_ns, {"metadata": {"annotations": {IPS: "198.18.40.50"}}})
    await wait_for(lambda: _reason_and_message(core, lb_ns, "a", "AddressInUse", "198.18.40.50"), 10,
                   what="a refused b's address")
    await asyncio.sleep(1.5)  # a retry or two
    await truthful("a", x)
    await truthful("c", [])

    # b goes: a gets its address (its release wakes a at once), then x is free and c gets it.
    await core.delete_namespaced_service("b", lb_ns)
    await wait_for(lambda: _ips_are(core, lb_ns, "a", ["198.18.40.50"]), 10, what="a moved to b's address")
    await truthful("a", ["198.18.40.50"])
    await wait_for(lambda: _ips_are(core, lb_ns, "c", x), 10, what="c got a's old address")
    await truthful("c", x)
    # While it waited, d gave its secondary back to try once, not at every pass; vm-1's release
    # wakes it at once.
    assert ctl.log().count(f"Service {lb_ns}/d keeps") <= 2, ctl.log()
    await ipam.release("swap", "vm-1")
    await wait_for(lambda: _ips_are(core, lb_ns, "d", [dx[0], "198.18.40.60"]), 5, what="d moved to vm-1's")
    await truthful("d", [dx[0], "198.18.40.60"])
    ctl.check()


async def _reason_and_message(core: client.CoreV1Api, ns: str, name: str, reason: str, text: str) -> bool:
    c = condition(await raw(core, ns, name))
    return c is not None and c["reason"] == reason and text in c["message"]


async def _ips_are(core: client.CoreV1Api, ns: str, name: str, ips: list[str]) -> bool:
    return ingress_ips(await raw(core, ns, name)) == ips


async def test_family_transitions_finalizer_strip_and_long_names(
        start: Callable[..., ControllerProcess], core: client.CoreV1Api, lb_ns: str,  # noqa: F811
        ipam: AsyncIpamClient, kube_api: ApiServer) -> None:
    """Single -> Prefer -> Require -> Single against a pool without the secondary family keeps the
    primary throughout (Require: a condition, the ingress unchanged); PreferDualStack against an
    IPPool that gains the secondary range gets it without waiting for the resync; a finalizer
    stripped from a live Service comes back; the longest namespace and name work (owner key,
    attributes, Events)."""
    custom = client.CustomObjectsApi(core.api_client)
    await custom.create_cluster_custom_object("ipam.dsipam.io", "v1alpha1", "ippools", {
        "apiVersion": "ipam.dsipam.io/v1alpha1", "kind": "IPPool", "metadata": {"name": "grow"},
        "spec": {"ranges": [{"cidr": "198.18.41.0/24"}], "cooldown": "0s", "services": "Allowed"}})
    long_ns = "l" * 52 + uuid.uuid4().hex[:11]  # 63 characters
    await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=long_ns, annotations={"ipam.dsipam.io/pool": "grow"})))
    try:
        ctl = start(*FAST)
        await wait_for(ctl.is_leader, 30, what="leader")
        await wait_for(lambda: _pool_exists(ipam, "grow"), 15, what="dsipam pool grow")
        ann = {"ipam.dsipam.io/pool": "grow"}
        await core.create_namespaced_service(lb_ns, service("t", "SingleStack", ["IPv4"], annotations=ann))
        await core.create_namespaced_service(lb_ns, service("p", "PreferDualStack", ["IPv4", "IPv6"],
                                                            annotations=ann))
        long_name = "n" * 63
        await core.create_namespaced_service(long_ns, service(long_name, "SingleStack", ["IPv4"]))
        primary = ingress_ips(await wait_ingress(core, lb_ns, "t", 1))
        assert condition(await wait_ingress(core, lb_ns, "p", 1))["reason"] == "SingleFamilyPool"

        # t: Single -> Prefer (one family: primary kept) -> Require (no IPv6 range: condition, primary
        # kept and shown) -> Single (Allocated again, the same address).
        await core.patch_namespaced_service("t", lb_ns, {"spec": {"ipFamilyPolicy": "PreferDualStack"}})
        await wait_condition(core, lb_ns, "t", "SingleFamilyPool")
        await core.patch_namespaced_service("t", lb_ns, {"spec": {"ipFamilyPolicy": "RequireDualStack"}})
        svc = await wait_condition(core, lb_ns, "t", "FamilyNotInPool")
        assert ingress_ips(svc) == primary and await held(ipam, "grow", svc) == primary
        await core.patch_namespaced_service("t", lb_ns, {"spec": {"ipFamilyPolicy": "SingleStack"}})
        svc = await wait_condition(core, lb_ns, "t", "Allocated")
        assert ingress_ips(svc) == primary and await held(ipam, "grow", svc) == primary

        # A finalizer stripped from the live Service comes back.
        await core.patch_namespaced_service("t", lb_ns, {"metadata": {"finalizers": None}},
                                            _content_type="application/merge-patch+json")
        await wait_for(lambda: _has_finalizer(core, lb_ns, "t"), 10, what="finalizer back")

        # The IPPool gains an IPv6 range: p (PreferDualStack) gets its secondary soon; so does t
        # once it asks for RequireDualStack again.
        await custom.patch_cluster_custom_object("ipam.dsipam.io", "v1alpha1", "ippools", "grow", {
            "spec": {"ranges": [{"cidr": "198.18.41.0/24"}, {"cidr": "fd00:41::/120"}]}},
            _content_type="application/merge-patch+json")
        p = await wait_ingress(core, lb_ns, "p", 2, within=15)
        assert [ip.count(":") > 0 for ip in ingress_ips(p)] == [False, True]
        assert sorted(await held(ipam, "grow", p)) == sorted(ingress_ips(p))

        # The longest namespace and name: held, with its owner key and attributes, and Events.
        svc = await wait_ingress(core, long_ns, long_name, 1)
        a = await ipam.get_allocation("grow", f"svc/{long_ns}/{long_name}/{svc['metadata']['uid']}")
        assert a.attributes["k8s.namespace"] == long_ns and a.attributes["k8s.service"] == long_name
        assert [str(x.ip) for x in a.addresses] == ingress_ips(svc)
        assert any(e.reason == "AddressesAllocated" for e in await events(core, long_ns, long_name))
        await core.patch_namespaced_service(long_name, long_ns, {"metadata": {"finalizers": None}},
                                            _content_type="application/merge-patch+json")
        await core.delete_namespaced_service(long_name, long_ns)
        ctl.check()
        assert ctl.terminate() == 0
    finally:
        await core.delete_namespace(long_ns)
        await delete_all_ippools(kube_api)


async def _pool_exists(ipam: AsyncIpamClient, name: str) -> bool:
    return name in [p.name async for p in ipam.iter_pools()]


async def _has_finalizer(core: client.CoreV1Api, ns: str, name: str) -> bool:
    return "ipam.dsipam.io/load-balancer" in ((await raw(core, ns, name))["metadata"].get("finalizers") or ())


async def test_ingress_follows_dsipam_after_a_crash_mid_change(
        start: Callable[..., ControllerProcess], core: client.CoreV1Api, lb_ns: str,  # noqa: F811
        ipam: AsyncIpamClient) -> None:
    """The controller died between giving an address back and taking the new one (here: the
    address released by hand while it is stopped, and the new one taken): the next controller's
    pass fails on the requested address and the ingress stops listing the address the Service no
    longer holds, so it is never shown by two Services."""
    await ipam.create_pool("crash", ["198.18.42.0/24"], labels=SERVICES_LABEL, cooldown=0)
    ctl = start(*FAST)
    await wait_for(ctl.is_leader, 30, what="leader")
    await core.create_namespaced_service(lb_ns, service("a", "SingleStack", ["IPv4"],
                                                        annotations={"ipam.dsipam.io/pool": "crash"}))
    a = await wait_ingress(core, lb_ns, "a", 1)
    assert ctl.terminate() == 0
    await ipam.release("crash", f"svc/{lb_ns}/a/{a['metadata']['uid']}")
    await ipam.allocate("crash", "vm-1", policy="single", families=["ipv4"], addresses=["198.18.42.60"])
    await core.patch_namespaced_service("a", lb_ns, {"metadata": {"annotations": {IPS: "198.18.42.60"}}})
    ctl2 = start(*FAST, identity="lb-attack-2")
    await wait_for(ctl2.is_leader, 30, what="second leader")
    svc = await wait_condition(core, lb_ns, "a", "AddressInUse")
    await wait_for(lambda: _ips_are(core, lb_ns, "a", []), 5, what="a's ingress emptied")
    assert await held(ipam, "crash", svc) == []
    ctl2.check()
