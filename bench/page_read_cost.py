#!/usr/bin/env python3
"""Client CPU of one page read on asyncpg: the statements ListAllocations and ListBlocks run
(``store/_base.py``: the pool's head once, in a first row) against the earlier form that carried
the head's eight columns on every row of the page. Only the process's own CPU (what asyncpg spends
sending, receiving and decoding) is counted; PostgreSQL's is not.

  python bench/page_read_cost.py                 # 300 pairs, pages of 101 rows, 2,000 reads each
  python bench/page_read_cost.py --pages 5000

It fills one pool through the store in a scratch database of its own (bench/harness.py:
``scratch_database``, migrated to head, dropped at the end)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import asyncpg

from dsipam.server.domain import Policy, RangeInput, build_pool_spec
from dsipam.server.store import Store, create_engine
from dsipam.server.store._base import _ALLOCATION_COLUMNS, _HEAD, SQL_READ_BLOCKS, sql_read_allocations

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import scratch_database  # noqa: E402

# The earlier statements (before 2026-12-06, evening): the head on every row.
HEAD_ON_EVERY_ROW = {
    "allocations": f"""
    SELECT {_HEAD}, {_ALLOCATION_COLUMNS}
      FROM ipam_pools p
      LEFT JOIN LATERAL (
        SELECT * FROM ipam_allocations a
         WHERE a.pool_id = p.id AND ($2::text IS NULL OR a.owner > $2) AND a.attributes @> $3::jsonb
         ORDER BY a.owner LIMIT $4) a ON true
     WHERE p.name = $1
     ORDER BY a.owner""",
    "blocks": f"""
    SELECT {_HEAD}, b.id AS block_id, host(b.base) || '/' || masklen(b.base) AS cidr, b.family, b.node AS block_node,
           b.avail_count - b.free_count AS used, b.free_count AS free
      FROM ipam_pools p
      LEFT JOIN LATERAL (
        SELECT * FROM ipam_blocks b
         WHERE b.pool_id = p.id AND ($2 = '' OR b.node = $2) AND b.id > $3
         ORDER BY b.id LIMIT $4) b ON true
     WHERE p.name = $1
     ORDER BY b.id""",
}
SHIPPED = {"allocations": sql_read_allocations(""), "blocks": SQL_READ_BLOCKS}
ARGS = {"allocations": ("p", None, "{}", 101), "blocks": ("p", "", 0, 101)}


async def measure(url: str, pairs: int, pages: int) -> None:
    store = Store(create_engine(url))
    try:
        spec = build_pool_spec("p", [RangeInput("198.18.0.0/20", block_size=8), RangeInput("fd00::/116", block_size=8)],
                               {}, 0)
        await store.create_pool(spec)
        for i in range(pairs):
            await store.allocate(pool="p", owner=f"o{i:05d}", policy=Policy.REQUIRE_DUAL_STACK, families=(),
                                 addresses=(), attributes={"k8s_pod": "x"} if i % 2 else {})
    finally:
        await store.close()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("ANALYZE")
        print(f"{pairs} pairs, {pages} reads of each statement, interleaved twice; client CPU a page")
        for what in ("allocations", "blocks"):
            for _ in range(2):
                for form, sql in (("head on every row", HEAD_ON_EVERY_ROW[what]), ("head once (shipped)", SHIPPED[what])):
                    rows = await conn.fetch(sql, *ARGS[what])
                    cpu = time.process_time()
                    for _ in range(pages):
                        await conn.fetch(sql, *ARGS[what])
                    cpu = (time.process_time() - cpu) / pages * 1e6
                    print(f"  {what:11s} {form:20s} {len(rows):4d} rows  {cpu:6.0f} µs")
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=300)
    args = parser.parse_args()
    with scratch_database("dsipam_bench_pages") as url:
        asyncio.run(measure(url, args.pairs, args.pages))


if __name__ == "__main__":
    main()
