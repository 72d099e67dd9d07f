#!/usr/bin/env python3
"""dsipam's load driver: multi-process, asyncio, fixed concurrency, a count or a duration.

It stands in for ghz, which cannot be installed here, and prints the same summary
(count, total, slowest, fastest, average, requests/sec, latency distribution,
status-code and error distributions); ``--json`` writes ghz's JSON report shape
with a ``dsipam`` section added (created count, client-side duplicate check,
first/last 10% throughput, a per-second timeline, client CPU).

Every request takes a number ``n`` from one counter shared by all processes, so
owners are ``{prefix}-{start + n}`` exactly as ghz's ``{{.RequestNumber}}`` would
give, with no gaps: a run of N allocations followed by a run of N releases with the
same prefix touches the same owners.

Calls:
  allocate   Allocate (REQUIRE_DUAL_STACK by default) for owner n: new owners, or the
             idempotent re-Allocate path when the owners already hold addresses.
  release    Release owner n.
  mixed      Even n allocates owner (base + n/2), odd n releases owner n/2: with
             ``--mixed-base`` live owners already there, the population stays flat.
  health     grpc.health.v1.Health/Check on the same server: the empty-RPC ceiling.

Examples:
  python bench/loadgen.py --target 127.0.0.1:50051 --call allocate --pool s1 -c 64 -n 20000
  python bench/loadgen.py --target 127.0.0.1:50051 --call health -c 64 -z 10s --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

CALLS = ("allocate", "release", "mixed", "health")
POLICIES = {"single": 1, "prefer": 2, "dual": 3}
FAMILIES = {"": (), "ipv4": (1,), "ipv6": (2,)}  # ReleaseRequest.ip_families
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
# Where the latency CDF is sampled (percent of requests): every percent, then the tail finer.
CDF_PERCENTS = (0.1, 0.5, *range(1, 100), 99.25, 99.5, 99.75, 99.9, 99.95, 99.99, 100)

_ALLOCATE = "/dsipam.v1.IpamService/Allocate"
_RELEASE = "/dsipam.v1.IpamService/Release"
_HEALTH = "/grpc.health.v1.Health/Check"


@dataclass
class LoadSpec:
    """What one load run does."""

    targets: list[str]
    call: str = "allocate"
    pool: str = "bench"
    concurrency: int = 64
    total: int = 0  # 0: run for ``duration``
    duration: float = 0.0  # seconds; 0: run ``total`` requests
    processes: int = 2
    owner_prefix: str = "bench"
    owner_start: int = 0
    mixed_base: int = 0
    policy: str = "dual"
    release_family: str = ""  # release: "ipv4" or "ipv6" releases only that family ("": everything)
    nodes: int = 0  # >0: Allocate names node "node-{n % nodes}" (node-affine blocks)
    timeout: float = 20.0
    check_unique: bool = True
    name: str = ""
    cpus: tuple[int, ...] = ()  # pin the load processes to these CPUs (empty: no pinning)

    def validate(self) -> None:
        if not self.targets:
            raise ValueError("targets: at least one host:port")
        if self.call not in CALLS:
            raise ValueError(f"call: {self.call!r} is not one of {', '.join(CALLS)}")
        if self.concurrency < 1:
            raise ValueError("concurrency: must be at least 1")
        if (self.total > 0) == (self.duration > 0):
            raise ValueError("total/duration: give exactly one of a request count or a duration")
        if self.total and self.total < self.concurrency:
            raise ValueError("total: must be at least the concurrency (as in ghz)")
        if self.processes < 1:
            raise ValueError("processes: must be at least 1")
        self.processes = min(self.processes, self.concurrency)
        if self.release_family not in FAMILIES:
            raise ValueError(f"release_family: {self.release_family!r} is not one of {', '.join(FAMILIES)}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.call == "mixed" and self.mixed_base < 1:
            raise ValueError("mixed_base: the mixed call needs the number of owners already allocated")


@dataclass
class Report:
    """The merged result of a run, in ghz's vocabulary (seconds here; ghz's JSON uses nanoseconds)."""

    spec: LoadSpec
    total_time: float
    latencies: list[float]
    ends: list[float]
    start: float
    statuses: Counter[str]
    errors: Counter[str]
    created: int = 0
    not_created: int = 0
    addresses: int = 0
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    client_cpu: float = 0.0

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.count / self.total_time if self.total_time > 0 else 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get("OK", 0)

    @property
    def error_count(self) -> int:
        return self.count - self.ok

    def percentile(self, p: float) -> float:
        return _percentile(sorted(self.latencies), p)

    def segment_rps(self, lo: float, hi: float) -> float:
        """Throughput over the requests that completed between the lo and hi fractions of the count."""
        ends = sorted(self.ends)
        if len(ends) < 20:
            return 0.0
        i, j = int(lo * len(ends)), max(int(hi * len(ends)) - 1, 0)
        t0 = self.start if i == 0 else ends[i - 1]
        span = ends[j] - t0
        return (j - i + 1) / span if span > 0 else 0.0

    def timeline(self) -> list[int]:
        """Completions per whole second since the start."""
        if not self.ends:
            return []
        buckets = [0] * (int(max(self.ends) - self.start) + 1)
        for e in self.ends:
            buckets[max(int(e - self.start), 0)] += 1
        return buckets

    def to_json(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        ns = 1e9
        return {
            "name": self.spec.name or self.spec.call,
            "endReason": "normal",
            "options": {
                "call": self.spec.call,
                "host": ",".join(self.spec.targets),
                "concurrency": self.spec.concurrency,
                "total": self.spec.total,
                "duration": self.spec.duration,
                "processes": self.spec.processes,
                "pool": self.spec.pool,
                "owner_prefix": self.spec.owner_prefix,
                "owner_start": self.spec.owner_start,
                "policy": self.spec.policy,
                "release_family": self.spec.release_family,
            },
            "count": self.count,
            "total": int(self.total_time * ns),
            "average": int((sum(lat) / len(lat)) * ns) if lat else 0,
            "fastest": int(lat[0] * ns) if lat else 0,
            "slowest": int(lat[-1] * ns) if lat else 0,
            "rps": self.rps,
            "histogram": [{"mark": m, "count": c, "frequency": f} for m, c, f in _histogram(lat)],
            "latencyDistribution": [{"percentage": p, "latency": int(_percentile(lat, p) * ns)} for p in PERCENTILES],
            "statusCodeDistribution": dict(self.statuses),
            "errorDistribution": dict(self.errors),
            "dsipam": {
                "ok": self.ok,
                "errors": self.error_count,
                "created": self.created,
                "not_created": self.not_created,
                "addresses_seen": self.addresses,
                "duplicates": self.duplicates,
                "duplicate_examples": self.duplicate_examples[:10],
                "first10_rps": self.segment_rps(0.0, 0.1),
                "last10_rps": self.segment_rps(0.9, 1.0),
                "timeline_per_s": self.timeline(),
                "client_cpu_s": self.client_cpu,
                "p50_ms": _percentile(lat, 50) * 1e3,
                "p90_ms": _percentile(lat, 90) * 1e3,
                "p95_ms": _percentile(lat, 95) * 1e3,
                "p99_ms": _percentile(lat, 99) * 1e3,
                # [[percent, ms], ...]: the latency CDF (bench/plots.py draws it)
                "latency_cdf": [[p, round(_percentile(lat, p) * 1e3, 4)] for p in CDF_PERCENTS] if lat else [],
            },
        }

    def summary(self) -> str:
        lat = sorted(self.latencies)
        out = ["", "Summary:"]
        if self.spec.name:
            out.append(f"  Name:\t{self.spec.name}")
        out += [
            f"  Count:\t{self.count}",
            f"  Total:\t{_ms(self.total_time)}",
            f"  Slowest:\t{_ms(lat[-1]) if lat else '-'}",
            f"  Fastest:\t{_ms(lat[0]) if lat else '-'}",
            f"  Average:\t{_ms(sum(lat) / len(lat)) if lat else '-'}",
            f"  Requests/sec:\t{self.rps:.2f}",
            "",
            "Response time histogram:",
        ]
        hist = _histogram(lat)
        top = max((c for _, c, _ in hist), default=0)
        for mark, count, _ in hist:
            bar = "∎" * (round(40 * count / top) if top else 0)
            out.append(f"  {mark * 1e3:9.3f} [{count}]\t|{bar}")
        out += ["", "Latency distribution:"]
        for p in PERCENTILES:
            out.append(f"  {p} % in {_ms(_percentile(lat, p))} ")
        out += ["", "Status code distribution:"]
        for code, n in self.statuses.most_common():
            out.append(f"  [{code}]\t{n} responses")
        if self.errors:
            out += ["", "Error distribution:"]
            for msg, n in self.errors.most_common(10):
                out.append(f"  [{n}]\t{msg}")
        if self.spec.call in ("allocate", "mixed") and self.spec.check_unique:
            out += [
                "",
                f"Allocations: {self.created} created, {self.not_created} already held; "
                f"{self.addresses} addresses returned, {self.duplicates} duplicate(s)",
            ]
        out.append(
            f"Throughput: first 10% {self.segment_rps(0, 0.1):.1f}/s, last 10% {self.segment_rps(0.9, 1):.1f}/s; "
            f"client CPU {self.client_cpu:.1f}s over {self.spec.processes} process(es)"
        )
        return "\n".join(out) + "\n"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    k = max(math.ceil(p / 100 * len(sorted_values)) - 1, 0)
    return sorted_values[min(k, len(sorted_values) - 1)]


def _histogram(sorted_values: list[float], buckets: int = 10) -> list[tuple[float, int, float]]:
    if not sorted_values:
        return []
    lo, hi = sorted_values[0], sorted_values[-1]
    width = (hi - lo) / buckets or 1e-9
    counts = [0] * (buckets + 1)
    for v in sorted_values:
        counts[min(int((v - lo) / width), buckets)] += 1
    n = len(sorted_values)
    return [(lo + i * width, c, c / n) for i, c in enumerate(counts)]


# -- one process ------------------------------------------------------------------------------


def _process_main(
    index: int, spec: LoadSpec, counter: Any, ready: Any, go: Any, start_at: Any, out: Any
) -> None:
    """Entry point of one load process: connect, wait for the common start, run its workers, report."""
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        run = asyncio.run
    try:
        result = run(_process_async(index, spec, counter, ready, go, start_at))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        ready.release()
        out.put({"index": index, "fatal": f"{type(exc).__name__}: {exc}"})
        return
    out.put(result)


async def _process_async(index: int, spec: LoadSpec, counter: Any, ready: Any, go: Any, start_at: Any) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2

    from dsipam.v1 import ipam_pb2 as pb

    channels = [
        grpc.aio.insecure_channel(t, options=[("grpc.use_local_subchannel_pool", 1)]) for t in spec.targets
    ]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), timeout=20)
    ident = lambda b: b  # noqa: E731 - requests are serialized by hand, responses parsed only when needed
    parse_alloc = spec.check_unique and spec.call in ("allocate", "mixed")
    alloc_stubs = [
        ch.unary_unary(_ALLOCATE, request_serializer=ident, response_deserializer=None if not parse_alloc else ident)
        for ch in channels
    ]
    release_stubs = [ch.unary_unary(_RELEASE, request_serializer=ident, response_deserializer=None) for ch in channels]
    health_stubs = [ch.unary_unary(_HEALTH, request_serializer=ident, response_deserializer=None) for ch in channels]
    health_request = health_pb2.HealthCheckRequest(service="").SerializeToString()
    policy = POLICIES[spec.policy]
    release_families = FAMILIES[spec.release_family]
    prefix, start, base, pool = spec.owner_prefix, spec.owner_start, spec.mixed_base, spec.pool
    total = spec.total

    latencies = array("d")
    ends = array("d")
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    v4: list[bytes] = []
    v6: list[bytes] = []
    created = not_created = 0

    def take() -> int:
        with counter.get_lock():
            n = counter.value
            if total and n >= total:
                return -1
            counter.value = n + 1
            return n

    # This process's share of the concurrency; the shares add up to spec.concurrency.
    workers = spec.concurrency // spec.processes + (1 if index < spec.concurrency % spec.processes else 0)
    ready.release()
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    t_start = start_at.value
    deadline = t_start + spec.duration if spec.duration else math.inf
    clock = time.perf_counter

    async def worker(w: int) -> None:
        nonlocal created, not_created
        slot = (w * spec.processes + index) % len(channels)
        alloc, release, health = alloc_stubs[slot], release_stubs[slot], health_stubs[slot]
        while True:
            if clock() >= deadline:
                return
            n = take()
            if n < 0:
                return
            kind = spec.call
            if kind == "mixed":
                kind, owner_n = ("allocate", base + n // 2) if n % 2 == 0 else ("release", n // 2)
            else:
                owner_n = n
            owner = f"{prefix}-{start + owner_n}"
            if kind == "allocate":
                node = f"node-{owner_n % spec.nodes}" if spec.nodes else ""
                stub, body = alloc, pb.AllocateRequest(
                    pool=pool, owner=owner, ip_family_policy=policy, node=node
                ).SerializeToString()
            elif kind == "release":
                stub, body = release, pb.ReleaseRequest(
                    pool=pool, owner=owner, ip_families=release_families
                ).SerializeToString()
            else:
                stub, body = health, health_request
            t0 = clock()
            try:
                response = await stub(body, timeout=spec.timeout)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                response = None
                code = exc.code().name
                errors[f"rpc error: code = {code} desc = {exc.details()}"] += 1
            t1 = clock()
            latencies.append(t1 - t0)
            ends.append(t1)
            statuses[code] += 1
            if response is not None and parse_alloc and kind == "allocate":
                got = pb.AllocateResponse.FromString(response)
                if got.created:
                    created += 1
                else:
                    not_created += 1
                for a in got.allocation.addresses:
                    (v4 if a.family == 1 else v6).append(a.ip.encode())

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(worker(w) for w in range(workers)))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for ch in channels:
        await ch.close()
    return {
        "index": index,
        "latencies": latencies.tobytes(),
        "ends": ends.tobytes(),
        "statuses": dict(statuses),
        "errors": dict(errors),
        "created": created,
        "not_created": not_created,
        "v4": b"\n".join(v4),
        "v6": b"\n".join(v6),
        "cpu": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
    }


# -- the run ----------------------------------------------------------------------------------


def run_load(spec: LoadSpec) -> Report:
    """Runs ``spec`` in ``spec.processes`` fresh processes (spawned, never forked) and merges their results."""
    spec.validate()
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    start_at = ctx.Value("d", 0.0)
    ready = ctx.Semaphore(0)
    go = ctx.Event()
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_process_main, args=(i, spec, counter, ready, go, start_at, out), daemon=True)
        for i in range(spec.processes)
    ]
    for p in procs:
        p.start()
    results: list[dict] = []
    try:
        for _ in procs:
            if not ready.acquire(timeout=60):
                raise RuntimeError("load processes did not connect within 60 s")
        start_at.value = time.perf_counter()
        go.set()
        deadline = time.monotonic() + (spec.duration or 0) + 3600
        while len(results) < len(procs):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError("load processes did not finish")
            try:
                results.append(out.get(timeout=min(remaining, 5)))
            except Exception:  # queue.Empty: check the processes are alive
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"load process exited with {dead[0].exitcode}") from None
        t_end = time.perf_counter()
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    fatal = [r["fatal"] for r in results if "fatal" in r]
    if fatal:
        raise RuntimeError(f"load process failed: {fatal[0]}")

    latencies: list[float] = []
    ends: list[float] = []
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    created = not_created = 0
    cpu = 0.0
    seen: dict[bytes, int] = {}
    duplicates = 0
    examples: list[str] = []
    for r in results:
        latencies.extend(array("d", r["latencies"]))
        ends.extend(array("d", r["ends"]))
        statuses.update(r["statuses"])
        errors.update(r["errors"])
        created += r["created"]
        not_created += r["not_created"]
        cpu += r["cpu"]
    if spec.check_unique and spec.call == "allocate":
        # Within one run every owner is distinct, so no address may come back twice.
        for key in ("v4", "v6"):
            for r in results:
                for ip in r[key].split(b"\n") if r[key] else ():
                    seen[ip] = seen.get(ip, 0) + 1
        for ip, k in seen.items():
            if k > 1:
                duplicates += k - 1
                if len(examples) < 10:
                    examples.append(f"{ip.decode()} x{k}")
    addresses = sum(len(r[k].split(b"\n")) if r[k] else 0 for r in results for k in ("v4", "v6"))
    # The run ends when the last request completes (ghz's Total).
    t_last = max(ends) if ends else t_end
    return Report(
        spec=spec,
        total_time=t_last - start_at.value,
        latencies=latencies,
        ends=ends,
        start=start_at.value,
        statuses=statuses,
        errors=errors,
        created=created,
        not_created=not_created,
        addresses=addresses,
        duplicates=duplicates,
        duplicate_examples=examples,
        client_cpu=cpu,
    )


def parse_duration(text: str) -> float:
    """'10s', '2m', '500ms' or a number of seconds."""
    text = text.strip()
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * scale
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"duration: {text!r} is not like 10s, 2m or 500ms") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", required=True, help="host:port (repeat to spread over servers)")
    p.add_argument("--call", choices=CALLS, default="allocate")
    p.add_argument("--pool", default="bench")
    p.add_argument("-c", "--concurrency", type=int, default=64, help="requests in flight (default 64)")
    p.add_argument("-n", "--total", type=int, default=0, help="number of requests")
    p.add_argument("-z", "--duration", type=parse_duration, default=0.0, help="run for this long (10s, 2m)")
    p.add_argument("--processes", type=int, default=2, help="load processes (default 2)")
    p.add_argument("--cpus", default="", help="pin the load processes to these CPUs, e.g. 1 or 1,2 (default: no pinning)")
    p.add_argument("--owner-prefix", default="bench", help="owners are PREFIX-N (default bench)")
    p.add_argument("--owner-start", type=int, default=0, help="first owner number (default 0)")
    p.add_argument("--mixed-base", type=int, default=0, help="mixed: owners PREFIX-START.. already allocated")
    p.add_argument("--policy", choices=sorted(POLICIES), default="dual", help="ip_family_policy (default dual)")
    p.add_argument("--release-family", choices=[f for f in FAMILIES if f], default="",
                   help="release: only this family (default: everything the owner holds)")
    p.add_argument("--nodes", type=int, default=0,
                   help="name a node in every Allocate, round-robin over N nodes (node-affine blocks; default none)")
    p.add_argument("-t", "--timeout", type=parse_duration, default=20.0, help="per-request deadline (default 20s)")
    p.add_argument("--no-check-unique", action="store_true", help="do not parse Allocate responses")
    p.add_argument("--name", default="")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON (ghz's shape)")
    return p


def parse_cpus(text: str) -> tuple[int, ...]:
    """"1,3" or "0-1" as CPU numbers; "" as none."""
    cpus: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = LoadSpec(
        targets=args.target,
        call=args.call,
        pool=args.pool,
        concurrency=args.concurrency,
        total=args.total,
        duration=args.duration,
        processes=args.processes,
        owner_prefix=args.owner_prefix,
        owner_start=args.owner_start,
        mixed_base=args.mixed_base,
        policy=args.policy,
        release_family=args.release_family,
        nodes=args.nodes,
        timeout=args.timeout,
        check_unique=not args.no_check_unique,
        name=args.name,
        cpus=parse_cpus(args.cpus),
    )
    try:
        report = run_load(spec)
    except ValueError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=1)
    return 0 if report.error_count == 0 and report.duplicates == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
