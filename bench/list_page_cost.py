#!/usr/bin/env python3
"""In-process cost of one ListAllocations page: the store's rows into AllocationInfo
(``read_allocation``) and those into the answer (``convert.fill_allocation``), timed with timeit.

  python bench/list_page_cost.py          # a page of 100 dual-stack rows, half with one attribute

No server or database: the rows are what asyncpg hands the store (PostgreSQL's text of each
address, the attributes as JSON text)."""

from __future__ import annotations

import datetime as dt
import timeit

from dsipam.server.domain import build_range
from dsipam.server.rpc import convert
from dsipam.server.store._base import StoredPool, StoredRange, read_allocation
from dsipam.v1 import ipam_pb2 as pb


def main() -> None:
    ranges = [build_range(cidr="198.18.0.0/16", gateway="198.18.0.1"), build_range(cidr="fd00:1::/112")]
    pool = StoredPool(1, "p", {}, dt.datetime.now(dt.UTC), 0, 1,
                      tuple(StoredRange(i + 1, r, r.size) for i, r in enumerate(ranges)), ())
    now = dt.datetime.now(dt.UTC)
    rows = [{"ipv4": f"198.18.{i // 250}.{i % 250 + 2}", "ipv6": f"fd00:1::{i + 16:x}", "owner": f"ns/pod-{i}",
             "attributes": '{"k8s_pod": "x"}' if i % 2 else "{}", "allocation_time": now,
             "allocation_node": "node-1", "borrowed": False} for i in range(100)]
    infos = [read_allocation(pool, r) for r in rows]

    def read() -> None:
        for r in rows:
            read_allocation(pool, r)

    def fill() -> None:
        add = pb.ListAllocationsResponse().allocations.add
        for a in infos:
            convert.fill_allocation(add(), a)

    def page() -> bytes:
        response = pb.ListAllocationsResponse()
        add = response.allocations.add
        for r in rows:
            convert.fill_allocation(add(), read_allocation(pool, r))
        return response.SerializeToString()

    for name, f in (("read_allocation x100", read), ("fill_allocation x100", fill), ("page: both + serialise", page)):
        t = min(timeit.repeat(f, number=300, repeat=5)) / 300
        print(f"{name:26s} {t * 1e6:7.0f} µs a page of 100")


if __name__ == "__main__":
    main()
