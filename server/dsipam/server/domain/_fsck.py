"""Consistency check: block bitmaps and counters must agree exactly with allocations and cooldowns."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from ._ranges import RangeSpec


class _HasRange(Protocol):
    id: int
    spec: RangeSpec


def check_consistency(
    ranges: Sequence[_HasRange],
    blocks: Iterable[Mapping[str, Any]],
    allocations: Iterable[Mapping[str, Any]],
    cooldowns: Iterable[Mapping[str, Any]] = (),
) -> list[str]:
    """Returns one line per problem; an empty list means the pool is consistent.

    ``blocks`` rows: id, range_id, base, bitmap ('0'/'1' text), free_count, avail_count and cooling;
    ``allocations`` rows: owner, ipv4, ipv6 (text or None); ``cooldowns`` rows: owner, ip, block_id.

    A block's bit is set exactly when its address can never be handed out (per the range and its
    reservations), or is allocated, or is in cooldown. ``avail_count`` counts the addresses usable
    per the range plus the held ones that were reserved while held.
    """
    problems: list[str] = []
    specs = {r.id: r.spec for r in ranges}
    held: dict[tuple[int, int], str] = {}  # (range id, address) -> what holds it
    seen: dict[int, str] = {}

    def place(text: str, what: str, family: int) -> None:
        value = int(ipaddress.ip_address(text))
        if value in seen:
            problems.append(f"{text} is held twice: {seen[value]} and {what}")
            return
        seen[value] = what
        rid = next((i for i, s in specs.items() if s.family == family and s.contains(value)), None)
        if rid is None:
            problems.append(f"{text} ({what}) lies outside every range")
            return
        held[(rid, value)] = what

    for a in allocations:
        for col, fam in (("ipv4", 4), ("ipv6", 6)):
            if a[col]:
                place(a[col], f"owner {a['owner']!r}", fam)
    cooling_by_block: dict[int, int] = {}
    for c in cooldowns:
        place(c["ip"], f"cooldown of {c['owner']!r}", ipaddress.ip_address(c["ip"]).version)
        cooling_by_block[c["block_id"]] = cooling_by_block.get(c["block_id"], 0) + 1

    covered: set[tuple[int, int]] = set()
    for b in blocks:
        spec = specs.get(b["range_id"])
        if spec is None:
            problems.append(f"block {b['id']} belongs to no range")
            continue
        base = int(ipaddress.ip_address(b["base"]))
        label = spec.block_cidr(base)
        expected = bytearray(spec.block_mask(base)[0].encode())
        avail = expected.count(b"0")
        for i in range(spec.block_size):
            key = (b["range_id"], base + i)
            if key in held:
                covered.add(key)
                if expected[i] == ord("0"):
                    expected[i] = ord("1")
                else:
                    avail += 1  # held, and reserved while held (or a reserved-with-force allocation)
        want = expected.decode()
        if b["bitmap"] != want:
            for i, (got, exp) in enumerate(zip(b["bitmap"], want, strict=False)):
                if got != exp:
                    addr = spec.address(base + i)
                    what = "marked taken but held by nobody" if got == "1" else "held but not marked taken"
                    problems.append(f"block {label}: {addr} is {what}")
        if b["free_count"] != want.count("0"):
            problems.append(f"block {label}: free_count {b['free_count']} but {want.count('0')} bits are free")
        if b["avail_count"] != avail:
            problems.append(f"block {label}: avail_count {b['avail_count']} but {avail} addresses are usable")
        if b.get("cooling", 0) != cooling_by_block.get(b["id"], 0):
            problems.append(f"block {label}: cooling {b.get('cooling')} but {cooling_by_block.get(b['id'], 0)} "
                            "addresses are in cooldown")
    for key, what in held.items():
        if key not in covered:
            problems.append(f"{specs[key[0]].address(key[1])} ({what}) has no block")
    return problems
