#!/usr/bin/env python3
"""CPU of a lone GetPool and GetAllocation through the store (no gRPC), with the shared read's two
forms interleaved in one process: a lone caller reading in its own task (``FastPath._read_alone``,
2026-12-06) against every read sent by a drain task the caller waits for (the earlier form,
copied below). Interleaving in one process pairs each round of one form with a round of the
other, so the host's drift (±30% between processes here) falls out of the difference.

  python bench/lone_read_cost.py                 # 12 rounds of 2,000 calls of each
  python bench/lone_read_cost.py --rounds 20 --calls 5000

A scratch database of its own (bench/harness.py ``scratch_database``), one dual-stack pool with 50
pairs; the process's own CPU (``time.process_time``)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from dsipam.server.domain import Policy, RangeInput, build_pool_spec
from dsipam.server.store import Store, create_engine
from dsipam.server.store._fast import FastPath, _ReadQueue

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import scratch_database  # noqa: E402

NEW = FastPath.fetch_shared


async def drain_task_always(self: FastPath, sql: str, name: str, item: Any = None, *, items: bool = False,
                            single_sql: str | None = None) -> list[Any]:
    """FastPath.fetch_shared before 2026-12-06, night: a drain task even for a lone caller."""
    key = (sql, name, items)
    queue = self._reads.get(key)
    if queue is None:
        queue = self._reads[key] = _ReadQueue(single_sql=single_sql)
    caller: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
    queue.waiting.append((item, caller))
    if queue.inflight < self.max_inflight:
        queue.inflight += 1
        asyncio.get_running_loop().create_task(self._drain_reads(key, queue))
    return await caller


async def measure(url: str, rounds: int, calls: int) -> None:
    store = Store(create_engine(url))
    store.fast = FastPath(url)
    try:
        await store.create_pool(build_pool_spec("p", [RangeInput("198.18.0.0/20"), RangeInput("fd00::/116")], {}, 0))
        for i in range(50):
            await store.allocate(pool="p", owner=f"o{i}", policy=Policy.REQUIRE_DUAL_STACK, families=(),
                                 addresses=(), attributes={})
        runs = {"get_pool": lambda: store.get_pool("p"),
                "get_allocation": lambda: store.get_allocation(pool="p", owner="o7")}
        forms = {"own task (now)": NEW, "drain task (before)": drain_task_always}
        got: dict[tuple[str, str], list[float]] = {}
        for rnd in range(rounds):
            order = list(forms.items()) if rnd % 2 == 0 else list(reversed(forms.items()))
            for label, impl in order:
                FastPath.fetch_shared = impl  # type: ignore[method-assign]
                for name, run in runs.items():
                    for _ in range(100):
                        await run()
                    cpu = time.process_time()
                    for _ in range(calls):
                        await run()
                    got.setdefault((name, label), []).append((time.process_time() - cpu) / calls * 1e6)
        FastPath.fetch_shared = NEW  # type: ignore[method-assign]
        print(f"µs of CPU a lone call ({rounds} interleaved rounds of {calls:,}; medians)")
        for name in runs:
            now, before = got[(name, "own task (now)")], got[(name, "drain task (before)")]
            saved = [b - n for b, n in zip(before, now, strict=True)]
            print(f"  {name:15s} drain task {statistics.median(before):6.1f}   own task {statistics.median(now):6.1f}   "
                  f"saved, paired by round: median {statistics.median(saved):.1f} (range {min(saved):.1f} to {max(saved):.1f})")
    finally:
        await store.fast.close()
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--calls", type=int, default=2000)
    a = p.parse_args()
    uvloop.install()
    with scratch_database("dsipam_bench_lone") as url:
        asyncio.run(measure(url, a.rounds, a.calls))


if __name__ == "__main__":
    main()
