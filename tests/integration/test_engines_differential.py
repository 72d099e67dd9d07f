"""Differential test of the two allocation engines: the batched fast path (store/_fast.py and the
SQL functions of migrations 0004-0011) against the full path (store/_alloc.py).

Hypothesis draws a pool and a sequence of operations (Allocate in every policy and family order,
with and without specific addresses and nodes; Release of all or one family; GarbageCollect;
GetAllocation; ReserveAddresses / UnreserveAddresses; AddPoolRange / RemovePoolRange;
ReleaseNode; UpdatePool of cooldown and node affinity). Every operation is sent, one call at a
time, to two real servers on databases of their own: one with ``DSIPAM_FAST_PATH=1``, one with
``DSIPAM_FAST_PATH=0``. Their answers (status code, message, ErrorInfo, and the whole response
without timestamps) must be equal after each call, and at the end of each example so must the
state: the pool and its usage, the allocations, the blocks (bitmaps and counters), the
cooldowns, the reservations and the event outbox; ``fsck`` must be clean on both.

Why the addresses can be compared exactly: with one call at a time, both engines take the
first free bit of the first block with room, but they order blocks differently: the full path
and ``dsipam_take`` (node requests) by block id, ``dsipam_take_many`` (the fast path without a
node, 0009/0010) by block base address. Block ids follow creation order, and creation differs:
the full path creates blocks lazily (and a specific address creates its block out of order),
while the fast server also creates spare blocks in the background after a fast-path miss, racing
the full path of that same request. So the test makes creation order deterministic and equal to
address order: when a range appears (CreatePool, AddPoolRange) every one of its blocks is
created at once, in address order, on both servers (a specific-address Allocate per block, then
its Release, under a cooldown of 0), and added ranges always lie above every earlier range of
their family. No later operation can create a block, so id order = address order in both
databases, and both engines must choose the same address.

Cost: the two servers and databases live for the module; each example uses a fresh pool name
and deletes its pool at the end (DeletePool force, compared too). ``DSIPAM_DIFF_EXAMPLES`` sets
the number of examples (default 25, which takes well under a minute here; 0 runs only the explicit
examples; a long run: ``DSIPAM_DIFF_EXAMPLES=1000 scripts/test tests/integration/test_engines_differential.py
--timeout=0 -s``: without ``--timeout=0`` pytest-timeout's 300 s per test ends a run of more than about
1,400 examples).

Fast-path errors: after each example both servers' logs (ERROR lines, "fast path", "fell back")
and the fast server's ``dsipam_fast_path_errors_total`` are checked, so a batch that failed and
was served by the full path fails the example that caused it (and hypothesis shrinks it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.protobuf.json_format import MessageToDict
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import Phase, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from sqlalchemy import text
from support import ServerProcess, psql, scratch_database, spawn_server

from dsipam.server.store import Store, create_engine
from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

DIFF_EXAMPLES = int(os.environ.get("DSIPAM_DIFF_EXAMPLES", "25"))  # 0: only the explicit examples

FAMILY = {4: pb.IP_FAMILY_IPV4, 6: pb.IP_FAMILY_IPV6}
POLICY = {
    "unspecified": pb.IP_FAMILY_POLICY_UNSPECIFIED,
    "single": pb.IP_FAMILY_POLICY_SINGLE_STACK,
    "prefer": pb.IP_FAMILY_POLICY_PREFER_DUAL_STACK,
    "require": pb.IP_FAMILY_POLICY_REQUIRE_DUAL_STACK,
}
OWNERS = ("a", "b", "c", "d", "e", "f", "g", "h")
NODES = ("", "n1", "n2")
SLOT = 8  # every range is a /29 (IPv4: 6 usable) or a /125 (IPv6): 8 addresses, so pools run out
SLOTS = 6  # ranges per family: at most this many slots, each above the ones before
BASE = {4: ipaddress.ip_address("198.18.0.0"), 6: ipaddress.ip_address("fd00::")}
PREFIX = {4: 29, 6: 125}
WARM_OWNER = "warm-up"
LONG_COOLDOWN = 3600  # never expires during a run: cooled addresses stay cooled, deterministically


# -- what hypothesis draws ----------------------------------------------------------------------
# A range: (block_size, gateway?, excluded offset or None). Ops are plain tuples so that a shrunk
# example prints as something that can be pasted into @example.

range_params = st.tuples(st.sampled_from((0, 2, 4, 8)), st.booleans(), st.none() | st.integers(0, SLOT - 1))
# Mostly in the first two slots (the ranges most pools have); some lie outside every range.
address_ref = st.tuples(st.sampled_from((4, 6)), st.integers(0, 2 * SLOT - 1) | st.integers(0, SLOT * SLOTS + 3))
families = st.sampled_from(((), (4,), (6,), (4, 6), (6, 4)))

allocate_op = st.tuples(
    st.just("allocate"), st.sampled_from(OWNERS), st.sampled_from(tuple(POLICY)), families,
    st.just(()) | st.just(()) | st.just(()) | st.lists(address_ref, min_size=1, max_size=2).map(tuple),
    st.sampled_from(NODES), st.booleans(),
)
ops = st.one_of(
    allocate_op,
    allocate_op,
    allocate_op,  # three times as likely as each of the rest
    # Allocate the first ``count`` owners one after the other: pools run out within a short example.
    st.tuples(st.just("fill"), st.sampled_from(tuple(POLICY)), families, st.integers(1, len(OWNERS)),
              st.sampled_from(NODES)),
    st.tuples(st.just("release"), st.sampled_from(OWNERS), families),
    st.tuples(st.just("gc"), st.lists(st.sampled_from(OWNERS), max_size=3, unique=True).map(tuple)),
    st.tuples(st.just("get"), st.sampled_from(OWNERS)),
    st.tuples(st.just("reserve"), st.lists(st.tuples(address_ref, st.booleans()), min_size=1, max_size=2).map(tuple),
              st.booleans()),
    st.tuples(st.just("unreserve"), st.lists(st.tuples(address_ref, st.booleans()), min_size=1, max_size=2).map(tuple)),
    st.tuples(st.just("unreserve_held"), st.integers(0, 3)),  # the k-th reservation the pool holds
    st.tuples(st.just("add_range"), st.sampled_from((4, 6)), range_params),
    st.tuples(st.just("remove_range"), st.sampled_from((4, 6)), st.integers(0, 3)),
    st.tuples(st.just("release_node"), st.sampled_from(NODES[1:])),
    st.tuples(st.just("update"), st.sampled_from((None, 0, LONG_COOLDOWN)), st.sampled_from((None, False, True))),
)
pools = st.fixed_dictionaries({
    "families": st.sampled_from(((4,), (6,), (4, 6), (6, 4))),
    "ranges": st.tuples(range_params, range_params),  # the first range of each family
    "cooldown": st.sampled_from((0, LONG_COOLDOWN)),
    "strict": st.booleans(),
})


# -- the two servers ---------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    server: ServerProcess
    url: str
    channel: grpc.Channel
    stub: ipam_pb2_grpc.IpamServiceStub
    store: Store | None = None
    log_from: int = 0


@dataclass
class Engines:
    fast: Side
    full: Side
    loop: asyncio.AbstractEventLoop
    examples: int = 0
    ops: int = 0
    answers: Counter[str] = field(default_factory=Counter)

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.fast, self.full


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    tmp = tmp_path_factory.mktemp("engines")
    with scratch_database("dsipam_diff_fast") as fast_url, scratch_database("dsipam_diff_full") as full_url:
        sides = []
        try:
            for name, url, on in (("fast", fast_url, "1"), ("full", full_url, "0")):
                server = spawn_server(url, tmp, extra_env={"DSIPAM_FAST_PATH": on, "DSIPAM_METRICS_LISTEN": "127.0.0.1:0",
                                                           "DSIPAM_METRICS_POOL_INTERVAL": "3600"})
                channel = grpc.insecure_channel(server.target)
                sides.append(Side(name, server, url, channel, ipam_pb2_grpc.IpamServiceStub(channel)))
            loop = asyncio.new_event_loop()
            for side in sides:
                side.store = Store(create_engine(side.url, pool_size=1, max_overflow=0))
            eng = Engines(sides[0], sides[1], loop)
            started = {side.name: len(side.server.log()) for side in sides}
            yield eng
            # Background work (block top-up, cooldown reclaim) may log after an example's own check.
            for side in sides:
                lines = error_lines(side.server, started[side.name])
                assert not lines, f"{side.name} server ({side.server.log_path}) logged:\n" + "\n".join(lines[:10])
            print(f"\nengines differential: {eng.examples} examples, {eng.ops} calls on each server, "
                  f"answers: {dict(sorted(eng.answers.items()))}")
            for side in sides:
                assert side.store is not None
                loop.run_until_complete(side.store.close())
            loop.close()
        finally:
            for side in sides:
                side.channel.close()
                side.server.terminate()  # fails on fast-path errors it counted or logged


_METRICS_LINE = re.compile(r"dsipam: metrics on http://(\S+)/metrics")
_SUSPECT_LINE = re.compile(r"\bERROR\b|fast path|fell back|falls back", re.IGNORECASE)
FAST_PATH_ERRORS = "dsipam_fast_path_errors_total"


def error_lines(server: ServerProcess, since: int = 0) -> list[str]:
    """Lines of the server's log from character ``since`` on that report an error or a fallback."""
    return [line for line in server.log()[since:].splitlines() if _SUSPECT_LINE.search(line)]


def fast_path_errors(server: ServerProcess) -> float:
    """The server's dsipam_fast_path_errors_total (all kinds), scraped from its /metrics."""
    found = _METRICS_LINE.search(server.log())
    assert found, f"no metrics address in {server.log_path}"
    with urllib.request.urlopen(f"http://{found.group(1)}/metrics", timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if re.match(FAST_PATH_ERRORS + r"[{ ]", line))


# -- one call on both --------------------------------------------------------------------------

_SECONDS = re.compile(r"\d+(\.\d+)?s\b")  # "in cooldown for 3599s more": the clock, not the engine
# ReserveAddresses lists the allocated addresses in no defined order (store/_admin.py _SQL_HELD_IN has no
# ORDER BY, so the order is the plan's and the heap's, and differs between two databases and between runs):
# compared as a set. Remove this once that query orders its rows.
_HELD_LIST = re.compile(r"(are allocated: )(.*?)(; reserve with force)")


def _message(text: str) -> str:
    text = _SECONDS.sub("Ns", text)
    return _HELD_LIST.sub(lambda m: m.group(1) + ", ".join(sorted(m.group(2).split(", "))) + m.group(3), text)


def _plain(msg: Any) -> Any:
    """The response as a dict without timestamps (create_time differs between the databases)."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "create_time"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(MessageToDict(msg, preserving_proto_field_name=True))


def _call(side: Side, method: str, request: Any) -> tuple[Any, ...]:
    try:
        return ("OK", _plain(getattr(side.stub, method)(request, timeout=30)))
    except grpc.RpcError as err:
        reason, metadata = "", {}
        status = rpc_status.from_call(err)
        for detail in status.details if status else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, {k: _SECONDS.sub("Ns", v) for k, v in info.metadata.items()}
        return (err.code().name, _message(err.details() or ""), reason, metadata)


class Mismatch(AssertionError):
    pass


def both(eng: Engines, step: str, method: str, request: Any, *, tally: str = "") -> tuple[Any, ...]:
    """Sends ``request`` to the fast server, then to the full one; their answers must be equal.
    ``tally``: the name the answer is counted under (the method's by default)."""
    fast = _call(eng.fast, method, request)
    full = _call(eng.full, method, request)
    eng.ops += 1
    if fast != full:
        raise Mismatch(f"{step}: {method} answers differ\n  fast path: {fast}\n  full path: {full}")
    what = f"{tally or method}: {fast[0]}"
    eng.answers[what] += 1
    if currently_in_test_context():
        event(what)
    return fast


# -- the pool layout the test keeps in step --------------------------------------------------------


def addr(fam: int, offset: int) -> str:
    return str(BASE[fam] + offset)


def slot_cidr(fam: int, slot: int) -> str:
    return f"{addr(fam, slot * SLOT)}/{PREFIX[fam]}"


def ip_range(fam: int, slot: int, params: tuple[int, bool, int | None]) -> pb.IpRange:
    block_size, gateway, exclude = params
    r = pb.IpRange(cidr=slot_cidr(fam, slot), block_size=block_size)
    if gateway:
        r.gateway = addr(fam, slot * SLOT + 1)
    if exclude is not None:
        r.exclude.append(addr(fam, slot * SLOT + exclude))
    return r


@dataclass
class Layout:
    name: str
    cooldown: int
    ranges: dict[int, list[tuple[int, int]]]  # family -> [(slot, block size)], as both servers hold them
    next_slot: dict[int, int]
    reservations: list[str] = field(default_factory=list)  # as the last Pool answer listed them


def warm_up(eng: Engines, lay: Layout, fam: int, slot: int, block: int, step: str) -> None:
    """Creates every block of a new range, in address order, on both servers (see the module doc)."""
    if lay.cooldown:
        both(eng, step, "UpdatePool", _update(lay.name, cooldown=0), tally="warm-up")
    for base in range(slot * SLOT, (slot + 1) * SLOT, block):
        for offset in range(base, base + block):
            got = both(eng, f"{step} (warm-up {addr(fam, offset)})", "Allocate", pb.AllocateRequest(
                pool=lay.name, owner=WARM_OWNER, ip_family_policy=POLICY["single"], ip_families=[FAMILY[fam]],
                addresses=[addr(fam, offset)]), tally="warm-up")
            if got[0] == "OK":
                both(eng, f"{step} (warm-up release)", "Release", pb.ReleaseRequest(pool=lay.name, owner=WARM_OWNER),
                     tally="warm-up")
                break
    if lay.cooldown:
        both(eng, step, "UpdatePool", _update(lay.name, cooldown=lay.cooldown), tally="warm-up")


def _update(name: str, *, cooldown: int | None = None, strict: bool | None = None) -> pb.UpdatePoolRequest:
    p = pb.Pool(name=name)
    paths = []
    if cooldown is not None:
        p.cooldown.CopyFrom(duration_pb2.Duration(seconds=cooldown))
        paths.append("cooldown")
    if strict is not None:
        p.node_affinity = pb.NODE_AFFINITY_STRICT if strict else pb.NODE_AFFINITY_BORROW
        paths.append("node_affinity")
    return pb.UpdatePoolRequest(pool=p, update_mask=field_mask_pb2.FieldMask(paths=paths))


def _block_of(params: tuple[int, bool, int | None]) -> int:
    return min(params[0] or 64, SLOT)  # 0: the default of 64, clipped to the range


def _reservation(ref: tuple[tuple[int, int], bool]) -> str:
    (fam, offset), cidr = ref
    if not cidr:
        return addr(fam, offset)
    size = 2  # a /31 or a /127
    return f"{addr(fam, offset - offset % size)}/{PREFIX[fam] + 2}"


# -- one example ----------------------------------------------------------------------------------


def run_op(eng: Engines, lay: Layout, i: int, op: tuple[Any, ...]) -> None:
    _run_op(eng, lay, i, op)
    if op[0] in ("reserve", "unreserve", "unreserve_held", "add_range", "remove_range"):
        got = both(eng, f"op {i} (reservations)", "GetPool", pb.GetPoolRequest(name=lay.name), tally="GetPool after")
        lay.reservations = got[1].get("reservations", []) if got[0] == "OK" else []


def _run_op(eng: Engines, lay: Layout, i: int, op: tuple[Any, ...]) -> None:
    step = f"op {i} {op!r}"
    kind = op[0]
    name = lay.name
    if kind == "allocate":
        _, owner, policy, fams, addresses, node, attrs = op
        request = pb.AllocateRequest(pool=name, owner=owner, ip_family_policy=POLICY[policy],
                                     ip_families=[FAMILY[f] for f in fams], addresses=[addr(*a) for a in addresses],
                                     node=node, attributes={"op": str(i)} if attrs else {})
        got = both(eng, step, "Allocate", request)
        if got[0] == "OK":
            check_in_ranges(lay, got[1]["allocation"], step)
    elif kind == "fill":
        _, policy, fams, count, node = op
        for owner in OWNERS[:count]:
            run_op(eng, lay, i, ("allocate", owner, policy, fams, (), node, False))
    elif kind == "release":
        _, owner, fams = op
        both(eng, step, "Release", pb.ReleaseRequest(pool=name, owner=owner, ip_families=[FAMILY[f] for f in fams]))
    elif kind == "gc":
        both(eng, step, "GarbageCollect", pb.GarbageCollectRequest(pool=name, valid_owners=list(op[1]),
                                                                   grace=duration_pb2.Duration(seconds=0)))
    elif kind == "get":
        both(eng, step, "GetAllocation", pb.GetAllocationRequest(pool=name, owner=op[1]))
    elif kind == "reserve":
        both(eng, step, "ReserveAddresses", pb.ReserveAddressesRequest(
            pool=name, addresses=[_reservation(r) for r in op[1]], force=op[2]))
    elif kind == "unreserve":
        both(eng, step, "UnreserveAddresses", pb.UnreserveAddressesRequest(
            pool=name, addresses=[_reservation(r) for r in op[1]]))
    elif kind == "unreserve_held":
        if op[1] < len(lay.reservations):
            both(eng, step, "UnreserveAddresses", pb.UnreserveAddressesRequest(
                pool=name, addresses=[lay.reservations[op[1]]]))
    elif kind == "add_range":
        _, fam, params = op
        slot = lay.next_slot[fam]
        if slot >= SLOTS:
            return
        lay.next_slot[fam] = slot + 1  # above every earlier range of the family: id order = address order
        got = both(eng, step, "AddPoolRange", pb.AddPoolRangeRequest(pool=name, range=ip_range(fam, slot, params)))
        if got[0] == "OK":
            lay.ranges.setdefault(fam, []).append((slot, _block_of(params)))
            warm_up(eng, lay, fam, slot, _block_of(params), step)
    elif kind == "remove_range":
        _, fam, k = op
        held = lay.ranges.get(fam, [])
        slot = held[k][0] if k < len(held) else lay.next_slot[fam]  # past the end: a range the pool lacks
        got = both(eng, step, "RemovePoolRange", pb.RemovePoolRangeRequest(pool=name, cidr=slot_cidr(fam, slot)))
        if got[0] == "OK":
            lay.ranges[fam] = [r for r in held if r[0] != slot]
    elif kind == "release_node":
        both(eng, step, "ReleaseNode", pb.ReleaseNodeRequest(pool=name, node=op[1]))
    elif kind == "update":
        _, cooldown, strict = op
        if cooldown is None and strict is None:
            return
        got = both(eng, step, "UpdatePool", _update(name, cooldown=cooldown, strict=strict))
        if got[0] == "OK" and cooldown is not None:
            lay.cooldown = cooldown
    else:  # pragma: no cover - a typo in an @example
        raise AssertionError(f"unknown op {op!r}")


def check_in_ranges(lay: Layout, allocation: dict[str, Any], step: str) -> None:
    """Every address handed out lies in one of the pool's ranges (as the test knows them)."""
    for a in allocation.get("addresses", []):
        ip = ipaddress.ip_address(a["ip"])
        nets = [ipaddress.ip_network(slot_cidr(ip.version, s)) for s, _ in lay.ranges.get(ip.version, [])]
        assert any(ip in n for n in nets), f"{step}: {ip} is in none of the pool's ranges {nets}"


_STATE_SQL = {
    "blocks": "SELECT host(b.base) || '/' || masklen(b.base) AS base, b.family, b.node, b.bitmap::text AS bitmap, "
              "b.free_count, b.avail_count, b.cooling FROM ipam_blocks b WHERE b.pool_id = :p ORDER BY b.id",
    "cooldowns": "SELECT host(address) AS address, family, owner FROM ipam_cooldowns WHERE pool_id = :p "
                 "ORDER BY address",
    "reservations": "SELECT cidr::text AS cidr FROM ipam_reservations WHERE pool_id = :p ORDER BY cidr",
    "allocations": "SELECT owner, host(ipv4) AS ipv4, host(ipv6) AS ipv6, attributes::text AS attributes, node, "
                   "borrowed FROM ipam_allocations WHERE pool_id = :p ORDER BY owner",
    "events": "SELECT type, owner, host(ipv4) AS ipv4, host(ipv6) AS ipv6 FROM ipam_events WHERE pool_id = :p "
              "ORDER BY id",
    "ranges": "SELECT position, family, cidr::text AS cidr, host(first_ip) AS first, host(last_ip) AS last, "
              "block_prefix, size FROM ipam_ranges WHERE pool_id = :p ORDER BY position",
}


async def _db_state(store: Store, name: str) -> dict[str, Any]:
    """The pool's rows, without ids and timestamps, and fsck's findings (the code of `dsipam fsck`)."""
    out: dict[str, Any] = {"fsck": await store.fsck(name)}
    async with store.engine.connect() as conn:
        pool_id = (await conn.execute(text("SELECT id FROM ipam_pools WHERE name = :n"), {"n": name})).scalar()
        for key, sql in _STATE_SQL.items():
            out[key] = [dict(r) for r in (await conn.execute(text(sql), {"p": pool_id})).mappings().all()]
    return out


def compare_final_state(eng: Engines, lay: Layout) -> None:
    name = lay.name
    both(eng, "final", "GetPool", pb.GetPoolRequest(name=name))
    both(eng, "final", "ListAllocations", pb.ListAllocationsRequest(pool=name, page_size=1000))
    both(eng, "final", "ListBlocks", pb.ListBlocksRequest(pool=name, page_size=1000))
    fast, full = (eng.loop.run_until_complete(_db_state(s.store, name)) for s in eng.sides)  # type: ignore[arg-type]
    assert fast["fsck"] == [], f"fsck of the fast-path database: {fast['fsck']}"
    assert full["fsck"] == [], f"fsck of the full-path database: {full['fsck']}"
    for key in _STATE_SQL:
        if fast[key] != full[key]:
            raise Mismatch(f"final {key} differ\n  fast path: {fast[key]}\n  full path: {full[key]}")
    held = [a for row in fast["allocations"] for a in (row["ipv4"], row["ipv6"]) if a]
    assert len(held) == len(set(held)), f"an address is held twice: {sorted(held)}"


def check_logs(eng: Engines, errors_before: float) -> None:
    """No ERROR line, fast-path error or fallback in either server's log since the example began,
    and the fast server's error counter did not move."""
    for side in eng.sides:
        lines = error_lines(side.server, side.log_from)
        assert not lines, f"{side.name} server ({side.server.log_path}) logged:\n" + "\n".join(lines[:10])
    after = fast_path_errors(eng.fast.server)
    assert after == errors_before, f"dsipam_fast_path_errors_total went from {errors_before:g} to {after:g}"


def run_example(eng: Engines, pool: dict[str, Any], sequence: list[tuple[Any, ...]]) -> None:
    for side in eng.sides:
        assert side.server.proc.poll() is None, f"the {side.name} server died:\n{side.server.log()[-3000:]}"
        side.log_from = len(side.server.log())
    errors_before = fast_path_errors(eng.fast.server)
    eng.examples += 1
    name = f"diff-{eng.examples}-{os.getpid()}"
    first = dict(zip(pool["families"], pool["ranges"], strict=False))
    lay = Layout(name, pool["cooldown"], {f: [(0, _block_of(first[f]))] for f in pool["families"]},
                 {4: 1 if 4 in first else 0, 6: 1 if 6 in first else 0})
    p = pb.Pool(name=name, ranges=[ip_range(f, 0, first[f]) for f in pool["families"]],
                node_affinity=pb.NODE_AFFINITY_STRICT if pool["strict"] else pb.NODE_AFFINITY_BORROW)
    p.cooldown.CopyFrom(duration_pb2.Duration(seconds=pool["cooldown"]))
    created = both(eng, "create", "CreatePool", pb.CreatePoolRequest(pool=p))
    assert created[0] == "OK", created
    try:
        for fam in pool["families"]:
            warm_up(eng, lay, fam, 0, _block_of(first[fam]), "create")
        for i, op in enumerate(sequence):
            run_op(eng, lay, i, op)
        compare_final_state(eng, lay)
    finally:
        both(eng, "delete", "DeletePool", pb.DeletePoolRequest(name=name, force=True))
    check_logs(eng, errors_before)


# -- the test -------------------------------------------------------------------------------------


@settings(max_examples=max(DIFF_EXAMPLES, 1), deadline=None, database=None, print_blob=True,
          phases=tuple(Phase) if DIFF_EXAMPLES else (Phase.explicit,))
@given(pool=pools, sequence=st.lists(ops, min_size=1, max_size=30))
@example(  # exhaustion of a pair, then single families in both orders, a one-family release and GC
    pool={"families": (4, 6), "ranges": ((4, False, None), (8, True, 3)), "cooldown": 0, "strict": False},
    sequence=[("allocate", o, "require", (), (), "", False) for o in OWNERS]
    + [("allocate", "a", "single", (6,), (), "", False), ("allocate", "f", "single", (6,), (), "", False),
       ("allocate", "f", "prefer", (6, 4), (), "", False), ("release", "a", (4,)), ("release", "b", (6,)),
       ("allocate", "b", "require", (6, 4), (), "", True), ("gc", ("a",)), ("get", "a")],
)
@example(  # nodes, strict affinity, cooldown, the last holder taking its address back, reservations
    pool={"families": (6, 4), "ranges": ((4, False, None), (4, False, None)), "cooldown": LONG_COOLDOWN,
          "strict": True},
    sequence=[("allocate", "a", "require", (), (), "n1", False), ("allocate", "b", "prefer", (), (), "n2", False),
              ("release", "a", ()), ("allocate", "c", "single", (4,), ((4, 1),), "", False),
              ("allocate", "a", "require", (), ((4, 1), (6, 0)), "n1", False),
              ("reserve", (((4, 5), False), ((6, 4), True)), True), ("unreserve", (((4, 5), False),)),
              ("release_node", "n2"), ("add_range", 4, (0, True, None)), ("remove_range", 4, 0),
              ("update", 0, False), ("allocate", "d", "require", (), (), "n1", False)],
)
# Found by this test (shrunk by hypothesis): an Allocate naming a node whose pair fails on the fast path
# (dsipam_allocate_batch, migration 0011: IPv4 claims an empty block for the node with dsipam_claim, then IPv6
# has no free address) gives the IPv4 bit back but not the claim, and the function's 'slow' row says nothing
# changed. The full path then answers RESOURCE_EXHAUSTED and rolls back; the fast server keeps the empty block
# affine to the node (ListBlocks: node 'n1', free 1), the full server does not. Under strict affinity another
# node then gets RESOURCE_EXHAUSTED from the fast server and 198.18.0.6 from the full one.
@example(
    pool={"families": (4, 6), "ranges": ((2, False, None), (0, True, 2)), "cooldown": 0, "strict": False},
    sequence=[("fill", "require", (), 6, "n1")],
)
@example(  # the same, seen by a caller: strict affinity, another node then finds no block
    pool={"families": (4, 6), "ranges": ((2, False, None), (0, True, 2)), "cooldown": 0, "strict": True},
    sequence=[("fill", "require", (), 6, "n1"), ("allocate", "g", "single", (4,), (), "n2", False)],
)
@example(  # found by a run of 1,000 examples (2026-12-05): fsck of the fast server's database after a forced
    # reservation of a held address and its unreservation
    pool={"families": (4,), "ranges": ((0, False, None), (0, False, None)), "cooldown": 0, "strict": False},
    sequence=[("allocate", "a", "unspecified", (), (), "", False)] * 4
    + [("reserve", (((4, 1), False),), True), ("unreserve_held", 0)],
)
def test_fast_and_full_path_agree(engines: Engines, pool: dict[str, Any], sequence: list[tuple[Any, ...]]) -> None:
    run_example(engines, pool, sequence)


def test_the_two_servers_run_different_engines(engines: Engines) -> None:
    """The comparison means something only if one server runs the fast path and the other does not:
    only the fast server opens connections named dsipam-fast (store/_fast.py)."""
    run_example(engines, {"families": (4, 6), "ranges": ((0, False, None), (0, False, None)), "cooldown": 0,
                          "strict": False},
                [("allocate", o, "require", (), (), "", False) for o in OWNERS[:3]] + [("release", "a", ())])
    counts = {}
    for side in engines.sides:
        db = side.url.rsplit("/", 1)[1]
        counts[side.name] = int(psql(side.url, "SELECT count(*) FROM pg_stat_activity "
                                               f"WHERE datname = '{db}' AND application_name = 'dsipam-fast'"))
    assert counts["fast"] > 0 and counts["full"] == 0, counts


def test_dsipam_fsck_cli_is_clean_on_both(engines: Engines) -> None:
    """The `dsipam fsck POOL` command itself (the tests above call the same check in process)."""
    name = "diff-cli"
    both(engines, "create", "CreatePool", pb.CreatePoolRequest(pool=pb.Pool(
        name=name, ranges=[ip_range(4, 0, (4, False, None)), ip_range(6, 0, (4, False, None))])))
    try:
        for i, o in enumerate(OWNERS):
            both(engines, f"alloc {o}", "Allocate", pb.AllocateRequest(
                pool=name, owner=o, ip_family_policy=POLICY["require" if i % 2 else "single"]))
        both(engines, "release", "Release", pb.ReleaseRequest(pool=name, owner="a"))
        for side in engines.sides:
            out = subprocess.run([sys.executable, "-m", "dsipam.server", "fsck", name, "--database-url", side.url],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and f"fsck {name}: clean" in out.stdout, (side.name, out.stdout, out.stderr)
    finally:
        both(engines, "delete", "DeletePool", pb.DeletePoolRequest(name=name, force=True))
