"""The SDK's pool lifecycle and node-affinity methods, sync and async, against a real server:
pool settings (cooldown, node affinity) on create and update, reservations, ranges on a live
pool, MigratePool's progress stream, filtered allocation lists, blocks and ReleaseNode, and
the error classes of the reasons these RPCs report (checked against the server's own table)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

import dsipam.client as sdk
from dsipam.client import AsyncIpamClient, Family, IpamClient, NodeAffinity, Range

WAIT = 30.0  # deadline of the tests' calls: generous, for a loaded machine


class Threaded:
    """The sync client behind the async client's interface: each call runs in a worker thread,
    so one scenario exercises both clients."""

    def __init__(self, client: IpamClient) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(self.client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = await asyncio.to_thread(fn, *args, **kwargs)
            if hasattr(result, "__next__"):  # an iter_* generator: its items, fetched in the thread
                return await asyncio.to_thread(list, result)
            return result

        return call


@pytest.fixture(params=["sync", "async"])
async def client(request: pytest.FixtureRequest, target: str) -> AsyncIterator[Any]:
    if request.param == "sync":
        with IpamClient(target, timeout=WAIT) as sync:
            yield Threaded(sync)
    else:
        async with AsyncIpamClient(target, timeout=WAIT) as aio:
            yield aio


async def collect(client: Any, name: str, *args: Any, **kwargs: Any) -> list[Any]:
    """Every item of an iterator method (``iter_*``), for both clients."""
    if isinstance(client, Threaded):
        return list(await client.__getattr__(name)(*args, **kwargs))
    return [x async for x in getattr(client, name)(*args, **kwargs)]


async def raises(cls: type[sdk.IpamError], call: Any) -> sdk.IpamError:
    """Awaits ``call`` and returns the error it raised, which must be exactly ``cls``."""
    with pytest.raises(sdk.IpamError) as caught:
        await call
    assert type(caught.value) is cls, repr(caught.value)
    return caught.value


# -- pool settings ------------------------------------------------------------------------------


async def test_cooldown_and_node_affinity_on_create_and_update(client: Any) -> None:
    plain = await client.create_pool("plain", "198.18.0.0/24")
    assert (plain.cooldown, plain.node_affinity, plain.reservations) == (sdk.DEFAULT_COOLDOWN, NodeAffinity.BORROW, ())

    pool = await client.create_pool("set", ["198.18.1.0/24"], labels={"team": "net"},
                                    cooldown=dt.timedelta(minutes=1, seconds=30), node_affinity="strict")
    assert pool.cooldown == dt.timedelta(seconds=90) and pool.node_affinity is NodeAffinity.STRICT
    assert await client.get_pool("set") == pool

    # only what is given changes
    changed = await client.update_pool("set", cooldown=2.5)
    assert changed.cooldown == dt.timedelta(seconds=2.5)
    assert (dict(changed.labels), changed.node_affinity) == ({"team": "net"}, NodeAffinity.STRICT)
    changed = await client.update_pool("set", labels={}, node_affinity=NodeAffinity.BORROW)
    assert (dict(changed.labels), changed.node_affinity, changed.cooldown) == ({}, NodeAffinity.BORROW,
                                                                               dt.timedelta(seconds=2.5))
    changed = await client.update_pool("set", labels={"a": "1", "b": "2"}, cooldown=0)
    assert (dict(changed.labels), changed.cooldown) == ({"a": "1", "b": "2"}, dt.timedelta(0))
    assert await client.get_pool("set") == changed

    # refused before any call: nothing to change, a negative cooldown, an unknown affinity
    for call, word in ((client.update_pool("set"), "update_mask"),
                       (client.update_pool("set", cooldown=-1), "cooldown"),
                       (client.create_pool("x", "198.18.2.0/24", node_affinity="sometimes"), "node_affinity")):
        err = await raises(sdk.InvalidArgument, call)
        assert err.attempts == 0 and err.field == word
    # refused by the server: at most a day
    err = await raises(sdk.InvalidArgument, client.update_pool("set", cooldown=dt.timedelta(days=2)))
    assert err.attempts == 1 and "cooldown" in (err.field or "")
    await raises(sdk.PoolNotFound, client.update_pool("missing", cooldown=1))


async def test_cooldown_counts_in_usage_and_names_the_address(client: Any) -> None:
    await client.create_pool("cool", "198.18.0.0/29", cooldown=600)  # six usable addresses
    held = (await client.allocate("cool", "a")).allocation.ipv4
    await client.allocate("cool", "b")
    released = await client.release("cool", "a")
    assert released == (held,)
    usage = (await client.get_pool("cool")).usage_of("ipv4")
    assert (usage.size, usage.allocated, usage.cooldown, usage.reserved, usage.free) == (6, 1, 1, 0, 4)
    err = await raises(sdk.AddressInCooldown, client.allocate("cool", "c", addresses=[held.ip]))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "ADDRESS_IN_COOLDOWN"
    assert str(held.ip) in err.message and err.field == "addresses[0]"
    back = await client.allocate("cool", "a", addresses=[held.ip])  # its last holder may take it back
    assert back.allocation.ipv4 == held


# -- reservations ---------------------------------------------------------------------------------


async def test_reserved_addresses_are_never_handed_out(client: Any) -> None:
    await client.create_pool("res", "198.18.0.0/29", cooldown=0)  # .1 - .6
    pool = await client.reserve_addresses("res", [ipaddress.ip_address("198.18.0.1"), "198.18.0.4/31",
                                                  ipaddress.ip_network("198.18.0.6/32")])
    assert set(pool.reservations) == {ipaddress.ip_network("198.18.0.1/32"), ipaddress.ip_network("198.18.0.4/31"),
                                      ipaddress.ip_network("198.18.0.6/32")}
    usage = pool.usage_of("ipv4")
    assert (usage.reserved, usage.free) == (4, 2)
    got = {(await client.allocate("res", f"o{i}")).allocation.ipv4.ip for i in range(2)}
    assert got == {ipaddress.ip_address("198.18.0.2"), ipaddress.ip_address("198.18.0.3")}
    await raises(sdk.PoolExhausted, client.allocate("res", "one-too-many"))

    # an allocated address: refused, unless forced (the owner keeps it; it is not reissued)
    err = await raises(sdk.AddressAllocated, client.reserve_addresses("res", "198.18.0.2"))
    assert err.reason == "ADDRESS_ALLOCATED" and "198.18.0.2" in err.message
    forced = await client.reserve_addresses("res", "198.18.0.2", force=True)
    assert ipaddress.ip_network("198.18.0.2/32") in forced.reservations
    holder = next(a for a in await collect(client, "iter_allocations", "res")
                  if a.ipv4.ip == ipaddress.ip_address("198.18.0.2"))
    await client.release("res", holder.owner)
    await raises(sdk.PoolExhausted, client.allocate("res", "after-release"))

    pool = await client.unreserve_addresses("res", ["198.18.0.4/31", "198.18.0.2"])
    assert set(pool.reservations) == {ipaddress.ip_network("198.18.0.1/32"), ipaddress.ip_network("198.18.0.6/32")}
    again = {(await client.allocate("res", f"n{i}")).allocation.ipv4.ip for i in range(3)}
    assert again == {ipaddress.ip_address(f"198.18.0.{i}") for i in (2, 4, 5)}

    err = await raises(sdk.InvalidArgument, client.unreserve_addresses("res", "198.18.0.3"))
    assert err.field == "addresses[0]"  # not reserved
    err = await raises(sdk.InvalidArgument, client.reserve_addresses("res", "198.18.9.9"))
    assert "inside" in err.message  # outside the pool's ranges
    err = await raises(sdk.InvalidArgument, client.reserve_addresses("res", ["198.18.0.3", "nonsense"]))
    assert err.attempts == 0 and err.field == "addresses[1]"
    err = await raises(sdk.InvalidArgument, client.reserve_addresses("res", []))
    assert err.attempts == 0


# -- ranges on a live pool ------------------------------------------------------------------------


async def test_ranges_come_and_go_on_a_live_pool(client: Any) -> None:
    await client.create_pool("live", "198.18.0.0/24")
    owner = (await client.allocate("live", "v4")).allocation
    pool = await client.add_pool_range("live", Range(ipaddress.ip_network("fd00::/120"), first="fd00::10",
                                                     block_size=16))
    assert pool.families == (Family.IPV4, Family.IPV6)
    assert (pool.ranges[1].first, pool.ranges[1].block_size) == (ipaddress.ip_address("fd00::10"), 16)
    pool = await client.add_pool_range("live", "198.18.1.0/24")
    assert [str(r.cidr) for r in pool.ranges] == ["198.18.0.0/24", "fd00::/120", "198.18.1.0/24"]
    pair = (await client.allocate("live", "pair", policy="require")).allocation
    assert pair.ipv6 is not None and pair.ipv6.ip >= ipaddress.ip_address("fd00::10")

    err = await raises(sdk.InvalidArgument, client.add_pool_range("live", "198.18.0.128/25"))
    assert "overlaps" in err.message
    err = await raises(sdk.InvalidArgument, client.add_pool_range("live", "198.18.3.1/24"))
    assert err.attempts == 0 and err.field == "range.cidr"
    err = await raises(sdk.AddressAllocated, client.remove_pool_range("live", "fd00::/120"))
    assert "fd00::/120" in err.message
    await raises(sdk.RangeNotFound, client.remove_pool_range("live", ipaddress.ip_network("fd00:1::/120")))

    await client.release("live", "pair", families="ipv6")
    pool = await client.remove_pool_range("live", "fd00::/120")
    assert pool.families == (Family.IPV4,)
    pool = await client.remove_pool_range("live", "198.18.1.0/24")
    assert [str(r.cidr) for r in pool.ranges] == ["198.18.0.0/24"]
    err = await raises(sdk.FailedPrecondition, client.remove_pool_range("live", "198.18.0.0/24"))
    assert "last range" in err.message
    assert (await client.get_allocation("live", "v4")).ipv4 == owner.ipv4


# -- migration -----------------------------------------------------------------------------------------


def test_migrate_pool_sync_streams_progress_and_keeps_ipv4(target: str) -> None:
    with IpamClient(target, timeout=WAIT) as ipam:
        ipam.create_pool("mig", "198.18.0.0/24")
        before = {f"o{i}": ipam.allocate("mig", f"o{i}").allocation.ipv4 for i in range(7)}
        ipam.add_pool_range("mig", "fd00::/120")
        reports = list(ipam.migrate_pool("mig", batch_size=3))
        assert all(isinstance(r, sdk.MigrationProgress) for r in reports)
        assert [r.processed for r in reports][:3] == [3, 6, 7]  # one report per batch, then the total
        last = reports[-1]
        assert (last.total, last.processed, last.upgraded, last.failed, last.errors) == (7, 7, 7, 0, ())
        assert last.fraction == 1.0
        after = list(ipam.iter_allocations("mig"))
        assert {a.owner: a.ipv4 for a in after} == before  # IPv4 addresses kept
        assert len({a.ipv6.ip for a in after if a.ipv6}) == 7
        again = list(ipam.migrate_pool("mig", policy="require"))[-1]
        assert (again.processed, again.upgraded, again.failed) == (7, 0, 0)  # safe to re-run

        # a family that runs out: prefer upgrades whom it can; require reports who could not, and why
        ipam.create_pool("short", ["198.18.1.0/24", Range("fd00:1::/120", first="fd00:1::1", last="fd00:1::2")])
        for i in range(5):
            ipam.allocate("short", f"s{i}", families="ipv4")
        last = list(ipam.migrate_pool("short", policy="prefer", batch_size=2))[-1]
        assert (last.processed, last.upgraded, last.failed) == (5, 2, 0)
        last = list(ipam.migrate_pool("short", policy="require"))[-1]
        assert (last.processed, last.upgraded, last.failed) == (5, 0, 3)
        assert [e.split(": ", 1)[0] for e in last.errors] == ["s2", "s3", "s4"]
        assert all("IPv6" in e for e in last.errors)

        # starting errors come from the call itself
        with pytest.raises(sdk.PoolNotFound):
            ipam.migrate_pool("missing")
        with pytest.raises(sdk.InvalidArgument) as caught:
            ipam.migrate_pool("mig", policy="single")
        assert caught.value.attempts == 0 and caught.value.field == "policy"
        with pytest.raises(sdk.InvalidArgument):
            ipam.migrate_pool("mig", batch_size=5000)


async def test_migrate_pool_async_iterates_and_can_be_awaited(target: str) -> None:
    async with AsyncIpamClient(target, timeout=WAIT) as ipam:
        await ipam.create_pool("amig", "198.18.0.0/24")
        await asyncio.gather(*(ipam.allocate("amig", f"o{i}") for i in range(5)))
        await ipam.add_pool_range("amig", "fd00::/120")
        reports = [r async for r in ipam.migrate_pool("amig", policy="require", batch_size=2)]
        assert [r.processed for r in reports][:3] == [2, 4, 5]
        assert (reports[-1].upgraded, reports[-1].failed) == (5, 0)
        assert all(a.ipv6 is not None for a in [a async for a in ipam.iter_allocations("amig")])
        stream = ipam.migrate_pool("missing")  # nothing is sent until it is awaited or iterated
        with pytest.raises(sdk.PoolNotFound):
            await stream
        async with await ipam.migrate_pool("amig") as started:  # started: the first report is in
            first = await anext(started)
            assert first.total == 5 and first.upgraded == 0


# -- filtered lists --------------------------------------------------------------------------------


async def test_list_allocations_by_attributes_and_family(client: Any) -> None:
    await client.create_pool("sel", ["198.18.0.0/24", "fd00::/120"])
    await client.allocate("sel", "web-1", policy="require", attributes={"app": "web", "tier": "front"})
    await client.allocate("sel", "web-2", families="ipv6", attributes={"app": "web"})
    await client.allocate("sel", "db-1", families="ipv4", attributes={"app": "db", "tier": "back"})
    web = await client.list_allocations("sel", selector={"app": "web"})
    assert [a.owner for a in web] == ["web-1", "web-2"]
    assert [a.owner for a in await client.list_allocations("sel", selector={"app": "web", "tier": "front"})] == [
        "web-1"]
    assert [a.owner for a in await client.list_allocations("sel", family="ipv4")] == ["db-1", "web-1"]
    assert [a.owner for a in await client.list_allocations("sel", family=Family.IPV6,
                                                            selector={"app": "web"})] == ["web-1", "web-2"]
    assert list(await client.list_allocations("sel", selector={"app": "none"})) == []
    paged = await collect(client, "iter_allocations", "sel", family=6, page_size=1)
    assert [a.owner for a in paged] == ["web-1", "web-2"]
    err = await raises(sdk.InvalidArgument, client.list_allocations("sel", family="ipv5"))
    assert err.attempts == 0


# -- node affinity ------------------------------------------------------------------------------------


async def test_nodes_get_their_own_blocks_and_release_them(client: Any) -> None:
    await client.create_pool("aff", ["198.18.0.0/24", "fd00::/120"], cooldown=0, node_affinity="strict")
    held: dict[str, list[sdk.Allocation]] = {"node-a": [], "node-b": []}
    for i in range(3):
        for node in held:
            result = await client.allocate("aff", f"{node}/p{i}", policy="require", node=node)
            held[node].append(result.allocation)
    assert all(a.node == node and not a.borrowed for node, allocs in held.items() for a in allocs)
    assert (await client.get_allocation("aff", "node-a/p0")).node == "node-a"

    blocks = await collect(client, "iter_blocks", "aff", page_size=1)
    assert all(isinstance(b, sdk.Block) for b in blocks)
    # Node blocks, one per node and family; blocks of no node (spares made ahead of need) may be listed too.
    assert sorted((b.node, b.family.value) for b in blocks if b.node) == [
        ("node-a", "ipv4"), ("node-a", "ipv6"), ("node-b", "ipv4"), ("node-b", "ipv6")]
    for node, allocs in held.items():
        mine = list(await client.list_blocks("aff", node=node))
        assert {b.node for b in mine} == {node} and sum(b.used for b in mine) == 6
        for a in allocs:  # every address lies in one of its node's blocks
            for address in a.addresses:
                assert any(address.ip in b.cidr for b in mine if b.family is address.family)
    page = await client.list_blocks("aff", page_size=3)
    assert len(page) == 3 and page.next_page_token

    # node-b leaves: its owners are released, then its blocks
    for a in held["node-b"]:
        await client.release("aff", a.owner)
    freed = await client.release_node("aff", "node-b")
    assert isinstance(freed, sdk.ReleaseNodeResult) and freed.kept == ()
    assert sorted(b.family.value for b in freed.released) == ["ipv4", "ipv6"]
    assert all(b.node is None and b.used == 0 for b in freed.released)
    kept = await client.release_node("aff", "node-a")  # still in use: kept
    assert kept.released == () and {b.node for b in kept.kept} == {"node-a"}
    assert list(await client.list_blocks("aff", node="node-b")) == []
    err = await raises(sdk.InvalidArgument, client.release_node("aff", ""))
    assert err.field == "node"


async def test_borrowing_and_strict_affinity(client: Any) -> None:
    await client.create_pool("one-block", [Range("198.18.0.0/26", block_size=64)], cooldown=0)
    first = (await client.allocate("one-block", "a", node="node-a")).allocation
    assert (first.node, first.borrowed) == ("node-a", False)
    borrowed = (await client.allocate("one-block", "b", node="node-b")).allocation  # no block left for node-b
    assert (borrowed.node, borrowed.borrowed) == ("node-b", True)
    pool = await client.update_pool("one-block", node_affinity="strict")
    assert pool.node_affinity is NodeAffinity.STRICT
    err = await raises(sdk.PoolExhausted, client.allocate("one-block", "c", node="node-c"))
    assert "node-c" in err.message
    assert (await client.allocate("one-block", "d", node="node-a")).allocation.borrowed is False


# -- errors ---------------------------------------------------------------------------------------------


def test_every_reason_the_server_reports_has_its_class() -> None:
    """The SDK's table against the server's own: every domain error becomes the SDK class of its
    reason (or, for a generic reason, the class of its status code)."""
    from dsipam.server import domain
    from dsipam.server.rpc.errors import status_for

    def subclasses(cls: type) -> list[type]:
        return [cls] + [s for sub in cls.__subclasses__() for s in subclasses(sub)]

    generic = {"NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION"}
    for server_cls in subclasses(domain.IpamError):
        reason = server_cls.reason
        code = status_for(server_cls("x"))
        cls = sdk.error_class(code, reason)
        assert cls.code == code, (server_cls, cls)
        if reason in generic:
            assert cls is sdk.error_class(code, None), server_cls
        else:
            assert cls.reason == reason, (server_cls, cls)
    for reason, cls in (("RANGE_NOT_FOUND", sdk.RangeNotFound), ("ADDRESS_IN_COOLDOWN", sdk.AddressInCooldown),
                        ("ADDRESS_ALLOCATED", sdk.AddressAllocated),
                        ("RESUME_TOKEN_EXPIRED", sdk.ResumeTokenExpired)):
        server_cls = next(c for c in subclasses(domain.IpamError) if c.reason == reason)
        assert sdk.error_class(status_for(server_cls("x")), reason) is cls


def test_new_methods_are_documented_on_both_clients() -> None:
    for cls in (IpamClient, AsyncIpamClient):
        for name in ("update_pool", "reserve_addresses", "unreserve_addresses", "add_pool_range",
                     "remove_pool_range", "migrate_pool", "watch_allocations", "follow_allocations", "list_blocks",
                     "iter_blocks", "release_node"):
            assert getattr(cls, name).__doc__, f"{cls.__name__}.{name}"
