#!/usr/bin/env python3
"""Client CPU of one statement taken through a connection pool: a held connection (no pool),
asyncpg's ``Pool`` configured as the fast path had it (no reset on release), and the fast path's
own ``ConnectionPool`` (store/_conns.py). Each statement is run alone, one after another, as a
lone caller's read or batch is; only this process's CPU is counted (``time.process_time``).

  python bench/pool_cost.py                  # 5,000 statements a form, 3 rounds
  python bench/pool_cost.py --statements 20000 --rounds 5

It reads nothing of dsipam's: the statement is ``SELECT $1::text, 1`` on the admin database
(DSIPAM_BENCH_ADMIN_URL, default postgresql://postgres@127.0.0.1:5432/postgres)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import uvloop

from dsipam.server.store._conns import ConnectionPool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ADMIN_URL  # noqa: E402

SQL = "SELECT $1::text AS a, 1 AS b"


async def _no_reset(conn: asyncpg.Connection) -> None:
    return None


async def measure(url: str, statements: int, rounds: int) -> None:
    held = await asyncpg.connect(url)
    apg = await asyncpg.create_pool(url, min_size=1, max_size=4, reset=_no_reset)
    own = ConnectionPool(lambda: asyncpg.connect(url), 4)

    async def through_own() -> None:
        conn = await own.acquire()
        try:
            await conn.fetch(SQL, "x")
        finally:
            own.release(conn)

    async def through_asyncpg() -> None:
        async with apg.acquire() as conn:
            await conn.fetch(SQL, "x")

    forms: dict[str, Callable[[], Awaitable[object]]] = {
        "held connection (no pool)": lambda: held.fetch(SQL, "x"),
        "asyncpg Pool (reset=no-op)": through_asyncpg,
        "ConnectionPool (store/_conns.py)": through_own,
    }
    results: dict[str, list[float]] = {k: [] for k in forms}
    try:
        for _ in range(rounds):
            for label, run in forms.items():
                for _ in range(200):  # warm: connections, prepared statement
                    await run()
                cpu = time.process_time()
                for _ in range(statements):
                    await run()
                results[label].append((time.process_time() - cpu) / statements * 1e6)
    finally:
        await own.close()
        await apg.close()
        await held.close()
    print(f"client CPU per statement, µs ({rounds} rounds of {statements:,}; median, then each round)")
    for label, runs in results.items():
        print(f"  {label:34s} {sorted(runs)[len(runs) // 2]:6.1f}   ({', '.join(f'{r:.1f}' for r in runs)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--statements", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--admin-url", default=ADMIN_URL)
    a = p.parse_args()
    uvloop.install()
    asyncio.run(measure(a.admin_url, a.statements, a.rounds))


if __name__ == "__main__":
    main()
