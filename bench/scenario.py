#!/usr/bin/env python3
"""Set a scenario's pool up for ghz (or any other client), and check it afterwards.

  python bench/scenario.py create s1 s4 s6 --target 127.0.0.1:50051 --database-url URL
  python bench/scenario.py check s1 --expect 20000 --database-url URL

``create`` makes the pools of docs/performance.md through the API (s4 is then filled
to 99% by SQL, which needs the database URL); ``check`` is the correctness check run
after every benchmark run: no address held twice and ``dsipam fsck`` clean, with the
number of allocations compared to ``--expect`` when given. The database URL defaults
to DSIPAM_DATABASE_URL.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ceiling  # noqa: E402
import harness  # noqa: E402
import suite  # noqa: E402

POOLS = {
    "s1": suite.S1_RANGES,
    "s4": suite.S4_RANGES,
    "s6": ("10.0.0.0/8", "fd00:6::/48"),
    "ceiling": ceiling.CEILING_RANGES,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("create", "check"))
    p.add_argument("pools", nargs="+", choices=sorted(POOLS))
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--database-url", default=os.environ.get("DSIPAM_DATABASE_URL", ""))
    p.add_argument("--fill", type=float, default=0.99, help="s4: share allocated by SQL (default 0.99)")
    p.add_argument("--expect", type=int, help="check: the number of allocations there must be")
    a = p.parse_args(argv)
    needs_db = a.action == "check" or "s4" in a.pools or "ceiling" in a.pools
    if needs_db and not a.database_url:
        p.error("--database-url (or DSIPAM_DATABASE_URL) is needed for check, s4 and ceiling")
    ok = True
    for pool in a.pools:
        if a.action == "create":
            harness.create_pool(a.target, pool, POOLS[pool])
            print(f"created pool {pool}: {', '.join(POOLS[pool])}")
            if pool == "s4":
                print(f"filled s4 by SQL: {harness.fill_pool(a.database_url, 's4', a.fill)}")
            if pool == "ceiling":
                harness.prepare_blocks(a.database_url, pool)
                print("created every block of pool ceiling")
        else:
            check = harness.check_pool(a.database_url, pool, a.expect)
            print(check.line())
            if not check.ok:
                print(check.fsck_output)
            ok = ok and check.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
