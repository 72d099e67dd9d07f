"""LoadBalancer Services under hostile or careless input (issue 15, an attacker's review): what a
Service holds and what its status says stay true to each other whatever its editor asks for.

Same parts as test_kube_lb.py (its helpers and the namespace fixture are reused): the real API
server, the real dsipam server and PostgreSQL, the controller as a process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from kube import ControllerProcess, wait_for
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
