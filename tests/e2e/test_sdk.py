"""The Python SDK (dsipam.client), sync and async, against a real server on loopback: typed
arguments and results, paging, every error reason the service reports, local validation,
deadlines, context managers, unix sockets, round-robin over two servers and its imports."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from support import ROOT, ServerProcess, spawn_server

import dsipam.client as sdk
from dsipam.client import (
    Address,
    AsyncIpamClient,
    Family,
    IpamClient,
    Policy,
    Range,
)

WAIT = 30.0  # deadline of the tests' calls: generous, for a loaded machine


class Threaded:
    """The sync client behind the async client's interface: each call runs in a worker thread,
    so one scenario exercises both clients."""

    def __init__(self, client: IpamClient) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(self.client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(fn, *args, **kwargs)

        return call


@pytest.fixture(params=["sync", "async"])
async def client(request: pytest.FixtureRequest, target: str) -> AsyncIterator[Any]:
    if request.param == "sync":
        with IpamClient(target, timeout=WAIT) as sync:
            yield Threaded(sync)
    else:
        async with AsyncIpamClient(target, timeout=WAIT) as aio:
            yield aio


DUAL = [Range("198.18.0.0/24", gateway="198.18.0.1"), "fd00::/120"]


# -- typed arguments and results --------------------------------------------------------------


async def test_pool_lifecycle_with_plain_and_ipaddress_arguments(client: Any) -> None:
    pool = await client.create_pool(
        "pods",
        [
            Range(ipaddress.ip_network("198.18.0.0/24"), gateway=ipaddress.ip_address("198.18.0.1"),
                  exclude=["198.18.0.5", ipaddress.ip_network("198.18.0.128/25")]),
            Range("fd00::/120", first="fd00::10", last=ipaddress.ip_address("fd00::ff"), block_size=16),
        ],
        labels={"team": "net"},
    )
    assert pool.name == "pods"
    assert pool.families == (Family.IPV4, Family.IPV6)
    v4, v6 = pool.ranges
    assert v4.cidr == ipaddress.ip_network("198.18.0.0/24")
    assert v4.gateway == ipaddress.ip_address("198.18.0.1")
    assert set(v4.exclude) == {ipaddress.ip_network("198.18.0.5/32"), ipaddress.ip_network("198.18.0.128/25")}
    assert (v6.first, v6.last, v6.block_size) == (ipaddress.ip_address("fd00::10"), ipaddress.ip_address("fd00::ff"),
                                                  16)
    assert v4.first is None and v4.last is None
    assert dict(pool.labels) == {"team": "net"}
    assert isinstance(pool.create_time, dt.datetime) and pool.create_time.tzinfo is not None
    usage4 = pool.usage_of("ipv4")
    assert usage4 is not None and usage4.allocated == 0 and usage4.free == usage4.size
    # 126 addresses in .1-.127, minus the gateway .1 and the excluded .5
    assert usage4.size == 125
    assert pool.usage_of(Family.IPV6).size == 240  # fd00::10 .. fd00::ff

    assert await client.get_pool("pods") == pool
    page = await client.list_pools()
    assert [p.name for p in page] == ["pods"] and page.next_page_token == ""
    await client.delete_pool("pods")
    with pytest.raises(sdk.PoolNotFound):
        await client.get_pool("pods")


async def test_allocate_is_typed_ordered_and_idempotent(client: Any) -> None:
    await client.create_pool("pairs", DUAL)
    first = await client.allocate("pairs", "c1/eth0", policy=Policy.REQUIRE_DUAL_STACK, families=["ipv6", "ipv4"],
                                  attributes={"ns": "default"})
    assert first.created is True
    alloc = first.allocation
    assert (alloc.pool, alloc.owner, dict(alloc.attributes)) == ("pairs", "c1/eth0", {"ns": "default"})
    assert [a.family for a in alloc.addresses] == [Family.IPV6, Family.IPV4]  # primary first
    assert alloc.primary == alloc.ipv6
    assert isinstance(alloc.ipv4.ip, ipaddress.IPv4Address) and alloc.ipv4.ip in ipaddress.ip_network("198.18.0.0/24")
    assert alloc.ipv4.prefix_length == 24 and alloc.ipv4.gateway == ipaddress.ip_address("198.18.0.1")
    assert alloc.ipv6.gateway is None and alloc.ipv6.interface.network == ipaddress.ip_network("fd00::/120")

    again = await client.allocate("pairs", "c1/eth0", policy="require", families=["ipv6", "ipv4"])
    assert again.created is False and again.allocation.addresses == alloc.addresses
    held = await client.get_allocation("pairs", "c1/eth0")
    assert (held.ipv4, held.ipv6, held.create_time) == (alloc.ipv4, alloc.ipv6, alloc.create_time)

    wanted = ipaddress.ip_address("198.18.0.77")
    specific = await client.allocate("pairs", "c2/eth0", addresses=[wanted])
    assert [a.ip for a in specific.allocation.addresses] == [wanted]

    released = await client.release("pairs", "c1/eth0", families="ipv6")
    assert released == (alloc.ipv6,)
    assert (await client.get_allocation("pairs", "c1/eth0")).addresses == (alloc.ipv4,)
    assert await client.release("pairs", "c1/eth0") == (alloc.ipv4,)
    assert await client.release("pairs", "c1/eth0") == ()  # idempotent
    assert await client.release("pairs", "never-seen") == ()


async def test_prefer_policy_and_kubernetes_spellings(client: Any) -> None:
    await client.create_pool("v4only", "198.18.1.0/28")
    got = await client.allocate("v4only", "a", policy="PreferDualStack")
    assert [a.family for a in got.allocation.addresses] == [Family.IPV4]
    got = await client.allocate("v4only", "b", policy="prefer", families=Family.IPV4)
    assert got.allocation.ipv6 is None


async def test_garbage_collect_keeps_live_owners(client: Any) -> None:
    await client.create_pool("gc", DUAL)
    for owner in ("live-1", "live-2", "gone-1", "gone-2"):
        await client.allocate("gc", owner, policy="require")
    released = await client.garbage_collect("gc", ["live-1", "live-2"], grace=0)
    assert sorted(a.owner for a in released) == ["gone-1", "gone-2"]
    assert all(len(a.addresses) == 2 for a in released)
    assert [a.owner for a in (await client.list_allocations("gc"))] == ["live-1", "live-2"]
    assert await client.garbage_collect("gc", ["live-1"], grace=dt.timedelta(hours=1)) == ()


def test_pages_and_iterators_sync(target: str) -> None:
    with IpamClient(target, timeout=WAIT) as ipam:
        ipam.create_pool("paged", DUAL)
        owners = [f"owner-{i:02d}" for i in range(23)]
        for owner in owners:
            ipam.allocate("paged", owner, policy="require")
        page = ipam.list_allocations("paged", page_size=10)
        assert len(page) == 10 and page.next_page_token
        assert [a.owner for a in page] == owners[:10]
        nxt = ipam.list_allocations("paged", page_size=10, page_token=page.next_page_token)
        assert [a.owner for a in nxt] == owners[10:20]
        assert [a.owner for a in ipam.iter_allocations("paged", page_size=7)] == owners
        ipam.create_pool("other", "198.18.9.0/24")
        assert [p.name for p in ipam.iter_pools(page_size=1)] == ["other", "paged"]


async def test_pages_and_iterators_async(target: str) -> None:
    async with AsyncIpamClient(target, timeout=WAIT) as ipam:
        await ipam.create_pool("paged", DUAL)
        owners = [f"owner-{i:02d}" for i in range(12)]
        await asyncio.gather(*(ipam.allocate("paged", o, policy="require") for o in owners))
        assert [a.owner async for a in ipam.iter_allocations("paged", page_size=5)] == owners
        assert [p.name async for p in ipam.iter_pools(page_size=1)] == ["paged"]


# -- every reason the service reports, and what is not retried ------------------------------

async def _exhausted(c: Any) -> None:
    await c.create_pool("tiny", [Range("198.18.2.0/24", first="198.18.2.10", last="198.18.2.10")])
    await c.allocate("tiny", "first")
    await c.allocate("tiny", "second")


async def _in_use(c: Any) -> None:
    await c.create_pool("taken", DUAL)
    await c.allocate("taken", "a", addresses=["198.18.0.9"])
    await c.allocate("taken", "b", addresses=["198.18.0.9"])


async def _other_address(c: Any) -> None:
    await c.create_pool("held", DUAL)
    await c.allocate("held", "a", addresses=["198.18.0.9"])
    await c.allocate("held", "a", addresses=["198.18.0.10"])


async def _has_allocations(c: Any) -> None:
    await c.create_pool("busy", DUAL)
    await c.allocate("busy", "a")
    await c.delete_pool("busy")


async def _pool_exists(c: Any) -> None:
    await c.create_pool("dup", DUAL)
    await c.create_pool("dup", ["198.18.3.0/24"])


async def _family_missing(c: Any) -> None:
    await c.create_pool("only4", "198.18.4.0/24")
    await c.allocate("only4", "a", families=["ipv6"])


async def _no_allocation(c: Any) -> None:
    await c.create_pool("empty", DUAL)
    await c.get_allocation("empty", "nobody")


REASONS = [
    # (scenario, class, code, reason, a word of the server's message)
    (lambda c: c.get_pool("Not_A_Label"), sdk.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT",
     "name"),
    (lambda c: c.allocate("whatever", "has space"), sdk.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT,
     "INVALID_ARGUMENT", "owner"),
    (lambda c: c.get_pool("missing"), sdk.PoolNotFound, grpc.StatusCode.NOT_FOUND, "POOL_NOT_FOUND", "missing"),
    (lambda c: c.allocate("missing", "a"), sdk.PoolNotFound, grpc.StatusCode.NOT_FOUND, "POOL_NOT_FOUND", "missing"),
    (_no_allocation, sdk.AllocationNotFound, grpc.StatusCode.NOT_FOUND, "ALLOCATION_NOT_FOUND", "nobody"),
    (_pool_exists, sdk.PoolAlreadyExists, grpc.StatusCode.ALREADY_EXISTS, "POOL_ALREADY_EXISTS", "dup"),
    (_in_use, sdk.AddressInUse, grpc.StatusCode.ALREADY_EXISTS, "ADDRESS_IN_USE", "198.18.0.9"),
    (_has_allocations, sdk.PoolHasAllocations, grpc.StatusCode.FAILED_PRECONDITION, "POOL_HAS_ALLOCATIONS", "busy"),
    (_family_missing, sdk.FamilyNotInPool, grpc.StatusCode.FAILED_PRECONDITION, "FAMILY_NOT_IN_POOL", "IPv6"),
    (_other_address, sdk.OwnerHoldsOtherAddress, grpc.StatusCode.FAILED_PRECONDITION, "OWNER_HOLDS_OTHER_ADDRESS",
     "198.18.0.9"),
    (_exhausted, sdk.PoolExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, "POOL_EXHAUSTED", "tiny"),
]


@pytest.mark.parametrize(("scenario", "cls", "code", "reason", "word"), REASONS,
                         ids=[r[3] + f"-{i}" for i, r in enumerate(REASONS)])
async def test_each_reason_raises_its_class_once(client: Any, scenario: Any, cls: type[sdk.IpamError],
                                                 code: grpc.StatusCode, reason: str, word: str) -> None:
    with pytest.raises(sdk.IpamError) as caught:
        await scenario(client)
    err = caught.value
    assert type(err) is cls, repr(err)
    assert (err.code, err.reason, err.domain) == (code, reason, sdk.ERROR_DOMAIN)
    assert word in err.message and str(err) == err.message
    assert err.field  # the server names the field at fault
    assert err.attempts == 1  # none of these is retried
    assert not err.retryable


async def test_hierarchy_lets_callers_catch_broadly(client: Any) -> None:
    with pytest.raises(sdk.NotFound):
        await client.get_pool("absent")
    with pytest.raises(ValueError):  # InvalidArgument is a ValueError too
        await client.get_pool("UPPER")
    await client.create_pool("tiny", [Range("198.18.2.0/24", first="198.18.2.10", last="198.18.2.10")])
    await client.allocate("tiny", "a")
    with pytest.raises(sdk.ResourceExhausted):
        await client.allocate("tiny", "b")


async def test_deadline_exceeded_while_the_server_waits_on_a_lock(client: Any, db_url: str) -> None:
    await client.create_pool("locked", DUAL)
    locker = subprocess.Popen(  # noqa: ASYNC220 - a psql session that holds the lock
        ["psql", db_url, "-tAq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdin is not None and locker.stdout is not None
        locker.stdin.write("BEGIN;\nSELECT 1 FROM ipam_ranges FOR UPDATE;\n\\echo locked\n")
        locker.stdin.flush()
        while locker.stdout.readline().strip() != "locked":
            pass
        with pytest.raises(sdk.DeadlineExceeded) as caught:
            await client.allocate("locked", "waits", policy="require", timeout=1.0)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and caught.value.attempts == 1
    finally:
        if locker.stdin:
            locker.stdin.write("ROLLBACK;\n")
            locker.stdin.close()
        locker.wait(10)


def test_local_validation_raises_before_any_call() -> None:
    with pytest.raises(sdk.InvalidArgument) as caught:
        Range("198.18.0.1/24")  # host bits set
    assert caught.value.attempts == 0 and caught.value.field == "cidr"
    with pytest.raises(sdk.InvalidArgument, match="gateway"):
        Range("198.18.0.0/24", gateway="not-an-ip")
    with pytest.raises(sdk.InvalidArgument, match="ipv5"):
        Family.parse("ipv5")
    with pytest.raises(sdk.InvalidArgument, match="single, prefer or require"):
        Policy.parse("dual")
    assert Policy.parse("require-dual-stack") is Policy.REQUIRE_DUAL_STACK
    assert Family.parse(6) is Family.IPV6 and Family.parse("IP_FAMILY_IPV4") is Family.IPV4
    with pytest.raises(sdk.InvalidArgument, match="target"):
        IpamClient("no-port-here", timeout=WAIT)
    with pytest.raises(sdk.InvalidArgument, match="mixes IPv4 and IPv6"):
        IpamClient("127.0.0.1:1,[::1]:2", timeout=WAIT)
    with IpamClient("127.0.0.1:1", timeout=WAIT) as ipam:  # nothing is sent for a malformed argument
        with pytest.raises(sdk.InvalidArgument) as caught:
            ipam.allocate("p", "o", addresses=["198.18.0.300"])
        assert caught.value.attempts == 0 and caught.value.field == "addresses[0]"
        with pytest.raises(sdk.InvalidArgument) as caught:
            ipam.create_pool("p", ["198.18.0.0/33"])
        assert caught.value.field == "ranges[0].cidr"
        with pytest.raises(sdk.InvalidArgument, match="valid_owners"):
            ipam.garbage_collect("p", "one-owner")


def _status_trailer(code: int, reason: str, message: str) -> tuple[tuple[str, bytes], ...]:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=sdk.ERROR_DOMAIN, metadata={"field": "x"}))
    status = status_pb2.Status(code=code, message=message, details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),)


def test_unknown_reasons_fall_back_on_the_code_and_the_table_extends() -> None:
    err = sdk.error_from_status(grpc.StatusCode.NOT_FOUND, "thing: gone", _status_trailer(5, "THING_NOT_FOUND", "x"))
    assert type(err) is sdk.NotFound and err.reason == "THING_NOT_FOUND" and err.field == "x"
    err = sdk.error_from_status(grpc.StatusCode.PERMISSION_DENIED, "role shim may not", None)
    assert type(err) is sdk.PermissionDenied and err.reason == ""
    err = sdk.error_from_status(grpc.StatusCode.UNAUTHENTICATED, "no token", None)
    assert type(err) is sdk.Unauthenticated
    err = sdk.error_from_status(grpc.StatusCode.DATA_LOSS, "odd", None)
    assert type(err) is sdk.IpamError and err.code == grpc.StatusCode.DATA_LOSS

    class ThingNotFound(sdk.NotFound):
        reason = "THING_NOT_FOUND"

    sdk.register_error(grpc.StatusCode.NOT_FOUND, "THING_NOT_FOUND", ThingNotFound)
    try:
        err = sdk.error_from_status(grpc.StatusCode.NOT_FOUND, "gone", _status_trailer(5, "THING_NOT_FOUND", "x"))
        assert type(err) is ThingNotFound and isinstance(err, sdk.NotFound)
    finally:
        sdk.register_error(grpc.StatusCode.NOT_FOUND, "THING_NOT_FOUND", sdk.NotFound)
    err = sdk.error_from_status(grpc.StatusCode.NOT_FOUND, "range: gone", _status_trailer(5, "RANGE_NOT_FOUND", "x"))
    assert type(err) is sdk.RangeNotFound
    # every row of the table agrees with its class
    for code, reason, cls in sdk.ERROR_TABLE:
        assert cls.code == code, (code, reason, cls)
        assert reason is None or cls.reason == reason


# -- connection handling ---------------------------------------------------------------------


def _established_to(port: int) -> int:
    """Client-side TCP connections to ``port`` (ESTABLISHED) in this network namespace."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.fixture(scope="module")
def private_server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of this module's own (TCP and a unix socket), so that its connections are ours."""
    tmp = tmp_path_factory.mktemp("sdk-private")
    server = spawn_server(db_url, tmp, args=("--listen", f"unix://{tmp}/ipam.sock"))
    yield server
    server.terminate()


@pytest.fixture
def private(private_server: ServerProcess, clean_db: str) -> ServerProcess:
    return private_server


def test_closing_the_sync_client_releases_its_channel(private: ServerProcess) -> None:
    target = private.target
    port = int(target.rsplit(":", 1)[1])
    assert _eventually(lambda: _established_to(port) == 0)
    with IpamClient(target, timeout=WAIT) as ipam:
        ipam.list_pools()
        assert _established_to(port) == 1
    assert _eventually(lambda: _established_to(port) == 0)
    with pytest.raises(ValueError, match="closed"):
        ipam.list_pools()
    ipam.close()  # twice is harmless


async def test_closing_the_async_client_releases_its_channel(private: ServerProcess) -> None:
    target = private.target
    port = int(target.rsplit(":", 1)[1])
    assert await asyncio.to_thread(_eventually, lambda: _established_to(port) == 0)
    async with AsyncIpamClient(target, timeout=WAIT) as ipam:
        await ipam.list_pools()
        assert _established_to(port) == 1
    assert await asyncio.to_thread(_eventually, lambda: _established_to(port) == 0)
    with pytest.raises(ValueError, match="closed"):
        await ipam.list_pools()


def test_unix_socket_target_and_env(private: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = private.log_path.parent / "ipam.sock"
    with IpamClient(f"unix://{sock}", timeout=WAIT) as ipam:
        ipam.create_pool("unix", "198.18.5.0/24")
        assert ipam.allocate("unix", "a").allocation.ipv4 is not None
    monkeypatch.setenv("DSIPAM_TARGET", f"unix://{sock}")
    with IpamClient(timeout=WAIT) as ipam:  # the target comes from DSIPAM_TARGET
        assert ipam.target == f"unix://{sock}"
        assert [p.name for p in ipam.list_pools()] == ["unix"]
    monkeypatch.setenv("DSIPAM_TIMEOUT", "5")
    with IpamClient.from_env() as ipam:
        assert ipam.get_allocation("unix", "a").owner == "a"


def test_round_robin_over_two_servers(db_url: str, clean_db: str, tmp_path: Path) -> None:
    one = spawn_server(db_url, tmp_path)
    two = spawn_server(db_url, tmp_path)
    ports = [int(s.target.rsplit(":", 1)[1]) for s in (one, two)]
    try:
        with IpamClient(f"ipv4:{one.target},{two.target}", timeout=WAIT) as ipam:
            ipam.create_pool("rr", DUAL)
            for i in range(4):
                ipam.allocate("rr", f"o{i}", policy="require")
            # round_robin keeps a connection to every address (pick_first would hold one)
            assert _eventually(lambda: all(_established_to(p) == 1 for p in ports))
        assert _eventually(lambda: all(_established_to(p) == 0 for p in ports))
        with IpamClient(f"{one.target},{two.target}", timeout=WAIT) as ipam:  # a plain list becomes an ipv4: target
            assert ipam.target == f"ipv4:{one.target},{two.target}"
            for i in range(4, 8):
                ipam.allocate("rr", f"o{i}", policy="require")
            assert _eventually(lambda: all(_established_to(p) == 1 for p in ports))
            one.terminate()
            # the other server answers every call; the balancer drops the stopped one
            for i in range(8, 12):
                ipam.allocate("rr", f"o{i}", policy="require")
            assert len(list(ipam.iter_allocations("rr"))) == 12
    finally:
        one.terminate()
        two.terminate()


def test_the_sdk_imports_no_server_dependencies(target: str) -> None:
    code = (
        "import sys\n"
        "from dsipam.client import IpamClient\n"
        f"with IpamClient({target!r}) as c:\n"
        "    c.list_pools()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'asyncpg', 'alembic')\n"
        "             or m.startswith('dsipam.server'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_public_names_are_documented_and_exported() -> None:
    assert sorted(sdk.__all__) == sorted(set(sdk.__all__)) == sorted(sdk._MODULE_OF)
    for name in sdk.__all__:
        value = getattr(sdk, name)
        if callable(value) and not isinstance(value, frozenset):
            assert value.__doc__, name
    for cls in (IpamClient, AsyncIpamClient):
        for name in ("create_pool", "get_pool", "list_pools", "delete_pool", "allocate", "release",
                     "get_allocation", "list_allocations", "garbage_collect", "iter_pools", "iter_allocations",
                     "close"):
            assert getattr(cls, name).__doc__, f"{cls.__name__}.{name}"
    assert Address.__doc__
