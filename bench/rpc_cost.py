#!/usr/bin/env python3
"""Cost per call of every unary RPC, against the framework's own cost (the empty call).

One ``dsipam serve`` pinned to one CPU (``--server-cpu``, default 0) and the load generator pinned
to another (``--load-cpu``, default 1); PostgreSQL floats. For each call it reports calls/s,
p50/p99, the server's CPU per call (utime+stime of the server process from ``/proc/PID/stat``)
and PostgreSQL's CPU per call (the same, summed over the database's backends, found in
``pg_stat_activity``), and the ratio of the server's CPU per call to the empty call's
(``grpc.health.v1.Health/Check``). Every run ends with ``dsipam fsck`` of the pools and a check
that no address is held twice.

The load generator is ghz where one is found (``$GHZ``, then ``ghz`` on PATH, then
``../shared/ghz/ghz`` beside the project), else bench/loadgen.py (Python: it measures the calls it
knows, and the table says which generator ran).

  python bench/rpc_cost.py                       # 3 runs, median table
  python bench/rpc_cost.py --runs 1 --calls health,allocate_pair --profile bench/results/profile-cost
  python bench/rpc_cost.py --load-generator python
  python bench/rpc_cost.py --write-docs          # replaces the table in docs/performance.md

Calls (in this order; later ones use the owners of earlier ones):
  health            grpc.health.v1.Health/Check: the empty call
  allocate_pair     Allocate RequireDualStack, new owners p0…
  allocate_single   Allocate with no policy (the API's default: single-stack, the pool's primary family), new owners s0…
  reallocate        Allocate RequireDualStack again for p0… (they hold their pair: the CNI retry path)
  get_allocation    GetAllocation of p0…
  get_pool          GetPool of the pool (exact usage per family)
  list_allocations  ListAllocations, one page of 100
  list_blocks       ListBlocks, one page of 100
  release_family    Release of the IPv6 address only of p0…
  release           Release of s0… (everything they hold)
  gc                GarbageCollect of a pool of 10,000 allocations, all 10,000 owners valid (nothing released)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ghz_load  # noqa: E402
import harness  # noqa: E402
import loadgen  # noqa: E402

ROOT = harness.ROOT
CALLS = (
    "health", "allocate_pair", "allocate_single", "reallocate", "get_allocation", "get_pool",
    "list_allocations", "list_blocks", "release_family", "release", "gc",
)
READS = ("get_allocation", "get_pool", "list_allocations", "list_blocks")
POOL = "cost"
GC_POOL = "costgc"
GC_OWNERS = 10_000
RANGES = ("198.18.0.0/16", "fd00:c057::/112")  # 65,534 usable per family
GC_RANGES = ("198.19.0.0/18", "fd00:c058::/112")
_PROTO = ("--import-paths", f"{ROOT / 'proto'},{ROOT / 'bench/ghz/proto'}")


@dataclass
class Call:
    method: str  # full gRPC method
    proto: str
    data: dict[str, Any] | None  # ghz -d (templated); None: built per run (gc)
    loadgen: dict[str, Any] | None  # loadgen.LoadSpec fields for the Python generator; None: ghz only
    title: str


def calls_table(n: int) -> dict[str, Call]:
    dual = "IP_FAMILY_POLICY_REQUIRE_DUAL_STACK"
    svc = "dsipam.v1.IpamService/"
    ipam = "dsipam/v1/ipam.proto"
    return {
        "health": Call("grpc.health.v1.Health/Check", "grpc/health/v1/health.proto", {},
                       {"call": "health"}, "Health/Check (empty call)"),
        "allocate_pair": Call(svc + "Allocate", ipam,
                              {"pool": POOL, "owner": "p{{.RequestNumber}}", "ip_family_policy": dual},
                              {"call": "allocate", "owner_prefix": "p", "policy": "dual"},
                              "Allocate pair (RequireDualStack), new owners"),
        "allocate_single": Call(svc + "Allocate", ipam, {"pool": POOL, "owner": "s{{.RequestNumber}}"},
                                {"call": "allocate", "owner_prefix": "s", "policy": "single"},
                                "Allocate single-stack (the default policy), new owners"),
        "reallocate": Call(svc + "Allocate", ipam,
                           {"pool": POOL, "owner": "p{{.RequestNumber}}", "ip_family_policy": dual},
                           {"call": "allocate", "owner_prefix": "p", "policy": "dual", "check_unique": False},
                           "Allocate again, owners holding their pair (idempotent)"),
        "get_allocation": Call(svc + "GetAllocation", ipam, {"pool": POOL, "owner": "p{{.RequestNumber}}"}, None,
                               "GetAllocation"),
        "get_pool": Call(svc + "GetPool", ipam, {"name": POOL}, None, "GetPool (exact usage per family)"),
        "list_allocations": Call(svc + "ListAllocations", ipam, {"pool": POOL, "page_size": 100}, None,
                                 "ListAllocations, a page of 100"),
        "list_blocks": Call(svc + "ListBlocks", ipam, {"pool": POOL, "page_size": 100}, None,
                            "ListBlocks, a page of 100"),
        "release_family": Call(svc + "Release", ipam,
                               {"pool": POOL, "owner": "p{{.RequestNumber}}", "ip_families": ["IP_FAMILY_IPV6"]},
                               {"call": "release", "owner_prefix": "p", "release_family": "ipv6"},
                               "Release of one family (IPv6) of a pair"),
        "release": Call(svc + "Release", ipam, {"pool": POOL, "owner": "s{{.RequestNumber}}"},
                        {"call": "release", "owner_prefix": "s"}, "Release (everything the owner holds)"),
        "gc": Call(svc + "GarbageCollect", ipam, None, None,
                   f"GarbageCollect, {GC_OWNERS:,} allocations, all owners valid"),
    }


# -- CPU from /proc -------------------------------------------------------------------------------


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))


_HZ = os.sysconf("SC_CLK_TCK")


def backend_pids(db_url: str) -> list[int]:
    out = harness.psql(db_url, "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                               "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
    return [int(x) for x in out.split()] if out else []


class CpuMeter:
    """CPU seconds of the server process and of the database's backends between start() and stop()."""

    def __init__(self, server_pid: int, db_url: str) -> None:
        self.server_pid, self.db_url = server_pid, db_url

    def start(self) -> None:
        self.s0 = _cpu_ticks(self.server_pid) or 0
        self.b0 = {p: _cpu_ticks(p) or 0 for p in backend_pids(self.db_url)}

    def stop(self) -> tuple[float, float]:
        s1 = _cpu_ticks(self.server_pid) or 0
        b1 = {p: _cpu_ticks(p) for p in set(backend_pids(self.db_url)) | set(self.b0)}
        pg = sum(t - self.b0.get(p, 0) for p, t in b1.items() if t is not None)
        return (s1 - self.s0) / _HZ, pg / _HZ


# -- load generators -------------------------------------------------------------------------------


def run_ghz(ghz: str, target: str, call: Call, n: int, a: argparse.Namespace, data_file: Path | None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [ghz, "--insecure", "--connections", str(a.connections), "-c", str(a.concurrency), "-n", str(n),
               *_PROTO, "--proto", call.proto, "--call", call.method.replace("/", "."),
               "--format", "json", "-o", out.name, "--timeout", "30s"]
        cmd += ["-D", str(data_file)] if data_file else ["-d", json.dumps(call.data)]
        subprocess.run(cmd + [target], check=True, capture_output=True, text=True,
                       preexec_fn=lambda: os.sched_setaffinity(0, {a.load_cpu}))
        rep = json.loads(Path(out.name).read_text())
    lat = {d["percentage"]: d["latency"] / 1e9 for d in rep.get("latencyDistribution") or []}
    codes = rep.get("statusCodeDistribution") or {}
    return {"count": rep["count"], "rps": rep["rps"], "p50": lat.get(50, 0.0), "p99": lat.get(99, 0.0),
            "errors": sum(v for k, v in codes.items() if k != "OK"), "codes": codes,
            "error_distribution": rep.get("errorDistribution") or {}}


def run_python(target: str, call: Call, n: int, a: argparse.Namespace) -> dict[str, Any]:
    assert call.loadgen is not None
    spec = loadgen.LoadSpec(targets=[target], pool=POOL, concurrency=a.concurrency, total=n, processes=1,
                            cpus=(a.load_cpu,), **call.loadgen)
    rep = loadgen.run_load(spec)
    return {"count": rep.count, "rps": rep.rps, "p50": rep.percentile(50), "p99": rep.percentile(99),
            "errors": rep.error_count, "codes": dict(rep.status_codes) if hasattr(rep, "status_codes") else {},
            "error_distribution": {}}


# -- one run ---------------------------------------------------------------------------------------


def gc_data_file(tmp: Path) -> Path:
    owners = [f"g{i}" for i in range(GC_OWNERS)]
    req = {"pool": GC_POOL, "valid_owners": owners, "grace": "0s"}
    path = tmp / "gc.json"
    path.write_text(json.dumps(req))
    return path


def one_run(a: argparse.Namespace, index: int, ghz: str | None) -> dict[str, Any]:
    table = calls_table(a.n)
    results: dict[str, Any] = {}
    env = {"DSIPAM_LOG_LEVEL": "WARNING"}
    with harness.scratch_database() as url, harness.Servers(
        server_url(url, a.db_socket), 1, env=env, cpus=(a.server_cpu,)
    ) as servers, tempfile.TemporaryDirectory() as tmpdir:
        target, pid = servers.targets[0], servers.pids[0]
        harness.create_pool(target, POOL, RANGES)
        harness.create_pool(target, GC_POOL, GC_RANGES)
        warm = calls_table(0)
        # Warm-up (not measured): the server's connections and prepared statements, and the GC pool's owners.
        warm_alloc = Call(warm["allocate_pair"].method, warm["allocate_pair"].proto,
                          {"pool": GC_POOL, "owner": "g{{.RequestNumber}}",
                           "ip_family_policy": "IP_FAMILY_POLICY_REQUIRE_DUAL_STACK"},
                          {"call": "allocate", "owner_prefix": "g", "policy": "dual", "pool": GC_POOL}, "")
        if ghz:
            run_ghz(ghz, target, warm_alloc, GC_OWNERS, a, None)
        else:
            spec = dict(warm_alloc.loadgen or {})
            spec.pop("pool")
            rep = loadgen.run_load(loadgen.LoadSpec(targets=[target], pool=GC_POOL, concurrency=a.concurrency,
                                                    total=GC_OWNERS, processes=1, cpus=(a.load_cpu,), **spec))
            if rep.error_count:
                raise RuntimeError(f"warm-up: {rep.error_count} errors")
        gc_file = gc_data_file(Path(tmpdir))
        meter = CpuMeter(pid, url)
        profiler = None
        analyzed = False
        status_done = False

        def status_phase() -> None:
            # The floor under the figure: the idle server (its background work), and the empty call at the
            # same rate (gRPC's own cost per call when calls arrive one at a time, nothing amortised). Before
            # the releases: the reclaim of their cooldowns is background work that would count here.
            meter.start()
            t0 = time.monotonic()
            time.sleep(a.status_seconds)
            idle_cpu, idle_pg = meter.stop()
            idle_wall = time.monotonic() - t0
            results["idle"] = {"server_core": idle_cpu / idle_wall, "pg_core": idle_pg / idle_wall}
            harness.log(f"  idle server: {results['idle']['server_core']:.3f} of a core, PostgreSQL "
                        f"{results['idle']['pg_core']:.3f}")
            results["status_rate_empty"] = status_at_rate(ghz, target, table["health"], a, meter)
            results["status_rate"] = status_at_rate(ghz, target, table["get_pool"], a, meter)

        for key in a.calls:
            call = table[key]
            if a.status_rate and ghz and not status_done and key in ("release_family", "release", "gc"):
                status_phase()
                status_done = True
            if key in READS and not analyzed:
                # The tables just grew from nothing to tens of thousands of rows: what autovacuum's
                # ANALYZE does within a minute on a live server (docs/performance.md, "Cost per call").
                harness.psql(url, "ANALYZE ipam_allocations, ipam_blocks")
                analyzed = True
            if not ghz and call.loadgen is None:
                results[key] = {"title": call.title, "skipped": "needs ghz (the Python generator lacks this call)"}
                continue
            n = a.gc_n if key == "gc" else a.n
            if a.profile and key in a.profile_calls:
                profiler = _start_profiler(pid, Path(a.profile) / f"run{index}-{key}.txt", a.profile_native)
            meter.start()
            t0 = time.monotonic()
            res = run_ghz(ghz, target, call, n, a, gc_file if key == "gc" else None) if ghz else run_python(
                target, call, n, a)
            wall = time.monotonic() - t0
            server_cpu, pg_cpu = meter.stop()
            if profiler is not None:
                _stop_profiler(profiler)
                profiler = None
            res.update(title=call.title, wall=wall, server_cpu_us=1e6 * server_cpu / res["count"],
                       pg_cpu_us=1e6 * pg_cpu / res["count"])
            results[key] = res
            harness.log(f"run {index} {key}: {res['rps']:,.0f}/s p50 {res['p50'] * 1e3:.2f} ms "
                        f"p99 {res['p99'] * 1e3:.2f} ms server {res['server_cpu_us']:.0f} µs/call "
                        f"PostgreSQL {res['pg_cpu_us']:.0f} µs/call errors {res['errors']}")
        if a.status_rate and ghz and not status_done:
            status_phase()
        checks = [harness.check_pool(url, p) for p in (POOL, GC_POOL)]
        for c in checks:
            harness.log(f"  {c.line()}")
    empty = results.get("health", {}).get("server_cpu_us")
    for res in results.values():
        if empty and "server_cpu_us" in res:
            res["ratio"] = res["server_cpu_us"] / empty
    return {"calls": results, "checks_ok": all(c.ok for c in checks),
            "errors": sum(r.get("errors", 0) for r in results.values())}


def status_at_rate(ghz: str, target: str, call: Call, a: argparse.Namespace, meter: CpuMeter) -> dict[str, Any]:
    """GetPool at a fixed rate (the CNI STATUS of many nodes: 5,000 nodes every 10 s is 500/s): the
    share of a core the server spends on it."""
    n = int(a.status_rate * a.status_seconds)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        meter.start()
        t0 = time.monotonic()
        subprocess.run([ghz, "--insecure", "--connections", "4", "-c", "16", "-n", str(n), "--rps", str(a.status_rate),
                        *_PROTO, "--proto", call.proto, "--call", call.method.replace("/", "."),
                        "-d", json.dumps(call.data), "--format", "json", "-o", out.name, target],
                       check=True, capture_output=True, text=True,
                       preexec_fn=lambda: os.sched_setaffinity(0, {a.load_cpu}))
        wall = time.monotonic() - t0
        server_cpu, pg_cpu = meter.stop()
        rep = json.loads(Path(out.name).read_text())
    codes = rep.get("statusCodeDistribution") or {}
    name = call.method.rsplit("/", 1)[1]
    res = {"title": f"{name} at {a.status_rate:g}/s for {a.status_seconds:g} s", "rps": rep["rps"], "wall": wall,
           "server_core": server_cpu / wall, "pg_core": pg_cpu / wall,
           "errors": sum(v for k, v in codes.items() if k != "OK")}
    harness.log(f"  {name} at {rep['rps']:.0f}/s: server {res['server_core']:.3f} of a core, PostgreSQL "
                f"{res['pg_core']:.3f}, errors {res['errors']}")
    return res


def server_url(url: str, socket_dir: str | None) -> str:
    if not socket_dir:
        return url
    name = url.rsplit("/", 1)[1]
    return f"postgresql://postgres@/{name}?host={socket_dir}"


_PROFILE_RATE = 1000  # samples a second: a few seconds of calls give thousands of samples


def _start_profiler(pid: int, out: Path, native: bool) -> subprocess.Popen:
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), *(["--native"] if native else []), "--idle",
                             "--format", "raw", "--rate", str(_PROFILE_RATE), "--output", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return proc


def _stop_profiler(proc: subprocess.Popen) -> None:
    import signal

    proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)


# -- summary ---------------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in CALLS:
        per = [r["calls"][key] for r in runs if key in r["calls"] and "rps" in r["calls"][key]]
        if not per:
            skipped = [r["calls"][key] for r in runs if key in r["calls"]]
            if skipped:
                out[key] = skipped[0]
            continue
        med = {k: statistics.median(p[k] for p in per) for k in ("rps", "p50", "p99", "server_cpu_us", "pg_cpu_us")}
        if all("ratio" in p for p in per):
            med["ratio"] = statistics.median(p["ratio"] for p in per)
        med["title"] = per[0]["title"]
        med["errors"] = sum(p["errors"] for p in per)
        out[key] = med
    return out


def status_line(runs: list[dict[str, Any]]) -> str:
    per = [r["calls"]["status_rate"] for r in runs if "status_rate" in r["calls"]]
    if not per:
        return ""
    core = statistics.median(p["server_core"] for p in per)
    pg = statistics.median(p["pg_core"] for p in per)
    rps = statistics.median(p["rps"] for p in per)
    return (f"{per[0]['title']} (the CNI STATUS of 5,000 nodes every 10 s): {rps:,.0f} calls/s sustained cost the "
            f"server **{core:.3f} of a core** (median of {len(per)}; runs "
            f"{', '.join(format(p['server_core'], '.3f') for p in per)}) and PostgreSQL {pg:.3f} of a core; "
            f"errors {sum(p['errors'] for p in per)}.{floor_line(runs)}")


def floor_line(runs: list[dict[str, Any]]) -> str:
    """What the GetPool figure stands on: the empty call at the same rate, and the idle server."""
    empty = [r["calls"]["status_rate_empty"]["server_core"] for r in runs if "status_rate_empty" in r["calls"]]
    idle = [r["calls"]["idle"]["server_core"] for r in runs if "idle" in r["calls"]]
    if not empty or not idle:
        return ""
    return (f" At the same rate the empty call (Health/Check) costs the server {statistics.median(empty):.3f} of a "
            f"core (runs {', '.join(format(e, '.3f') for e in empty)}), and the idle server, its background "
            f"work alone, {statistics.median(idle):.3f}.")


def table(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "| call | calls/s | p50 ms | p99 ms | server CPU µs/call | × empty call | PostgreSQL CPU µs/call | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in CALLS:
        r = summary.get(key)
        if r is None:
            continue
        if "rps" not in r:
            lines.append(f"| {r['title']} | – | – | – | – | – | – | {r.get('skipped', '')} |")
            continue
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "–"
        lines.append(f"| {r['title']} | {r['rps']:,.0f} | {r['p50'] * 1e3:.2f} | {r['p99'] * 1e3:.2f} | "
                     f"{r['server_cpu_us']:.0f} | {ratio} | {r['pg_cpu_us']:.0f} | {r['errors']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("-n", type=int, default=20_000, help="calls per RPC (new owners: at most 65,534/2)")
    p.add_argument("--gc-n", type=int, default=300, help="GarbageCollect calls (each carries 10,000 owners)")
    p.add_argument("--calls", default=",".join(CALLS), help=f"comma-separated subset of: {', '.join(CALLS)}")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--connections", type=int, default=4, help="ghz's HTTP/2 connections")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--status-rate", type=int, default=500,
                   help="then GetPool at this rate with ghz (CNI STATUS of 5,000 nodes every 10 s: 500/s; 0: skip)")
    p.add_argument("--status-seconds", type=float, default=20)
    p.add_argument("--db-socket", metavar="DIR", help="servers reach PostgreSQL over the Unix socket in DIR")
    p.add_argument("--load-generator", choices=("auto", "ghz", "python"), default="auto")
    p.add_argument("--profile", metavar="DIR", help="py-spy raw profiles of the --profile-calls into DIR")
    p.add_argument("--profile-calls", default="allocate_pair,allocate_single,get_pool")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too; costs more)")
    p.add_argument("--json", metavar="FILE", help="write every run and the summary as JSON")
    p.add_argument("--write-docs", action="store_true", help="replace the per-call table in docs/performance.md")
    a = p.parse_args(argv)
    a.calls = [c for c in a.calls.split(",") if c]
    unknown = set(a.calls) - set(CALLS)
    if unknown:
        p.error(f"--calls: unknown {', '.join(sorted(unknown))}")
    a.calls = [c for c in CALLS if c in a.calls]
    a.profile_calls = set(a.profile_calls.split(","))
    if a.n * 2 > 65_534 or a.n < a.concurrency:
        p.error("-n: between the concurrency and 32,767 (two sets of new owners share one range)")
    return a


_BEGIN, _END = "<!-- rpc_cost table: begin -->", "<!-- rpc_cost table: end -->"


def update_docs(block: str) -> None:
    path = ROOT / "docs/performance.md"
    text = path.read_text()
    if _BEGIN not in text:
        raise SystemExit(f"docs/performance.md has no {_BEGIN} marker")
    head, rest = text.split(_BEGIN, 1)
    _, tail = rest.split(_END, 1)
    path.write_text(f"{head}{_BEGIN}\n{block}\n{_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    ghz = None if a.load_generator == "python" else ghz_load.find_ghz()
    if a.load_generator == "ghz" and not ghz:
        raise SystemExit("ghz not found: set GHZ, put it on PATH, or keep ../shared/ghz/ghz")
    generator = f"ghz ({ghz})" if ghz else "bench/loadgen.py (Python; no ghz found)"
    harness.log(f"load generator: {generator}")
    runs = [one_run(a, i + 1, ghz) for i in range(a.runs)]
    summary = summarise(runs)
    meta = {"generator": f"ghz {ghz_load.version(ghz)}" if ghz else "bench/loadgen.py", "runs": a.runs, "n": a.n, "concurrency": a.concurrency,
            "connections": a.connections, "server_cpu": a.server_cpu, "load_cpu": a.load_cpu,
            "db_socket": bool(a.db_socket), **harness.machine_info()}
    text = table(summary, meta)
    status = status_line(runs)
    if status:
        text += "\n\n" + status
    print(text)
    ok = all(r["checks_ok"] for r in runs) and not any(r["errors"] for r in runs)
    ok = ok and not any(r["calls"].get("status_rate", {}).get("errors") for r in runs)
    meta["command"] = "python bench/rpc_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {"kind": "rpc-cost", "meta": meta, "runs": runs, "summary": summary}
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1))
    if a.write_docs:
        import plots

        made = plots.rpc_cost(doc, plots.DOC_FIGURES / "rpc-cost.png")
        if made is not None:
            harness.log(f"figure: {made.relative_to(ROOT)}")
        note = (f"Median of {a.runs} run(s); load generator {meta['generator']}, {a.concurrency} calls in flight"
                f"{' over ' + str(a.connections) + ' connections' if ghz else ''}; {a.n:,} calls per RPC "
                f"({a.gc_n} for GarbageCollect); server pinned to CPU {a.server_cpu}, load generator to CPU "
                f"{a.load_cpu}, PostgreSQL floating{', reached over its Unix socket' if a.db_socket else ' over TCP'}. "
                f"Checks: fsck and no duplicate address after every run: {'ok' if ok else 'FAILED'}.")
        update_docs(f"{note}\n\n{text}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
