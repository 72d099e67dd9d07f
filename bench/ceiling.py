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

# One recorded statement: (connection id, SQL with $n placeholders, parameters, result rows).
Captured = list[tuple[int, str, tuple, list]]

# Statements asyncpg and SQLAlchemy run for themselves (connection reset, type introspection).
_HOUSEKEEPING = re.compile(r"pg_advisory_unlock_all|RESET ALL|UNLISTEN|pg_catalog\.pg_type|pg_catalog\.pg_range|"
                           r"^\s*select pg_catalog\.version\(\)|^\s*SELECT 1\s*$", re.I)


async def _capture(db_url: str, pool: str) -> Captured:
    """Runs the real server in-process (``dsipam.server.app.start``) and records one Allocate.

    Two Allocates of new owners go through gRPC; the statements of the second are captured
    at the asyncpg level (``Connection.execute`` / ``_execute`` and prepared statements), so
    SQLAlchemy's statements and direct asyncpg calls (a fast path, server-side functions)
    are seen alike. Only the connections that touched the recorded owner are kept.
    """
    import grpc
    from asyncpg import connection as pg_connection
    from asyncpg import prepared_stmt

    from dsipam.server.app import start
    from dsipam.server.settings import Settings
    from dsipam.v1 import ipam_pb2 as pb
    from dsipam.v1 import ipam_pb2_grpc

    log: Captured = []
    recording = [False]
    orig_execute = pg_connection.Connection.execute
    orig__execute = pg_connection.Connection._execute
    orig_bind = prepared_stmt.PreparedStatement._PreparedStatement__bind_execute

    async def execute(self, query, *args, timeout=None):  # type: ignore[no-untyped-def]  # noqa: ASYNC109
        result = await orig_execute(self, query, *args, timeout=timeout)
        if recording[0] and not args:
            log.append((id(self), query, (), []))
        return result

    async def _execute(self, query, args, limit, timeout, **kw):  # type: ignore[no-untyped-def]  # noqa: ASYNC109
        result = await orig__execute(self, query, args, limit, timeout, **kw)
        if recording[0]:
            rows = result[0] if kw.get("return_status") else result
            log.append((id(self), query, tuple(args), list(rows or [])))
        return result

    async def bind_execute(self, args, limit, timeout):  # type: ignore[no-untyped-def]  # noqa: ASYNC109
        result = await orig_bind(self, args, limit, timeout)
        if recording[0]:
            rows = result[0] if isinstance(result, tuple) else result
            log.append((id(self._connection), self._query, tuple(args), list(rows or [])))
        return result

    settings = Settings.from_env()
    settings.database_url = db_url
    settings.listen = ["127.0.0.1:0"]
    if hasattr(settings, "insecure"):
        settings.insecure = True
    pg_connection.Connection.execute = execute  # type: ignore[method-assign]
    pg_connection.Connection._execute = _execute  # type: ignore[method-assign]
    prepared_stmt.PreparedStatement._PreparedStatement__bind_execute = bind_execute  # type: ignore[attr-defined]
    running = await start(settings)
    try:
        async with grpc.aio.insecure_channel(running.addresses[0]) as channel:
            stub = ipam_pb2_grpc.IpamServiceStub(channel)
            policy = pb.IP_FAMILY_POLICY_REQUIRE_DUAL_STACK
            await stub.Allocate(pb.AllocateRequest(pool=pool, owner=f"{CAPTURE_OWNER}-warm", ip_family_policy=policy))
            recording[0] = True
            await stub.Allocate(pb.AllocateRequest(pool=pool, owner=CAPTURE_OWNER, ip_family_policy=policy))
            recording[0] = False
    finally:
        recording[0] = False
        pg_connection.Connection.execute = orig_execute  # type: ignore[method-assign]
        pg_connection.Connection._execute = orig__execute  # type: ignore[method-assign]
        prepared_stmt.PreparedStatement._PreparedStatement__bind_execute = orig_bind  # type: ignore[attr-defined]
        await running.stop(0)

    def mentions_owner(value: Any) -> bool:
        if isinstance(value, list | tuple):
            return any(mentions_owner(v) for v in value)
        return isinstance(value, str) and value == CAPTURE_OWNER

    conns = {c for c, sql, args, _ in log if mentions_owner(list(args)) or f"'{CAPTURE_OWNER}'" in sql}
    return [entry for entry in log if entry[0] in conns and not _HOUSEKEEPING.search(entry[1])]


def _literal(value: Any) -> str:
    """A parameter as PostgreSQL's text input (arrays in {…} form)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "{" + ",".join(_element(v) for v in value) + "}"
    return str(value)


def _element(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list | tuple):
        return _literal(value)
    text = _literal(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_address(value: Any) -> bool:
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return False
    return True


def script_from_capture(captured: Captured) -> tuple[str, dict[str, str]]:
    """Turns the recorded statements of one Allocate into a pgbench script of one transaction.

    The owner becomes a random owner per transaction (``ARRAY[:owner]`` where the engine
    passed it in an array); an address an earlier statement returned becomes that
    statement's ``\\gset`` variable; NULL is inlined; anything else is a constant for
    ``pgbench -D``. BEGIN/COMMIT are the engine's own when it sent them; a lone statement
    runs in its own transaction, as it does in the server.
    """
    produced: dict[str, str] = {}
    constants: dict[str, str] = {}
    statements: list[str] = []
    gset: set[int] = set()
    for i, (_, sql, params, rows) in enumerate(captured):
        refs = []
        for k, value in enumerate(params):
            if value == CAPTURE_OWNER:
                refs.append(":owner")
            elif isinstance(value, list | tuple) and list(value) == [CAPTURE_OWNER]:
                refs.append("ARRAY[:owner]")
            elif value is None:
                refs.append("NULL")
            elif isinstance(value, str) and value in produced:
                refs.append(":" + produced[value])
                gset.add(int(produced[value][1:].split("_", 1)[0]))
            else:
                name = f"c{i}_{k + 1}"
                constants[name] = _literal(value)
                refs.append(":" + name)
        statements.append(re.sub(r"\$(\d+)", lambda m, refs=refs: refs[int(m.group(1)) - 1], sql.strip().rstrip(";")))
        if len(rows) == 1:
            for col, value in dict(rows[0]).items():
                if value is not None and _is_address(value) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", col):
                    produced.setdefault(str(value), f"r{i}_{col}")
    lines = [
        "-- Recorded by bench/ceiling.py: the statements one Allocate (REQUIRE_DUAL_STACK, new owner)",
        "-- sent to PostgreSQL from a real dsipam server, in order.",
        "-- Constants (pgbench -D): " + " ".join(f"{k}={v}" for k, v in constants.items()),
        "\\set owner random(1, 9000000000000000000)",
    ]
    for i, sql in enumerate(statements):
        lines.append(sql + (f"\n\\gset r{i}_" if i in gset else ";"))
    lines.append("")
    return "\n".join(lines), constants


def record_script(db_url: str, pool: str = CEILING_POOL) -> tuple[str, dict[str, str], int]:
    """The hot path as the engine runs it now: a pgbench script, its -D constants, its statement count.

    Afterwards the pool is empty again (allocations deleted, every block re-created free).
    """
    captured = asyncio.run(_capture(db_url, pool))
    if not captured:
        raise SystemExit("ceiling: recorded no statement; pass --pgbench-script FILE")
    prepare_ceiling_pool_again(db_url)
    script, constants = script_from_capture(captured)
    work = [c for c in captured if not re.match(r"\s*(BEGIN|COMMIT|START TRANSACTION)", c[1], re.I)]
    return script, constants, len(work)


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
