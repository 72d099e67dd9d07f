#!/usr/bin/env python3
"""Allocate throughput and latency against how full the pool is: the fill curve.

For each fill level, a fresh pool (a /16 and a /112 by default, 65,534 pairs, in a network of
its own) is filled by SQL to that level as scenario 4 of bench/suite.py does
(bench/harness.py: fill_pool: every block created, the allocated addresses chosen at random so
that the free ones are scattered, as after churn), then ``--count`` REQUIRE_DUAL_STACK
Allocates (at most 90% of what is free) run through the API at concurrency ``-c``, and the
correctness check of the suite runs (no address twice, fsck clean, the expected count). Level 0
is a pool without a fill: its blocks are created as the allocations need them. The pool is then
deleted and the next level gets a new one, on the same server and database.

    .venv/bin/python bench/fill_curve.py [--levels 0,0.5,0.75,0.9,0.95,0.99] [--count 3000] [--pin]
                                         [--db-socket DIR] [--update-docs]

It writes bench/results/<time>-fill-curve.json, the table (printed, and with ``--update-docs``
into docs/performance.md between its markers) and the figure (bench/plots.py: fill-curve.png
next to the JSON, and into docs/img/performance/ with ``--update-docs``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import loadgen  # noqa: E402
import plots  # noqa: E402
from harness import log  # noqa: E402
from suite import DOC, RESULTS, server_url  # noqa: E402

BEGIN_MARK = "<!-- bench:fill-curve:begin (written by bench/fill_curve.py --update-docs) -->"
END_MARK = "<!-- bench:fill-curve:end -->"


def run_level(a: argparse.Namespace, servers: harness.Servers, url: str, index: int, fill: float) -> dict[str, Any]:
    name = f"fill{index}"
    target = servers.targets[0]
    harness.create_pool(target, name, (a.v4, a.v6))
    if fill > 0:
        t0 = time.monotonic()
        filled = harness.fill_pool(url, name, fill, owner_prefix=f"{name}-fill")
        log(f"  {name}: filled to {fill:.1%} by SQL in {time.monotonic() - t0:.1f}s: {filled}")
        pairs, free = filled["pairs"], min(filled["free_v4"], filled["free_v6"])
    else:
        import ipaddress

        pairs = 0
        free = min(ipaddress.ip_network(a.v4).num_addresses - 2, ipaddress.ip_network(a.v6).num_addresses - 1)
    count = max(min(a.count, int(free * 0.9)), a.concurrency)
    spec = loadgen.LoadSpec(targets=servers.targets, call="allocate", pool=name, concurrency=a.concurrency,
                            total=count, processes=1, cpus=a.load_cpus, owner_prefix=name)
    report = loadgen.run_load(spec)
    check = harness.check_pool(url, name, pairs + count)
    log(f"  fill {fill:.1%}: {count} Allocates {report.rps:.0f}/s p50 {report.percentile(50) * 1e3:.1f} ms "
        f"p99 {report.percentile(99) * 1e3:.1f} ms errors {report.error_count}; {check.line()}")
    import grpc

    from dsipam.v1 import ipam_pb2 as pb
    from dsipam.v1 import ipam_pb2_grpc

    with grpc.insecure_channel(target) as ch:  # the next level gets a pool of its own
        ipam_pb2_grpc.IpamServiceStub(ch).DeletePool(pb.DeletePoolRequest(name=name, force=True), timeout=120)
    return {"fill": fill, "fill_pairs": pairs, "free_before": free, "count": count, "rps": report.rps,
            "p50_ms": report.percentile(50) * 1e3, "p99_ms": report.percentile(99) * 1e3,
            "errors": report.error_count, "duplicates": report.duplicates, "check": check.line(),
            "check_ok": check.ok and report.error_count == 0 and report.duplicates == 0}


def table(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    m = meta["machine"]
    rows = [
        BEGIN_MARK,
        f"Measured {m['date']} on `nproc` = {m['nproc']} ({m['cpu']}, {m['memory']}), PostgreSQL "
        f"{m['postgresql']}, Python {m['python']}; load average at start {m['loadavg_at_start']}. Pool "
        f"{meta['ranges'][0]} + {meta['ranges'][1]}, concurrency {meta['concurrency']}, "
        f"{'servers pinned to CPU ' + meta['pin'] + ', ' if meta.get('pin') else ''}"
        f"PostgreSQL over {'the Unix socket in ' + meta['db_socket'] if meta.get('db_socket') else 'TCP'}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| Fill before | Free pairs | Allocates | Throughput | p50 / p99 ms | Errors / dup. | Check |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in doc["levels"]:
        rows.append(f"| {lv['fill']:.0%} | {lv['free_before']:,} | {lv['count']:,} | **{lv['rps']:,.0f}/s** | "
                    f"{lv['p50_ms']:.1f} / {lv['p99_ms']:.1f} | {lv['errors']} / {lv['duplicates']} | "
                    f"{'clean' if lv['check_ok'] else '**FAILED**'} |")
    rows.append(END_MARK)
    return "\n".join(rows)


def update_docs(block: str) -> None:
    text = DOC.read_text()
    if BEGIN_MARK not in text or END_MARK not in text:
        raise SystemExit(f"{DOC}: no fill-curve markers; add {BEGIN_MARK!r} ... {END_MARK!r} where the table goes")
    head, rest = text.split(BEGIN_MARK, 1)
    DOC.write_text(head + block + rest.split(END_MARK, 1)[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="0,0.5,0.75,0.9,0.95,0.99", help="fill fractions before each run")
    p.add_argument("--count", type=int, default=3000, help="Allocates per level (at most 90%% of the free pairs)")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--v4", default="198.18.0.0/16")
    p.add_argument("--v6", default="fd00:f::/112")
    p.add_argument("--warmup", type=int, default=2000, help="unmeasured Allocates into a pool of their own first")
    p.add_argument("--pin", action="store_true", help="server on CPU 0, load generator on the others")
    p.add_argument("--db-socket", metavar="DIR", help="the server reaches PostgreSQL over the Unix socket in DIR")
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the fill-curve block of {DOC.name}")
    a = p.parse_args(argv)
    levels = [float(x) for x in a.levels.split(",") if x.strip()]
    if not levels or any(not 0 <= f < 1 for f in levels):
        p.error("--levels: fractions from 0 to below 1")
    a.server_cpus, a.load_cpus = (), ()
    if a.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            p.error("--pin: needs at least 2 CPUs")
        a.server_cpus, a.load_cpus = (cpus[0],), tuple(cpus[1:])
    meta = {"command": "python bench/fill_curve.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "ranges": [a.v4, a.v6], "concurrency": a.concurrency, "count": a.count, "db_socket": a.db_socket,
            "pin": ",".join(map(str, a.server_cpus)) if a.pin else None, "machine": harness.machine_info()}
    log(f"machine: {meta['machine']}")
    out: list[dict[str, Any]] = []
    with harness.scratch_database(prefix="dsipam_bench_fill") as url, harness.Servers(
        server_url(url, a.db_socket), 1, cpus=a.server_cpus
    ) as servers:
        if a.warmup > 0:
            harness.create_pool(servers.targets[0], "warmup", ("198.19.0.0/20", "fd00:ff::/116"))
            loadgen.run_load(loadgen.LoadSpec(targets=servers.targets, pool="warmup", concurrency=a.concurrency,
                                              total=max(a.warmup, a.concurrency), processes=1, cpus=a.load_cpus,
                                              owner_prefix="w"))
        for i, fill in enumerate(levels):
            out.append(run_level(a, servers, url, i, fill))
        if not servers.alive():
            raise RuntimeError("the server died during the run")
    doc = {"kind": "fill-curve", "meta": meta, "levels": out}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / (time.strftime("%Y%m%d-%H%M%S") + "-fill-curve")
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    block = table(doc)
    print(block)
    figures = [plots.fill_curve(doc, stem.parent / (stem.name + ".png"))]
    if a.update_docs:
        update_docs(block)
        figures.append(plots.fill_curve(doc, plots.DOC_FIGURES / "fill-curve.png"))
        log(f"updated {DOC}")
    log(f"results in {stem}.json; figures {', '.join(map(str, figures))}")
    return 0 if all(lv["check_ok"] for lv in out) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
