"""Consistency check: block bitmaps must agree exactly with the allocations."""

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
) -> list[str]:
    """Returns one line per problem; an empty list means the pool is consistent.

    ``blocks`` rows have id, range_id, base, bitmap ('0'/'1' text), free_count, avail_count;
    ``allocations`` rows have owner, ipv4, ipv6 (text or None).
    """
    problems: list[str] = []
    by_id = {r.id: r.spec for r in ranges}
    taken: dict[tuple[int, int], str] = {}  # (range id, address) -> owner
    seen_addr: dict[int, str] = {}
    for a in allocations:
        for col in ("ipv4", "ipv6"):
            text = a[col]
            if not text:
                continue
            value = int(ipaddress.ip_address(text))
            if value in seen_addr:
                problems.append(f"{text} is held by both {seen_addr[value]!r} and {a['owner']!r}")
            seen_addr[value] = a["owner"]
            holder = [rid for rid, spec in by_id.items() if spec.family == (4 if col == "ipv4" else 6) and spec.contains(value)]
            if not holder:
                problems.append(f"{text} (owner {a['owner']!r}) lies outside every range")
                continue
            spec = by_id[holder[0]]
            if not spec.is_available(value):
                problems.append(f"{text} (owner {a['owner']!r}) {spec.why_unavailable(value)}")
            taken[(holder[0], value)] = a["owner"]

    covered: set[tuple[int, int]] = set()
    for b in blocks:
        spec = by_id.get(b["range_id"])
        if spec is None:
            problems.append(f"block {b['id']} belongs to no range")
            continue
        base = int(ipaddress.ip_address(b["base"]))
        expected_bits = bytearray(spec.block_mask(base)[0].encode())
        avail = expected_bits.count(b"0")
        for i in range(spec.block_size):
            if (b["range_id"], base + i) in taken:
                covered.add((b["range_id"], base + i))
                if expected_bits[i] == ord("0"):
                    expected_bits[i] = ord("1")
        expected = expected_bits.decode()
        label = spec.block_cidr(base)
        if b["bitmap"] != expected:
            for i, (got, want) in enumerate(zip(b["bitmap"], expected, strict=False)):
                if got != want:
                    addr = spec.address(base + i)
                    what = "marked taken but held by nobody" if got == "1" else "held but not marked taken"
                    problems.append(f"block {label}: {addr} is {what}")
        if b["free_count"] != expected.count("0"):
            problems.append(f"block {label}: free_count {b['free_count']} but {expected.count('0')} bits are free")
        if b["avail_count"] != avail:
            problems.append(f"block {label}: avail_count {b['avail_count']} but {avail} addresses are usable")
    for key, owner in taken.items():
        if key not in covered:
            spec = by_id[key[0]]
            problems.append(f"{spec.address(key[1])} (owner {owner!r}) has no block")
    return problems
