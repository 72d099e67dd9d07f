"""Runs a bench/loadgen.py ``LoadSpec`` with ghz and returns the same ``Report``.

ghz (github.com/bojand/ghz) costs far less CPU per call than a Python load generator, so on a
small machine the server, not the client, is what a run measures. It is found through
``$GHZ``, then ``ghz`` on PATH, then ``../shared/ghz/ghz`` beside the project; it is a tool for
benchmarks, never a dependency. The calls map onto ghz templates exactly as loadgen numbers its
owners (``{prefix}-{start + n}``, ``node-{n % nodes}``); a spec over several servers runs one ghz
per server on its share of the numbers, at its share of the concurrency. ``mixed`` (allocate and
release in one stream) has no ghz form: :func:`supports` says so and the caller uses loadgen.

ghz does not read the answers, so a report made here has no client-side duplicate check or
created count: the suite takes both from the database (``harness.check_pool`` and the
allocation count before and after), which is where they are decided anyway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import loadgen

ROOT = Path(__file__).resolve().parent.parent
IMPORT_PATHS = f"{ROOT / 'proto'},{ROOT / 'bench/ghz/proto'}"
_POLICY = {"single": "IP_FAMILY_POLICY_SINGLE_STACK", "prefer": "IP_FAMILY_POLICY_PREFER_DUAL_STACK",
           "dual": "IP_FAMILY_POLICY_REQUIRE_DUAL_STACK"}
_FAMILY = {"ipv4": "IP_FAMILY_IPV4", "ipv6": "IP_FAMILY_IPV6"}


def find_ghz() -> str | None:
    """``$GHZ``, then ``ghz`` on PATH, then ``../shared/ghz/ghz`` beside the project; None if none runs."""
    for candidate in (os.environ.get("GHZ"), shutil.which("ghz"), str(ROOT.parent / "shared/ghz/ghz")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def version(ghz: str) -> str:
    done = subprocess.run([ghz, "--version"], capture_output=True, text=True, check=True)
    return (done.stdout or done.stderr).strip()


def supports(spec: loadgen.LoadSpec) -> bool:
    return spec.call in ("allocate", "release", "health") and spec.total > 0


def _method_and_data(spec: loadgen.LoadSpec, first: int) -> tuple[str, str, dict[str, Any]]:
    owner = f"{spec.owner_prefix}-{{{{add .RequestNumber {first}}}}}"
    if spec.call == "health":
        return "grpc/health/v1/health.proto", "grpc.health.v1.Health.Check", {}
    if spec.call == "allocate":
        data: dict[str, Any] = {"pool": spec.pool, "owner": owner, "ip_family_policy": _POLICY[spec.policy]}
        if spec.nodes:
            data["node"] = f"node-{{{{mod (add .RequestNumber {first}) {spec.nodes}}}}}"
        return "dsipam/v1/ipam.proto", "dsipam.v1.IpamService.Allocate", data
    data = {"pool": spec.pool, "owner": owner}
    if spec.release_family:
        data["ip_families"] = [_FAMILY[spec.release_family]]
    return "dsipam/v1/ipam.proto", "dsipam.v1.IpamService.Release", data


def run_load(spec: loadgen.LoadSpec, ghz: str) -> loadgen.Report:
    """Runs ``spec`` (a request count, not a duration) with one ghz per target; the merged report."""
    spec.validate()
    if not supports(spec):
        raise ValueError(f"call: {spec.call!r} with a duration has no ghz form; use loadgen")
    k = len(spec.targets)
    shares = [spec.total // k + (1 if i < spec.total % k else 0) for i in range(k)]
    firsts = [spec.owner_start + sum(shares[:i]) for i in range(k)]
    conc = [max(1, spec.concurrency // k + (1 if i < spec.concurrency % k else 0)) for i in range(k)]
    procs = []
    with tempfile.TemporaryDirectory(prefix="dsipam-ghz-") as tmp:
        children0 = os.times()
        for i, target in enumerate(spec.targets):
            proto, method, data = _method_and_data(spec, firsts[i])
            out = Path(tmp) / f"{i}.json"
            cmd = [ghz, "--insecure", "--connections", str(min(4, conc[i])), "-c", str(min(conc[i], shares[i])),
                   "-n", str(shares[i]), "--import-paths", IMPORT_PATHS, "--proto", proto, "--call", method,
                   "-d", json.dumps(data), "--timeout", f"{spec.timeout:g}s", "--format", "json", "-o", str(out),
                   target]
            cpus = set(spec.cpus)
            procs.append((subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                preexec_fn=(lambda cpus=cpus: os.sched_setaffinity(0, cpus)) if cpus else None,
            ), out))
        reports = []
        for proc, out in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"ghz exited with {proc.returncode}: {err.strip()[:2000]}")
            reports.append(json.loads(out.read_text()))
        children1 = os.times()
    latencies: list[float] = []
    ends: list[float] = []
    starts: list[float] = []
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for rep in reports:
        for d in rep.get("details") or []:
            t = _epoch(d["timestamp"])
            lat = d["latency"] / 1e9
            starts.append(t)
            latencies.append(lat)
            ends.append(t + lat)
            statuses[d["status"]] += 1
            if d.get("error"):
                errors[d["error"]] += 1
    start = min(starts) if starts else 0.0
    total = (max(ends) - start) if ends else 0.0
    client_cpu = (children1.children_user + children1.children_system
                  - children0.children_user - children0.children_system)
    return loadgen.Report(spec=spec, total_time=total, latencies=latencies, ends=ends, start=start,
                          statuses=statuses, errors=errors, client_cpu=client_cpu)


def _epoch(stamp: str) -> float:
    """ghz's RFC 3339 timestamps (nanoseconds) as seconds since the epoch."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    base = datetime.fromisoformat(head + "+00:00").timestamp()
    return base + (float("0." + frac) if frac else 0.0)
