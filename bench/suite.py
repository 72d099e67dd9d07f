#!/usr/bin/env python3
"""dsipam's performance suite: every scenario of docs/performance.md, N runs each, median table.

Each run starts from nothing: a scratch database (created, migrated, dropped), its own
``dsipam serve`` processes, and the correctness check after every scenario (no address
held twice, by SQL; ``dsipam fsck`` clean; allocation counts as expected).

Scenarios (concurrency 64 unless -c):
  1  Allocate, REQUIRE_DUAL_STACK, fresh owners, pool of a /16 and a /112
     (with, in the same run and at the same concurrency, the two ceilings:
     pgbench running the hot-path SQL, and the empty RPC, grpc.health.v1.Health/Check)
  3  Idempotent re-Allocate of the owners of scenario 1 (the CNI retry path)
  5  Mixed 50/50 Allocate and Release with the population of scenario 1 kept flat
  2  Release of those owners
  8  Allocate, SINGLE_STACK (the API's default policy) into a dual-stack pool: the primary family only
  9  Release of one family (ip_families=[IPV4]) of the owners of scenario 8
  4  Allocate into a pool 99% full (a /15 and a /111 filled by SQL, free addresses scattered)
  6  Scale: a /8 and a /48, N pairs through the API (own database and servers);
     throughput of the last 10% against the first 10%, and bytes on disk per pair
  7  Server RSS: idle, and peak during scenario 1

Example (what produced docs/performance.md):
  python bench/suite.py --runs 3 --update-docs
  python bench/suite.py --runs 1 --scenarios 1 --profile      # plus a py-spy profile of scenario 1
  python bench/suite.py --runs 1 --scenarios 6 --scale-count 1000000   # the full scale run
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ceiling  # noqa: E402
import ghz_load  # noqa: E402
import harness  # noqa: E402
import loadgen  # noqa: E402
from harness import log  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DOC = harness.ROOT / "docs" / "performance.md"
BEGIN_MARK = "<!-- bench:results:begin (written by bench/suite.py --update-docs) -->"
END_MARK = "<!-- bench:results:end -->"

S1_RANGES = ("198.18.0.0/16", "fd00:1::/112")
S4_RANGES = ("198.18.0.0/15", "fd00:4::/111")
S8_RANGES = ("198.19.0.0/16", "fd00:8::/112")
WARMUP_RANGES = ("198.18.0.0/20", "fd00:ff::/116")


def _report_fields(report: loadgen.Report) -> dict[str, Any]:
    j = report.to_json()
    d = j["dsipam"]
    return {
        "count": j["count"],
        "rps": j["rps"],
        "total_s": j["total"] / 1e9,
        "p50_ms": d["p50_ms"],
        "p90_ms": d["p90_ms"],
        "p95_ms": d["p95_ms"],
        "p99_ms": d["p99_ms"],
        "average_ms": j["average"] / 1e6,
        "slowest_ms": j["slowest"] / 1e6,
        "errors": d["errors"],
        "statuses": j["statusCodeDistribution"],
        "error_examples": dict(list(j["errorDistribution"].items())[:3]),
        "created": d["created"],
        "not_created": d["not_created"],
        "duplicates": d["duplicates"],
        "first10_rps": d["first10_rps"],
        "last10_rps": d["last10_rps"],
        "client_cpu_s": d["client_cpu_s"],
        "timeline_per_s": d["timeline_per_s"],
        "latency_cdf": d["latency_cdf"],  # [[percent, ms], ...] for bench/plots.py
    }


def allocation_count(db_url: str, pool: str) -> int:
    """Allocations held in ``pool`` now (how a ghz run's created count is known: ghz reads no answers)."""
    return int(harness.psql(db_url, "SELECT count(*) FROM ipam_allocations a JOIN ipam_pools p ON p.id = a.pool_id "
                                    f"WHERE p.name = '{pool}'") or 0)


class Run:
    """One run of the scenarios; results go into ``self.out``."""

    def __init__(self, args: argparse.Namespace, index: int) -> None:
        self.args = args
        self.index = index
        self.out: dict[str, Any] = {"run": index, "scenarios": {}}

    def spec(self, servers: harness.Servers, call: str, pool: str, total: int, **kw: Any) -> loadgen.LoadSpec:
        return loadgen.LoadSpec(
            targets=servers.targets, call=call, pool=pool, concurrency=self.args.concurrency, total=total,
            processes=self.args.processes, cpus=self.args.load_cpus, **kw,
        )

    def scenario(
        self, key: str, title: str, servers: harness.Servers, spec: loadgen.LoadSpec, db_url: str, pool: str,
        expected: int | None, extra_ok: bool = True, **extra: Any,
    ) -> loadgen.Report:
        log(f"run {self.index} scenario {key}: {title}")
        before = allocation_count(db_url, pool) if spec.call == "allocate" else 0
        with harness.Sampler(servers.pids) as sampler:
            report, generator = self.load(spec)
        if generator != "loadgen" and spec.call == "allocate":  # ghz reads no answers: the database says
            report.created = allocation_count(db_url, pool) - before
            report.not_created = report.ok - report.created
        check = harness.check_pool(db_url, pool, expected)
        log(f"  {report.rps:.1f}/s p99 {report.percentile(99) * 1e3:.1f} ms errors {report.error_count}; {check.line()}")
        res = _report_fields(report)
        res.update(
            title=title,
            check=check.line(),
            check_ok=check.ok and extra_ok and report.error_count == 0 and report.duplicates == 0,
            generator=generator,
            server_cpu_s=sum(sampler.cpu.values()),
            server_cpu_per_request_ms=1e3 * sum(sampler.cpu.values()) / max(report.count, 1),
            machine_busy=sampler.machine_busy_fraction,
            server_peak_rss=max(sampler.peak_rss.values()),
            **extra,
        )
        if not check.ok:
            log("  CHECK FAILED:\n" + check.fsck_output)
        self.out["scenarios"][key] = res
        return report

    def load(self, spec: loadgen.LoadSpec) -> tuple[loadgen.Report, str]:
        """Runs ``spec`` with ghz when the suite has one and ghz can express the call, else with loadgen."""
        if self.args.ghz and ghz_load.supports(spec):
            return ghz_load.run_load(spec, self.args.ghz), "ghz"
        return loadgen.run_load(spec), "loadgen"

    def main_db(self) -> None:
        a = self.args
        env = _server_env(a)
        with harness.scratch_database(keep=a.keep_db) as url, harness.Servers(
            server_url(url, a.db_socket), a.servers, env=env, cpus=a.server_cpus
        ) as servers:
            time.sleep(1.0)
            idle = {pid: harness.rss_bytes(pid)[0] for pid in servers.pids}
            self.warmup(servers)
            target = servers.targets[0]
            n1 = a.s1_count
            wanted = set(a.scenarios)
            s1_rps = None
            if wanted & {1, 2, 3, 5, 7}:
                harness.create_pool(target, "s1", S1_RANGES)
                profiler = _start_profiler(servers, a.profile_dir) if a.profile_dir else None
                rep = self.scenario(
                    "1", "Allocate, REQUIRE_DUAL_STACK, unique owners (/16 + /112)", servers,
                    self.spec(servers, "allocate", "s1", n1, owner_prefix="s1"), url, "s1", n1,
                )
                if profiler is not None:
                    _stop_profiler(profiler)
                s1_rps = rep.rps
                peak = {pid: harness.rss_bytes(pid)[1] for pid in servers.pids}
                self.out["scenarios"]["7"] = {
                    "title": "Server RSS (per process)",
                    "idle_rss_mb": max(idle.values()) / 2**20,
                    "peak_rss_mb": max(peak.values()) / 2**20,
                    "sampled_peak_rss_mb": self.out["scenarios"]["1"]["server_peak_rss"] / 2**20,
                    "check_ok": True,
                }
                if not a.no_ceilings:
                    self.ceilings(url, servers, n1)
            if 3 in wanted:
                self.scenario(
                    "3", "Idempotent re-Allocate of existing owners", servers,
                    self.spec(servers, "allocate", "s1", n1, owner_prefix="s1"), url, "s1", n1,
                )
                created = self.out["scenarios"]["3"]["created"]
                if created:
                    self.out["scenarios"]["3"]["check_ok"] = False
                    log(f"  re-Allocate created {created} new allocations: expected none")
            release_start = 0
            if 5 in wanted:
                m = a.mixed_count
                self.scenario(
                    "5", "Mixed 50/50 Allocate and Release, steady state", servers,
                    self.spec(servers, "mixed", "s1", m, owner_prefix="s1", mixed_base=n1), url, "s1", n1,
                )
                release_start = m // 2
            if 2 in wanted:
                self.scenario(
                    "2", "Release of those owners", servers,
                    self.spec(servers, "release", "s1", n1, owner_prefix="s1", owner_start=release_start),
                    url, "s1", 0,
                )
            if wanted & {8, 9}:
                # The API's default policy (unspecified is single-stack) into a dual-stack pool: the
                # primary family only, half the work of scenario 1. Then a one-family Release of them.
                harness.create_pool(target, "s8", S8_RANGES)
                self.scenario(
                    "8", "Allocate, SINGLE_STACK (the default policy), unique owners", servers,
                    self.spec(servers, "allocate", "s8", n1, owner_prefix="s8", policy="single"), url, "s8", n1,
                )
                if 9 in wanted:
                    self.scenario(
                        "9", "Release of one family (ip_families=[IPV4]) of those owners", servers,
                        self.spec(servers, "release", "s8", n1, owner_prefix="s8", release_family="ipv4"),
                        url, "s8", 0,
                    )
            if 4 in wanted:
                harness.create_pool(target, "s4", S4_RANGES)
                t0 = time.monotonic()
                fill = harness.fill_pool(url, "s4", a.s4_fill, owner_prefix="fill")
                log(f"  s4 filled by SQL in {time.monotonic() - t0:.1f}s: {fill}")
                free = min(fill["free_v4"], fill["free_v6"])
                count = max(int(free * a.s4_allocate_fraction), a.concurrency)
                self.scenario(
                    "4", f"Allocate into a pool {a.s4_fill:.0%} full (/15 + /111)", servers,
                    self.spec(servers, "allocate", "s4", count, owner_prefix="s4"), url, "s4", fill["pairs"] + count,
                    fill=fill,
                )
                if s1_rps:
                    self.out["scenarios"]["4"]["ratio_to_s1"] = self.out["scenarios"]["4"]["rps"] / s1_rps
            sc = self.out["scenarios"]
            if s1_rps and "3" in sc:
                sc["3"]["ratio_to_s1"] = sc["3"]["rps"] / s1_rps
            if s1_rps and "8" in sc:
                sc["8"]["ratio_to_s1"] = sc["8"]["rps"] / s1_rps
            if "2" in sc and "9" in sc:
                sc["9"]["ratio_to_s2"] = sc["9"]["rps"] / sc["2"]["rps"]
            if not servers.alive():
                raise RuntimeError("a server process died during the run")

    def warmup(self, servers: harness.Servers) -> None:
        """Opens the servers' database connections and prepares their statements, in a pool of its own."""
        n = self.args.warmup
        if n <= 0:
            return
        harness.create_pool(servers.targets[0], "warmup", WARMUP_RANGES)
        rep, _ = self.load(self.spec(servers, "allocate", "warmup", max(n, self.args.concurrency), owner_prefix="w"))
        log(f"  warm-up: {rep.count} Allocates into pool warmup at {rep.rps:.0f}/s (not measured)")

    def ceilings(self, url: str, servers: harness.Servers, n1: int) -> None:
        a = self.args
        log(f"run {self.index} ceilings at concurrency {a.concurrency}")
        empty, _ = self.load(self.spec(servers, "health", "", a.ceiling_requests or n1, name="empty RPC"))
        ceiling.prepare_ceiling_pool(servers.targets[0], url)
        tx = min(a.pgbench_transactions, int(ceiling.ceiling_capacity() * 0.95))
        try:
            pg = ceiling.run_pgbench(url, a.concurrency, tx)
        except RuntimeError as exc:  # e.g. too many clients on a shared PostgreSQL: keep the run
            log(f"  pgbench failed, no database ceiling in this run: {str(exc)[:500]}")
            self.out["ceilings"] = {"empty_rpc": _report_fields(empty), "pgbench": {"tps": 0.0, "check_ok": True,
                                                                              "error": str(exc)[:2000]}}
            return
        check = harness.check_pool(url, ceiling.CEILING_POOL, pg.transactions)
        log(f"  empty RPC {empty.rps:.1f}/s; pgbench -c {a.concurrency} {pg.tps:.1f} tx/s; {check.line()}")
        self.out["ceilings"] = {
            "empty_rpc": _report_fields(empty),
            "pgbench": {**pg.to_json(), "check": check.line(), "check_ok": check.ok},
        }
        # For information: the same script with as many clients as the servers have database connections,
        # which is the concurrency the database really sees from the API.
        conns = a.servers * ((a.db_pool_size or 10) + (a.db_max_overflow if a.db_max_overflow is not None else 10))
        if 0 < conns < a.concurrency:
            ceiling.prepare_ceiling_pool_again(url)
            try:
                pg2 = ceiling.run_pgbench(url, conns, tx)
            except RuntimeError as exc:
                log(f"  pgbench -c {conns} failed: {str(exc)[:300]}")
            else:
                check2 = harness.check_pool(url, ceiling.CEILING_POOL, pg2.transactions)
                log(f"  pgbench -c {conns} {pg2.tps:.1f} tx/s; {check2.line()}")
                self.out["ceilings"]["pgbench_db_conns"] = {
                    **pg2.to_json(), "clients": conns, "check": check2.line(), "check_ok": check2.ok,
                }

    def scale(self) -> None:
        a = self.args
        n = a.scale_count
        capacity = min(ipaddress.ip_network(a.scale_v4).num_addresses - 2, ipaddress.ip_network(a.scale_v6).num_addresses - 1)
        if n > capacity:
            raise SystemExit(f"--scale-count {n} is more than the scale pool holds ({capacity})")
        with harness.scratch_database(prefix="dsipam_bench_scale", keep=a.keep_db) as url, harness.Servers(
            server_url(url, a.db_socket), a.servers, env=_server_env(a), cpus=a.server_cpus
        ) as servers:
            self.warmup(servers)
            harness.create_pool(servers.targets[0], "s6", (a.scale_v4, a.scale_v6))
            rep = self.scenario(
                "6", f"Scale: {n:,} pairs into a /{a.scale_v4.split('/')[1]} + /{a.scale_v6.split('/')[1]} pool",
                servers, self.spec(servers, "allocate", "s6", n, owner_prefix="s6"), url, "s6", n,
            )
            size = harness.storage_bytes(url)
            res = self.out["scenarios"]["6"]
            res["storage"] = size
            res["bytes_per_pair"] = size["tables_total"] / n
            res["bytes_per_pair_allocations_blocks"] = size["allocation_tables"] / n
            res["last10_over_first10"] = rep.segment_rps(0.9, 1.0) / max(rep.segment_rps(0.0, 0.1), 1e-9)
            log(f"  storage {size}, {res['bytes_per_pair']:.0f} B/pair, last/first 10% {res['last10_over_first10']:.2f}")

    def go(self) -> dict[str, Any]:
        if set(self.args.scenarios) - {6}:
            self.main_db()
        if 6 in self.args.scenarios:
            self.scale()
        s = self.out["scenarios"]
        c = self.out.get("ceilings")
        if c:
            for res in s.values():
                if "rps" in res:
                    if c["pgbench"]["tps"]:
                        res["ratio_to_pgbench"] = res["rps"] / c["pgbench"]["tps"]
                    if c["empty_rpc"]["rps"]:
                        res["ratio_to_empty_rpc"] = res["rps"] / c["empty_rpc"]["rps"]
        return self.out


def server_url(url: str, socket_dir: str | None) -> str:
    """The servers' database URL: the scratch database over TCP, or over a Unix socket in ``socket_dir``."""
    if not socket_dir:
        return url
    name = url.rsplit("/", 1)[1]
    user = url.split("://", 1)[1].split("@", 1)[0] if "@" in url else "postgres"
    return f"postgresql://{user}@/{name}?host={socket_dir}"


def _server_env(a: argparse.Namespace) -> dict[str, str]:
    env = {}
    if a.db_pool_size is not None:
        env["DSIPAM_DB_POOL_SIZE"] = str(a.db_pool_size)
    if a.db_max_overflow is not None:
        env["DSIPAM_DB_MAX_OVERFLOW"] = str(a.db_max_overflow)
    return env


def _start_profiler(servers: harness.Servers, outdir: str) -> list[tuple[subprocess.Popen, Path]]:
    Path(outdir).mkdir(parents=True, exist_ok=True)
    procs = []
    for pid in servers.pids:
        path = Path(outdir) / f"s1-server-{pid}.txt"
        cmd = [_py_spy(), "record", "--pid", str(pid), "--rate", "100", "--format", "raw", "--native", "--full-filenames",
               "-o", str(path)]
        procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), path))
    time.sleep(1.0)
    return procs


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return found


def _stop_profiler(procs: list[tuple[subprocess.Popen, Path]]) -> None:
    for p, _ in procs:
        p.send_signal(signal.SIGINT)
    for p, path in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
        log(f"  profile written to {path}")


# -- medians and the table ---------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over runs of every numeric figure of every scenario and ceiling."""
    out: dict[str, Any] = {"scenarios": {}, "ceilings": {}}
    keys = sorted({k for r in runs for k in r["scenarios"]}, key=lambda k: int(k))
    for k in keys:
        per = [r["scenarios"][k] for r in runs if k in r["scenarios"]]
        med: dict[str, Any] = {"title": per[0]["title"], "runs": len(per), "all_checks_ok": all(p["check_ok"] for p in per)}
        for field in {f for p in per for f in p}:
            vals = [p[field] for p in per if isinstance(p.get(field), int | float) and not isinstance(p.get(field), bool)]
            if vals:
                med[field] = _median(vals)
        if "rps" in per[0]:
            med["rps_runs"] = [round(p["rps"], 1) for p in per]
        if "errors" in per[0]:
            med["errors_total"] = sum(p["errors"] for p in per)
            med["duplicates_total"] = sum(p["duplicates"] for p in per)
        if "storage" in per[0]:
            med["storage"] = per[-1]["storage"]
        out["scenarios"][k] = med
    ceil = [r["ceilings"] for r in runs if "ceilings" in r]
    if ceil:
        out["ceilings"] = {
            "empty_rpc_rps": _median([c["empty_rpc"]["rps"] for c in ceil]),
            "empty_rpc_runs": [round(c["empty_rpc"]["rps"], 1) for c in ceil],
            "empty_rpc_p99_ms": _median([c["empty_rpc"]["p99_ms"] for c in ceil]),
            "pgbench_tps": _median([c["pgbench"]["tps"] for c in ceil if c["pgbench"]["tps"]]),
            "pgbench_runs": [round(c["pgbench"]["tps"], 1) for c in ceil],
            "pgbench_checks_ok": all(c["pgbench"]["check_ok"] for c in ceil),
        }
        extra = [c["pgbench_db_conns"] for c in ceil if "pgbench_db_conns" in c]
        if extra:
            out["ceilings"]["pgbench_db_conns_tps"] = _median([x["tps"] for x in extra])
            out["ceilings"]["pgbench_db_conns_runs"] = [round(x["tps"], 1) for x in extra]
            out["ceilings"]["pgbench_db_conns_clients"] = extra[0]["clients"]
            out["ceilings"]["pgbench_checks_ok"] &= all(x["check_ok"] for x in extra)
    return out


def _f(v: Any, fmt: str = "{:.0f}") -> str:
    return "–" if v is None or (isinstance(v, float) and v != v) else fmt.format(v)


def table(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    s, c = summary["scenarios"], summary["ceilings"]
    rows = [
        "| # | Scenario | Median throughput (runs) | p50 / p99 ms | Errors / dup. | Check | × pgbench | × empty RPC | Target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    targets = {
        "1": "≥ 2,500/s (stretch 4,000), p99 ≤ 50 ms, ≥ 0.6× empty RPC",
        "2": "–",
        "3": "≥ 1.5× scenario 1",
        "4": "≥ 0.8× scenario 1",
        "5": "–",
        "6": "last 10% ≥ 0.8× first 10%; ≤ 250 B/pair",
        "8": "≥ 1.0× scenario 1 (half the work)",
        "9": "≥ 1.0× scenario 2 (half the work)",
    }
    for k in ("1", "8", "2", "9", "3", "4", "5", "6"):
        if k not in s:
            continue
        m = s[k]
        runs = ", ".join(f"{x:,.0f}" for x in m.get("rps_runs", []))
        extra = ""
        if k in ("3", "4", "8") and "ratio_to_s1" in m:
            extra = f"; {m['ratio_to_s1']:.2f}× s1"
        if k == "9" and "ratio_to_s2" in m:
            extra = f"; {m['ratio_to_s2']:.2f}× s2"
        if k == "6":
            extra = (
                f"; first 10% {m['first10_rps']:,.0f}/s, last 10% {m['last10_rps']:,.0f}/s "
                f"(×{m['last10_over_first10']:.2f}); {m['bytes_per_pair']:.0f} B/pair in all ipam tables, "
                f"{m['bytes_per_pair_allocations_blocks']:.0f} in allocations + blocks"
            )
        rows.append(
            f"| {k} | {m['title']} | **{m['rps']:,.0f}/s** ({runs}){extra} | {m['p50_ms']:.1f} / {m['p99_ms']:.1f} | "
            f"{m['errors_total']} / {m['duplicates_total']} | {'clean' if m['all_checks_ok'] else '**FAILED**'} | "
            f"{_f(m.get('ratio_to_pgbench'), '{:.2f}')} | {_f(m.get('ratio_to_empty_rpc'), '{:.2f}')} | {targets[k]} |"
        )
    if "7" in s:
        m = s["7"]
        rows.append(
            f"| 7 | Server RSS per process | idle **{m['idle_rss_mb']:.0f} MB**, peak in s1 **{m['peak_rss_mb']:.0f} MB** "
            "| – | – | – | – | – | ≤ 200 MB |"
        )
    if c:
        rows += [
            f"| ceiling | Empty unary RPC (health Check), same servers | **{c['empty_rpc_rps']:,.0f}/s** "
            f"({', '.join(f'{x:,.0f}' for x in c['empty_rpc_runs'])}) | – / {c['empty_rpc_p99_ms']:.1f} | – | – | – | 1.00 | – |",
            f"| ceiling | Hot-path SQL through pgbench (-c {meta['concurrency']}) | **{c['pgbench_tps']:,.0f} tx/s** "
            f"({', '.join(f'{x:,.0f}' for x in c['pgbench_runs'])}) | – | – | "
            f"{'clean' if c['pgbench_checks_ok'] else '**FAILED**'} | 1.00 | – | – |",
        ]
        if "pgbench_db_conns_tps" in c:
            rows.append(
                f"| (info) | The same pgbench script with -c {c['pgbench_db_conns_clients']} (the servers' database "
                f"connections) | **{c['pgbench_db_conns_tps']:,.0f} tx/s** "
                f"({', '.join(f'{x:,.0f}' for x in c['pgbench_db_conns_runs'])}) | – | – | – | – | – | – |"
            )
    return "\n".join(rows)


def render(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        BEGIN_MARK,
        f"**Preliminary** — measured {m['date']} on `nproc` = {m['nproc']} ({m['cpu']}, {m['memory']}), "
        f"PostgreSQL {m['postgresql']}, Python {m['python']}, grpcio {m['grpcio']}; load average at start "
        f"{m['loadavg_at_start']}. The machine was shared with other work: expect noise.",
        "",
        f"Median of {meta['runs']} run(s); concurrency {meta['concurrency']}; {meta['servers']} server process(es); "
        f"load generator {_generator_text(meta)}; "
        f"{_pin_text(meta)}servers reach PostgreSQL over "
        f"{'the Unix socket in ' + meta['db_socket'] if meta.get('db_socket') else 'TCP on 127.0.0.1'}; "
        f"{meta.get('warmup', 0):,} unmeasured warm-up Allocates after each server start; scenario 1 count {meta['s1_count']:,}, scenario 6 count "
        f"{meta['scale_count']:,}.",
        "",
        "Command: `" + meta["command"] + "`",
        "",
        table(summary, meta),
        END_MARK,
    ]
    return "\n".join(lines)


def _generator_text(meta: dict[str, Any]) -> str:
    gen = meta.get("generator", "bench/loadgen.py")
    if gen.startswith("ghz"):
        return (f"{gen} (one process per server, 4 HTTP/2 connections; scenario 5's mixed stream, which ghz cannot "
                f"express, by bench/loadgen.py with {meta['processes']} process(es))")
    return f"bench/loadgen.py, {meta['processes']} process(es) (no ghz found)"


def _pin_text(meta: dict[str, Any]) -> str:
    if not meta.get("pin"):
        return "no CPU pinning; "
    return (f"server processes pinned to CPU {meta['pin']['server']}, load processes to CPU {meta['pin']['load']}, "
            "PostgreSQL unpinned; ")


def update_docs(block: str) -> None:
    text = DOC.read_text() if DOC.exists() else ""
    if BEGIN_MARK in text and END_MARK in text:
        head, rest = text.split(BEGIN_MARK, 1)
        _, tail = rest.split(END_MARK, 1)
        DOC.write_text(head + block + tail)
    else:
        raise SystemExit(f"{DOC}: no results markers; add {BEGIN_MARK!r} ... {END_MARK!r} where the table goes")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--scenarios", default="1,2,3,4,5,6,7,8,9", help="comma-separated (default all)")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--servers", type=int, default=1, help="dsipam serve processes, each on its own port (default 1)")
    p.add_argument("--processes", type=int, default=1,
                   help="load-generator processes (default 1: on 2 cores a second one costs more CPU per call)")
    p.add_argument("--pin", action="store_true",
                   help="pin the servers to CPU 0 and the load generator to the other CPUs (PostgreSQL unpinned)")
    p.add_argument("--s1-count", type=int, default=20000, help="Allocate requests in scenario 1 (and 2, 3)")
    p.add_argument("--mixed-count", type=int, default=20000, help="requests in scenario 5")
    p.add_argument("--s4-fill", type=float, default=0.99)
    p.add_argument("--s4-allocate-fraction", type=float, default=0.9, help="share of the free 1%% allocated in s4")
    p.add_argument("--scale-count", type=int, default=100000, help="pairs in scenario 6 (the issue asks 1,000,000)")
    p.add_argument("--scale-v4", default="10.0.0.0/8")
    p.add_argument("--scale-v6", default="fd00:6::/48")
    p.add_argument("--ceiling-requests", type=int, default=0, help="empty RPCs per run (default: the s1 count)")
    p.add_argument("--pgbench-transactions", type=int, default=100000)
    p.add_argument("--no-ceilings", action="store_true")
    p.add_argument("--warmup", type=int, default=2000, help="unmeasured Allocates into a pool of their own first")
    p.add_argument("--db-pool-size", type=int, help="DSIPAM_DB_POOL_SIZE of the servers (default: theirs)")
    p.add_argument("--db-max-overflow", type=int, help="DSIPAM_DB_MAX_OVERFLOW of the servers (default: theirs)")
    p.add_argument("--db-socket", metavar="DIR", help="servers reach PostgreSQL over the Unix socket in DIR, not TCP")
    p.add_argument("--profile", action="store_true", help="one more scenario-1 run under py-spy (not in the medians)")
    p.add_argument("--load-generator", choices=("auto", "ghz", "loadgen"), default="auto",
                   help="auto (default): ghz when one is found ($GHZ, PATH, ../shared/ghz/ghz) for every call it "
                        "can express (all but scenario 5's mixed stream), else bench/loadgen.py")
    p.add_argument("--keep-db", action="store_true", help="keep the scratch databases")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the results block of {DOC.name}")
    a = p.parse_args(argv)
    a.scenarios = sorted({int(x) for x in a.scenarios.split(",") if x.strip()})
    if not set(a.scenarios) <= set(range(1, 10)):
        p.error("--scenarios: numbers from 1 to 9")
    a.profile_dir = None
    a.ghz = None if a.load_generator == "loadgen" else ghz_load.find_ghz()
    if a.load_generator == "ghz" and a.ghz is None:
        p.error("--load-generator ghz: no ghz found ($GHZ, PATH, ../shared/ghz/ghz)")
    a.server_cpus, a.load_cpus = (), ()
    if a.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            p.error("--pin: needs at least 2 CPUs")
        a.server_cpus, a.load_cpus = (cpus[0],), tuple(cpus[1:])
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    meta = {
        "command": "python bench/suite.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "runs": a.runs,
        "concurrency": a.concurrency,
        "servers": a.servers,
        "processes": a.processes,
        "generator": f"ghz {ghz_load.version(a.ghz)}" if a.ghz else "bench/loadgen.py",
        "db_socket": a.db_socket,
        "pin": {"server": ",".join(map(str, a.server_cpus)), "load": ",".join(map(str, a.load_cpus))} if a.pin else None,
        "warmup": a.warmup,
        "s1_count": a.s1_count,
        "mixed_count": a.mixed_count,
        "scale_count": a.scale_count,
        "scenarios": a.scenarios,
        "machine": harness.machine_info(),
    }
    log(f"machine: {meta['machine']}")
    runs = []
    for i in range(1, a.runs + 1):
        runs.append(Run(a, i).go())
    summary = summarise(runs)
    if a.profile:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        a.profile_dir = str(RESULTS / f"profile-{stamp}")
        b = argparse.Namespace(**{**vars(a), "scenarios": [1], "no_ceilings": True})
        prof = Run(b, 0).go()
        summary["profiled_run"] = prof["scenarios"].get("1", {})
        for path in Path(a.profile_dir).glob("*.txt"):
            subprocess.run([sys.executable, str(Path(__file__).parent / "profile_summary.py"), str(path)], check=False)
    block = render(summary, meta)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{a.tag}" if a.tag else "")
    (RESULTS / f"{stamp}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    (RESULTS / f"{stamp}.md").write_text(block + "\n")
    print(block)
    log(f"results in {RESULTS / stamp}.json and .md")
    if a.update_docs:
        update_docs(block)
        log(f"updated {DOC}")
    # Figures (bench/plots.py): next to the results, and into docs/img/performance/ with --update-docs.
    import plots  # matplotlib only once a run is done

    plots.after_suite({"meta": meta, "summary": summary, "runs": runs}, RESULTS / stamp, update_docs=a.update_docs)
    ok = all(m.get("all_checks_ok", True) for m in summary["scenarios"].values())
    ok = ok and summary.get("ceilings", {}).get("pgbench_checks_ok", True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
