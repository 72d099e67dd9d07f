#!/usr/bin/env python3
"""The ceilings: how fast could Allocate be on this machine, at the same concurrency?

In one run, on one scratch database and the same server processes, it measures:

1. **allocation**: Allocate (REQUIRE_DUAL_STACK, fresh owners) through the API;
2. **database ceiling**: the SQL of the allocation hot path run by ``pgbench`` with a
   custom script, with as many clients as the API run has requests in flight. The
   script is *recorded*, not written by hand: one Allocate of a new owner is run
   in-process through dsipam's own ``Store``, every statement it sends is captured
   with its parameters, and the statements become one pgbench transaction (owner
   random per transaction, addresses chained with ``\\gset``). So the ceiling follows
   the engine when the engine changes;
3. **framework ceiling**: an empty unary RPC on the same server stack, the standard
   ``grpc.health.v1.Health/Check`` that every dsipam server serves;

then prints the allocation throughput as a ratio to each. The correctness check
(no duplicates, ``dsipam fsck`` clean) runs on both pools afterwards: fsck passing on
the pgbench pool is also the proof that the recorded script allocates as the engine does.

Examples:
  python bench/ceiling.py                       # 64 in flight, 20,000 requests each
  python bench/ceiling.py -c 64 -n 40000 --servers 2 --pgbench-transactions 100000
  python bench/ceiling.py --print-pgbench-script   # record and print the script only
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import loadgen  # noqa: E402

# The pgbench pool, with every block created up front (see docs/performance.md).
CEILING_POOL = "ceiling"
CEILING_RANGES = ("198.18.0.0/15", "fd00:c::/111")
CAPTURE_OWNER = "ceiling-capture"

Captured = list[tuple[str, tuple, list[str], "tuple | None"]]


async def _capture(db_url: str, pool: str) -> tuple[Captured, int]:
    """Runs two Allocates of new owners through the engine's ``Store``; records the statements of the second.

    Per statement: its SQL (``$n`` placeholders), its parameters, its result column names
    and its only result row when it returned exactly one (peeked, not consumed).
    """
    from dsipam.server.domain import Policy
    from dsipam.server.store import Store, create_engine
    from sqlalchemy import event, text

    engine = create_engine(db_url, pool_size=1, max_overflow=0)
    store = Store(engine)
    log: Captured = []
    recording = [False]

    def after(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if recording[0]:
            cols = [d[0] for d in (cursor.description or ())]
            rows = list(getattr(cursor, "_rows", ()) or ())
            log.append((statement, tuple(parameters or ()), cols, tuple(rows[0]) if len(rows) == 1 else None))

    event.listen(engine.sync_engine, "after_cursor_execute", after)
    try:
        kw: dict[str, Any] = {
            "pool": pool, "policy": Policy.REQUIRE_DUAL_STACK, "families": (), "addresses": (), "attributes": {},
        }
        await store.allocate(owner=f"{CAPTURE_OWNER}-warm", **kw)  # loads (and caches) the pool
        recording[0] = True
        await store.allocate(owner=CAPTURE_OWNER, **kw)
        recording[0] = False
        async with engine.connect() as conn:
            pool_id = (await conn.execute(text("SELECT id FROM ipam_pools WHERE name = :n"), {"n": pool})).scalar_one()
    finally:
        await store.close()
    return log, int(pool_id)


def _as_text(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _ref(name: str) -> str:
    return name if name == "NULL" else ":" + name


def _is_address(value: Any) -> bool:
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return False
    return True


def script_from_capture(captured: Captured, pool_id: int) -> tuple[str, dict[str, str]]:
    """Turns the recorded statements of one Allocate into a one-transaction pgbench script.

    A parameter that is the owner becomes a random owner per transaction; an address that
    an earlier statement returned (the addresses taken) becomes that statement's ``\\gset``
    variable; anything else is a constant, returned for ``pgbench -D``.
    """
    produced: dict[str, str] = {}  # value -> variable of the statement that returned it
    constants: dict[str, str] = {}
    statements: list[str] = []
    gset: set[int] = set()
    for i, (sql, params, cols, row) in enumerate(captured):
        names = []
        for k, value in enumerate(params):
            text_value = _as_text(value)
            if isinstance(value, str) and value.startswith(CAPTURE_OWNER):
                names.append("owner")
            elif value is None:
                names.append("NULL")  # pgbench -D cannot say NULL: inline it
            elif text_value in produced and text_value != str(pool_id):
                var = produced[text_value]
                names.append(var)
                gset.add(int(var[1:].split("_", 1)[0]))
            else:
                names.append(f"c{i}_{k + 1}")
                constants[names[-1]] = text_value
        statements.append(re.sub(r"\$(\d+)", lambda m, names=names: _ref(names[int(m.group(1)) - 1]), sql.strip()))
        if row is not None:
            for col, value in zip(cols, row, strict=False):
                if _is_address(value) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", col):
                    produced.setdefault(_as_text(value), f"r{i}_{col}")
    lines = [
        "-- Recorded by bench/ceiling.py: the statements of one Allocate (REQUIRE_DUAL_STACK, new owner)",
        "-- as dsipam's Store ran them, in order, as one transaction.",
        "-- Constants (pgbench -D): " + " ".join(f"{k}={v}" for k, v in constants.items()),
        "\\set owner random(1, 9000000000000000000)",
        "BEGIN;",
    ]
    for i, sql in enumerate(statements):
        lines.append(sql + (f"\n\\gset r{i}_" if i in gset else ";"))
    lines += ["COMMIT;", ""]
    return "\n".join(lines), constants


def record_script(db_url: str, pool: str = CEILING_POOL) -> tuple[str, dict[str, str], int]:
    """The hot path as the engine runs it now: a pgbench script, its -D constants, its statement count."""
    captured, pool_id = asyncio.run(_capture(db_url, pool))
    if not captured:
        raise SystemExit("ceiling: recorded no statement; pass --pgbench-script FILE")
    harness.psql(db_url, f"DELETE FROM ipam_allocations WHERE pool_id = {pool_id} AND owner LIKE '{CAPTURE_OWNER}%'")
    # The two recorded allocations' bits go back too, so that fsck stays exact: re-create the blocks.
    script, constants = script_from_capture(captured, pool_id)
    return script, constants, len(captured)


@dataclass
class PgbenchResult:
    tps: float
    transactions: int
    failed: int
    latency_avg_ms: float
    statements: int
    output: str
    script: str

    def to_json(self) -> dict:
        return {"tps": self.tps, "transactions": self.transactions, "failed": self.failed,
                "latency_avg_ms": self.latency_avg_ms, "statements_per_transaction": self.statements}


def prepare_ceiling_pool(target: str, db_url: str) -> None:
    """Creates pool ``ceiling`` through the API with every block present and empty."""
    harness.create_pool(target, CEILING_POOL, CEILING_RANGES)
    harness.prepare_blocks(db_url, CEILING_POOL)


def prepare_ceiling_pool_again(db_url: str) -> None:
    """Empties pool ``ceiling`` for another pgbench run: no allocations, every block present and free."""
    pool_id = harness.psql(db_url, f"SELECT id FROM ipam_pools WHERE name = '{CEILING_POOL}'")
    harness.psql(db_url, f"DELETE FROM ipam_allocations WHERE pool_id = {pool_id}")
    harness.prepare_blocks(db_url, CEILING_POOL)


def ceiling_capacity() -> int:
    """Pairs the pgbench pool holds (the smaller family)."""
    return min(ipaddress.ip_network(c).num_addresses - 2 for c in CEILING_RANGES)


def run_pgbench(db_url: str, clients: int, transactions: int, script: str | None = None, jobs: int = 2) -> PgbenchResult:
    """Records the hot path (unless ``script`` is given) and runs it with pgbench on pool ``ceiling``."""
    if script is None:
        script, constants, count = record_script(db_url)
        harness.prepare_blocks(db_url, CEILING_POOL)  # empty again, after the two recorded allocations
    else:
        pool_id = harness.psql(db_url, f"SELECT id FROM ipam_pools WHERE name = '{CEILING_POOL}'")
        constants, count = {"pool": pool_id, "name": CEILING_POOL}, script.count(";")
    with tempfile.NamedTemporaryFile("w", suffix=".sql", prefix="dsipam-pgbench-", delete=False) as f:
        f.write(script)
        path = f.name
    per_client = max(math.ceil(transactions / clients), 1)
    cmd = ["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(jobs, clients)), "-t", str(per_client)]
    for k, v in constants.items():
        cmd += ["-D", f"{k}={v}"]
    cmd += ["-f", path, db_url]
    harness.log("pgbench: " + " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    Path(path).unlink(missing_ok=True)
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed ({done.returncode}):\n{out[-3000:]}\nscript:\n{script}")
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    processed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))  # type: ignore[union-attr]
    failed_m = re.search(r"number of failed transactions: (\d+)", out)
    lat_m = re.search(r"latency average = ([\d.]+) ms", out)
    return PgbenchResult(tps, processed, int(failed_m.group(1)) if failed_m else 0,
                         float(lat_m.group(1)) if lat_m else 0.0, count, out, script)


def measure(
    db_url: str, servers: harness.Servers, *, concurrency: int, requests: int, processes: int,
    pgbench_transactions: int, pgbench_script_text: str | None = None, alloc_pool: str = "ceiling-api",
) -> dict:
    """Allocation, pgbench and empty-RPC throughput at one concurrency; figures, ratios and checks."""
    target = servers.targets[0]
    harness.create_pool(target, alloc_pool, ("198.18.0.0/16", "fd00:a::/112"))
    alloc = loadgen.run_load(loadgen.LoadSpec(
        targets=servers.targets, call="allocate", pool=alloc_pool, concurrency=concurrency, total=requests,
        processes=processes, owner_prefix="ceil", name="allocate"))
    empty = loadgen.run_load(loadgen.LoadSpec(
        targets=servers.targets, call="health", concurrency=concurrency, total=requests, processes=processes,
        name="empty RPC (health Check)"))
    prepare_ceiling_pool(target, db_url)
    tx = min(pgbench_transactions, int(ceiling_capacity() * 0.95))
    pg = run_pgbench(db_url, concurrency, tx, pgbench_script_text)
    checks = [harness.check_pool(db_url, alloc_pool, alloc.ok), harness.check_pool(db_url, CEILING_POOL, pg.transactions)]
    return {
        "allocate": alloc.to_json(),
        "empty_rpc": empty.to_json(),
        "pgbench": pg.to_json(),
        "ratio_to_pgbench": alloc.rps / pg.tps if pg.tps else 0.0,
        "ratio_to_empty_rpc": alloc.rps / empty.rps if empty.rps else 0.0,
        "checks": [c.line() for c in checks],
        "checks_ok": all(c.ok for c in checks),
        "_reports": (alloc, empty, pg),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("-n", "--requests", type=int, default=20000, help="API requests per measurement (default 20000)")
    p.add_argument("--pgbench-transactions", type=int, default=100000, help="capped at 95%% of the pool (124,516)")
    p.add_argument("--servers", type=int, default=1, help="dsipam serve processes (default 1)")
    p.add_argument("--processes", type=int, default=2, help="load processes (default 2)")
    p.add_argument("--pgbench-script", help="run this pgbench script instead of the recorded one (-D pool=ID name=ceiling)")
    p.add_argument("--print-pgbench-script", action="store_true", help="record the script, print it and exit")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if args.print_pgbench_script:
        with harness.scratch_database() as url, harness.Servers(url, 1) as servers:
            prepare_ceiling_pool(servers.targets[0], url)
            script, constants, _ = record_script(url)
        print(script)
        return 0
    script = Path(args.pgbench_script).read_text() if args.pgbench_script else None
    with harness.scratch_database() as url, harness.Servers(url, args.servers) as servers:
        res = measure(url, servers, concurrency=args.concurrency, requests=args.requests, processes=args.processes,
                      pgbench_transactions=args.pgbench_transactions, pgbench_script_text=script)
    alloc, empty, pg = res.pop("_reports")
    print(alloc.summary())
    print(empty.summary())
    print(pg.script)
    print("\n".join(line for line in pg.output.splitlines() if "=" in line or "processed" in line))
    print()
    print(f"concurrency {args.concurrency}, {args.servers} server process(es), {args.processes} load process(es)")
    print(f"  Allocate (API)            {alloc.rps:10.1f} pairs/s   p99 {alloc.percentile(99) * 1e3:.1f} ms")
    print(f"  hot-path SQL (pgbench)    {pg.tps:10.1f} tx/s      ratio {res['ratio_to_pgbench']:.2f}"
          f"   ({pg.statements} statements per transaction)")
    print(f"  empty RPC (health Check)  {empty.rps:10.1f} calls/s   ratio {res['ratio_to_empty_rpc']:.2f}")
    for line in res["checks"]:
        print("  " + line)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["checks_ok"] and alloc.error_count == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
