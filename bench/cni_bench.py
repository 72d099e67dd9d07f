#!/usr/bin/env python3
"""CNI plugin benchmark: ADD+DEL cycles through the real bridge plugin, dsipam vs host-local.

    .venv/bin/python bench/cni_bench.py [--repeat 3] [--cycles 50] [--runs 30] [--json out.json]
    .venv/bin/python bench/cni_bench.py --compiled "$(scripts/build-cni)"   # the compiled plugin

Needs root, iproute2 and containernetworking-plugins (/usr/lib/cni). It makes a scratch
database, a dsipam server on loopback and a unix socket, a parent network namespace with two
bridges (one per IPAM) and two pod namespaces, and removes all of it at the end.

The timing runs inside the parent namespace (this script re-executes itself there with
``ip netns exec``), so each sample is one bridge-plugin process, as a runtime would start it:

* ``bridge+dsipam`` vs ``bridge+host-local``: ``--repeat`` runs of ``--cycles`` ADD+DEL cycles
  each, interleaved (the order alternates every cycle, so machine noise hits both alike); each
  run's medians and ratio, and the median of the runs' ratios;
* how many ADDs of each side took 40 ms or more over that side's fastest: the bridge plugin
  polls with 50 ms sleeps (an IPv6 address still "tentative", a bridge port not yet up), so
  these are the samples that lost a race with the kernel (docs/performance.md, "CNI plugin");
  and the ratio of the medians of the other ADDs, which compares the plugins without the race;
* each sample's CPU time (the process and the children it waited for, from ``wait4``) is
  reported next to its wall time: on a busy machine it moves much less than the wall time;
* with ``--stand-ins``, two more sides in the same rotation, on dsipam's bridge and pod
  namespace: ``replay``, a shell script that prints the result dsipam gave (no server, no
  Python: same result, plugin time ~1 ms), and ``replay-slow``, the same from the plugin's
  interpreter after a 4 ms sleep, so that it takes about as long as a dsipam plugin run but
  talks to no server. They tell the result's shape and the plugin's duration apart from the
  server's work;
* where the time goes (``--runs`` samples each): the bare interpreter (``python -IS``), the
  plugin without an RPC (VERSION), the plugin's ADD and DEL alone, the same RPCs on a warm
  connection, grpc's import cost, and ``bridge+dsipam`` with ``"transport": "grpc"``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
BRIDGE = "/usr/lib/cni/bridge"
HOST_LOCAL_DIR = "/usr/lib/cni"
POOL = "cnibench"
DSIPAM_V4, DSIPAM_V4_GW = "198.18.0.0/20", "198.18.0.1"
DSIPAM_V6, DSIPAM_V6_GW = "fd00:be::/112", "fd00:be::1"
HOSTLOCAL_V4, HOSTLOCAL_V4_GW = "198.19.0.0/20", "198.19.0.1"
HOSTLOCAL_V6, HOSTLOCAL_V6_GW = "fd00:bf::/112", "fd00:bf::1"


def log(msg: str) -> None:
    print(f"[cni-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout


# -- inside the parent namespace -----------------------------------------------------------


def _conf(bridge: str, ipam: dict) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": f"bench-{bridge}", "type": "bridge", "bridge": bridge,
                       "isGateway": True, "ipMasq": False, "ipam": ipam}).encode()


def _run(argv: list[str], env: dict[str, str], stdin: bytes) -> tuple[float, float]:
    """Runs one process: (wall seconds, CPU seconds of it and the children it waited for)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(stdin)
    proc.stdin.close()
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} {env.get('CNI_COMMAND')} failed: {out!r} {err!r}")
    return elapsed, usage.ru_utime + usage.ru_stime


def _env(command: str, container: str, netns: str, cni_path: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
            "CNI_CONTAINERID": container, "CNI_NETNS": f"/var/run/netns/{netns}", "CNI_IFNAME": "eth0",
            "CNI_PATH": cni_path}


SLOW_MS = 40.0  # over the fastest sample: at least one of the bridge plugin's 50 ms polls


def _ms(samples: list[tuple[float, float]]) -> dict:
    wall = sorted(w for w, _ in samples)
    return {"median_ms": round(statistics.median(wall) * 1000, 2),
            "p90_ms": round(wall[min(len(wall) - 1, int(len(wall) * 0.9))] * 1000, 2),
            "cpu_median_ms": round(statistics.median(c for _, c in samples) * 1000, 2),
            "n": len(wall),
            "slow": sum(1 for w in wall if (w - wall[0]) * 1000 >= SLOW_MS),
            "fast_median_ms": round(statistics.median(w for w in wall if (w - wall[0]) * 1000 < SLOW_MS) * 1000, 2),
            "wall_ms": [round(w * 1000, 3) for w, _ in samples]}


REPLAY_SH = """#!/bin/sh
# stand-in IPAM plugin (bench/cni_bench.py --stand-ins): prints the result dsipam gave
cat >/dev/null
[ "$CNI_COMMAND" = ADD ] && cat {result}
exit 0
"""
REPLAY_PY = """#!{python} -IS
# stand-in IPAM plugin (bench/cni_bench.py --stand-ins): dsipam's result after a 4 ms sleep
import posix, sys, time
sys.stdin.buffer.read()
time.sleep(0.004)
if posix.environ.get(b"CNI_COMMAND") == b"ADD":
    sys.stdout.write(open({result!r}).read())
"""


def _stand_ins(spec: dict, dsipam_ipam: dict, variants: dict) -> list[str]:
    """Writes the stand-in plugins (named ``dsipam``, in their own CNI_PATH directories) around a
    result the real plugin printed, and adds them to ``variants``; returns their names."""
    root = Path(spec["data_dir"]).parent / "stand-ins"
    conf = json.dumps({"cniVersion": "1.0.0", "name": "bench-capture", "ipam": dsipam_ipam}).encode()
    plugin = str(Path(spec["cni_bin"]) / "dsipam")
    env = _env("ADD", "bench-stand-in-result", spec["pods"][0], spec["cni_bin"])
    result = root / "result.json"
    root.mkdir(parents=True, exist_ok=True)
    result.write_bytes(subprocess.run([plugin], input=conf, env=env, capture_output=True, check=True).stdout)
    subprocess.run([plugin], input=conf, env={**env, "CNI_COMMAND": "DEL"}, capture_output=True, check=True)
    names = []
    for name, text in (("replay", REPLAY_SH.format(result=result)),
                       ("replay-slow", REPLAY_PY.format(python=spec["python"], result=str(result)))):
        (root / name).mkdir(exist_ok=True)
        (root / name / "dsipam").write_text(text)
        (root / name / "dsipam").chmod(0o755)
        variants[name] = (_conf(spec["bridges"][0], dsipam_ipam), spec["pods"][0], str(root / name))
        names.append(name)
    return names


def _mark(spec: dict, text: str) -> None:
    """A marker in the kernel's trace, when bench/cni_trace.py runs this benchmark."""
    if spec.get("mark_fd") is not None:
        os.write(spec["mark_fd"], f"cni_bench: {text}\n".encode())


def worker(spec: dict) -> dict:
    """Runs every measurement; called inside the parent namespace."""
    cni_bin, sock = spec["cni_bin"], spec["sock"]
    dsipam_ipam = {"type": "dsipam", "endpoint": f"unix://{sock}", "pool": POOL, "ipFamilyPolicy": "RequireDualStack",
                   "ipFamilies": ["IPv4", "IPv6"], "defaultRoutes": True}
    hostlocal_ipam = {"type": "host-local", "dataDir": spec["data_dir"],
                      "ranges": [[{"subnet": HOSTLOCAL_V4, "gateway": HOSTLOCAL_V4_GW}],
                                 [{"subnet": HOSTLOCAL_V6, "gateway": HOSTLOCAL_V6_GW}]],
                      "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}
    variants = {
        "dsipam": (_conf(spec["bridges"][0], dsipam_ipam), spec["pods"][0], cni_bin),
        "host-local": (_conf(spec["bridges"][1], hostlocal_ipam), spec["pods"][1], HOST_LOCAL_DIR),
        "dsipam-grpc": (_conf(spec["bridges"][0], {**dsipam_ipam, "transport": "grpc"}), spec["pods"][0], cni_bin),
    }
    rotation = ["dsipam", "host-local"]
    if spec["stand_ins"]:
        rotation += _stand_ins(spec, dsipam_ipam, variants)
    samples: dict[str, list[tuple[float, float]]] = {}

    def cycle(name: str, i: int, record: bool = True) -> None:
        conf, pod, cni_path = variants[name]
        container = f"bench-{name}-{i}"
        add = _run([BRIDGE], _env("ADD", container, pod, cni_path), conf)
        time.sleep(spec["pause"])
        delete = _run([BRIDGE], _env("DEL", container, pod, cni_path), conf)
        time.sleep(spec["pause"])  # the kernel finishes tearing the veth down before the next ADD
        if record:
            samples.setdefault(f"bridge+{name} ADD", []).append(add)
            samples.setdefault(f"bridge+{name} DEL", []).append(delete)

    with_grpc = spec["grpc"]  # grpcio is importable by the plugin's interpreter
    for i in range(3):  # warm caches (page cache, pyc, the server's database connections) for both
        for name in rotation:
            cycle(name, i, record=False)
        if with_grpc:
            cycle("dsipam-grpc", i, record=False)
    per_run = []
    for run in range(spec["repeat"]):
        log(f"run {run + 1} of {spec['repeat']}: {spec['cycles']} interleaved ADD+DEL cycles, dsipam and host-local "
            f"(load {os.getloadavg()[0]:.2f})")
        before = {key: len(values) for key, values in samples.items()}
        _mark(spec, f"start of run {run + 1}")
        for i in range(spec["cycles"]):
            k = (run + i) % len(rotation)  # each side goes first in turn
            for name in rotation[k:] + rotation[:k]:
                cycle(name, 1000 * (run + 1) + i)
        _mark(spec, f"end of run {run + 1}")
        this = {key: _ms(values[before.get(key, 0):]) for key, values in samples.items()}
        per_run.append({"load": round(os.getloadavg()[0], 2), **{
            f"{key} {field}": this[key][field] for key in this
            for field in ("median_ms", "cpu_median_ms", "slow", "fast_median_ms")}})

    runs = spec["runs"]
    log(f"where the time goes: {runs} samples each")
    for i in range(runs if with_grpc else 0):
        cycle("dsipam-grpc", 100 + i)
    plugin = str(Path(cni_bin) / "dsipam")
    dsipam_conf = json.dumps({"cniVersion": "1.0.0", "name": "bench-direct", "ipam": dsipam_ipam}).encode()
    hostlocal_conf = json.dumps({"cniVersion": "1.0.0", "name": "bench-direct", "ipam": hostlocal_ipam}).encode()
    python = spec["python"]
    for i in range(runs):
        env = _env("ADD", f"direct-{i}", spec["pods"][0], cni_bin)
        samples.setdefault("python -IS -c pass", []).append(_run([python, "-IS", "-c", "pass"], env, b""))
        if with_grpc:  # what "transport": "grpc" costs the Python plugin
            samples.setdefault("venv python -c 'import grpc, dsipam.v1 stubs'", []).append(_run(
                [spec["venv_python"], "-c", "import grpc; from dsipam.v1 import ipam_pb2_grpc"], env, b""))
        samples.setdefault("dsipam VERSION (no RPC)", []).append(_run([plugin], {**env, "CNI_COMMAND": "VERSION"}, b""))
        samples.setdefault("host-local VERSION", []).append(_run([str(Path(HOST_LOCAL_DIR) / "host-local")],
                                                                 {**env, "CNI_COMMAND": "VERSION"}, b""))
        samples.setdefault("dsipam ADD alone", []).append(_run([plugin], env, dsipam_conf))
        samples.setdefault("dsipam DEL alone", []).append(_run([plugin], {**env, "CNI_COMMAND": "DEL"}, dsipam_conf))
        hl = [str(Path(HOST_LOCAL_DIR) / "host-local")]
        samples.setdefault("host-local ADD alone", []).append(_run(hl, env, hostlocal_conf))
        samples.setdefault("host-local DEL alone", []).append(_run(hl, {**env, "CNI_COMMAND": "DEL"}, hostlocal_conf))

    sys.path.insert(0, spec["cni_root"])
    from dsipam.cni._client import NativeClient

    client = NativeClient(f"unix://{sock}", 120.0)
    try:
        for i in range(runs):
            start, cpu = time.perf_counter(), time.process_time()
            client.allocate(POOL, f"warm-{i}/eth0", 3, [1, 2], [], {})
            samples.setdefault("Allocate RPC, warm connection", []).append(
                (time.perf_counter() - start, time.process_time() - cpu))
            start, cpu = time.perf_counter(), time.process_time()
            client.release(POOL, f"warm-{i}/eth0")
            samples.setdefault("Release RPC, warm connection", []).append(
                (time.perf_counter() - start, time.process_time() - cpu))
    finally:
        client.close()
    return {"samples": {name: _ms(values) for name, values in samples.items()}, "per_run": per_run}


# -- set-up in the root namespace ----------------------------------------------------------


def run_ratios(per_run: list[dict]) -> list[dict[str, float]]:
    """Each run's ADD medians, wall and CPU ratios and slow-sample counts."""
    out = []
    for r in per_run:
        d, h = "bridge+dsipam ADD", "bridge+host-local ADD"
        out.append({"load": r["load"], "dsipam_ms": r[f"{d} median_ms"], "host_local_ms": r[f"{h} median_ms"],
                    "wall_ratio": round(r[f"{d} median_ms"] / r[f"{h} median_ms"], 2),
                    "cpu_ratio": round(r[f"{d} cpu_median_ms"] / r[f"{h} cpu_median_ms"], 2),
                    "fast_ratio": round(r[f"{d} fast_median_ms"] / r[f"{h} fast_median_ms"], 2),
                    "dsipam_slow": r[f"{d} slow"], "host_local_slow": r[f"{h} slow"]})
    return out


def report(results: dict, machine: dict) -> str:
    lines = [f"machine: {machine.get('nproc')} CPUs, {machine.get('cpu')}; load at start {machine.get('loadavg_at_start')}"
             f", at the end {results.get('loadavg_at_end')}",
             f"plugin interpreter: {machine.get('plugin_python')}",
             "", f"{'measurement':45} {'median ms':>10} {'p90 ms':>8} {'CPU ms':>7} {'n':>4} {'slow':>5}"]
    for name, r in results["samples"].items():
        slow = r["slow"] if " ADD" in name and name.startswith("bridge") else ""
        lines.append(f"{name:45} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} {r['cpu_median_ms']:>7.2f} {r['n']:>4}"
                     f" {slow:>5}")
    lines.append(f"(slow: ADDs {SLOW_MS:.0f} ms or more over the side's fastest, i.e. at least one 50 ms poll "
                 "of the bridge plugin)")
    lines += ["", f"{'run':>3} {'load':>5} {'dsipam ADD ms':>14} {'host-local ADD ms':>18} {'wall ratio':>11} "
                  f"{'CPU ratio':>10} {'slow d/h':>9} {'ratio without polls':>20}"]
    for i, r in enumerate(results["per_run"], 1):
        lines.append(f"{i:>3} {r['load']:>5.2f} {r['dsipam_ms']:>14.2f} {r['host_local_ms']:>18.2f} "
                     f"{r['wall_ratio']:>10.2f}x {r['cpu_ratio']:>9.2f}x {r['dsipam_slow']:>4}/{r['host_local_slow']:<4} "
                     f"{r['fast_ratio']:>19.2f}x")
    lines.append("(ratio without polls: of the medians of the ADDs that took none of the bridge's 50 ms polls)")
    lines.append("")
    for name, value in results["ratios"].items():
        lines.append(f"{name:60} {value:>6.2f}")
    return "\n".join(lines)


def ratios(samples: dict, per_run: list[dict]) -> dict[str, float]:
    def med(name: str) -> float:
        return samples[name]["median_ms"]

    out = {
        "ADD: median over the runs of each run's bridge+dsipam / bridge+host-local median":
            statistics.median(r["wall_ratio"] for r in per_run),
        "ADD without the bridge's polls: median over the runs of each run's ratio":
            statistics.median(r["fast_ratio"] for r in per_run),
        "ADD: bridge+dsipam / bridge+host-local (median)": med("bridge+dsipam ADD") / med("bridge+host-local ADD"),
        "DEL: bridge+dsipam / bridge+host-local (median)": med("bridge+dsipam DEL") / med("bridge+host-local DEL"),
        "ADD+DEL: bridge+dsipam / bridge+host-local (medians summed)":
            (med("bridge+dsipam ADD") + med("bridge+dsipam DEL"))
            / (med("bridge+host-local ADD") + med("bridge+host-local DEL")),
    }
    out["ADD CPU time (client side): bridge+dsipam / bridge+host-local (median)"] = (
        samples["bridge+dsipam ADD"]["cpu_median_ms"] / samples["bridge+host-local ADD"]["cpu_median_ms"])
    if "bridge+dsipam-grpc ADD" in samples:
        out["ADD: bridge+dsipam over grpcio / bridge+host-local (median)"] = (
            med("bridge+dsipam-grpc ADD") / med("bridge+host-local ADD"))
    return {k: round(v, 2) for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=50, help="interleaved ADD+DEL cycles per IPAM and run (default 50)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of --cycles cycles; the ADD ratio is also given "
                        "as the median of the runs' ratios (default 3)")
    parser.add_argument("--runs", type=int, default=30, help="samples per breakdown measurement (default 30)")
    parser.add_argument("--pause", type=float, default=0.1,
                        help="seconds between one bridge call and the next (default 0.1): an ADD right after a "
                             "DEL otherwise waits for the kernel to finish removing the previous veth")
    parser.add_argument("--stand-ins", action="store_true", help="also time two stand-in IPAM plugins that print "
                        "dsipam's result, at once and from Python after 4 ms (see above)")
    parser.add_argument("--json", help="also write the results here (they always go to bench/results/ too)")
    parser.add_argument("--docs-figure", action="store_true",
                        help="also draw the ADD-time figure into docs/img/performance/cni-add.png (bench/plots.py)")
    parser.add_argument("--plugin-python", help="interpreter for the installed plugin (default: this one); "
                        "the built-in transport needs only the standard library")
    parser.add_argument("--compiled", metavar="BINARY",
                        help="install this compiled plugin (scripts/build-cni) instead of the Python plugin")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")

    sys.path.insert(0, str(HERE))
    import harness

    run = uuid.uuid4().hex[:6]
    parent, pods = f"cnib-{run}-host", [f"cnib-{run}-d", f"cnib-{run}-h"]
    tmp = Path(tempfile.mkdtemp(prefix="dsipam-cni-bench-"))
    sock = tmp / "dsipam.sock"
    created: list[str] = []
    machine = harness.machine_info()
    try:
        with harness.scratch_database("dsipam_cnibench") as db_url, \
                harness.Servers(db_url, args=("--listen", f"unix://{sock}")) as servers:
            import grpc

            from dsipam.v1 import ipam_pb2 as pb
            from dsipam.v1 import ipam_pb2_grpc

            with grpc.insecure_channel(servers.targets[0]) as channel:
                ipam_pb2_grpc.IpamServiceStub(channel).CreatePool(pb.CreatePoolRequest(pool=pb.Pool(
                    name=POOL, ranges=[pb.IpRange(cidr=DSIPAM_V4, gateway=DSIPAM_V4_GW),
                                       pb.IpRange(cidr=DSIPAM_V6, gateway=DSIPAM_V6_GW)])), timeout=30)
            install = [sys.executable, "-m", "dsipam.cni", "install", str(tmp / "bin")]
            if args.plugin_python:
                install[4:4] = ["--python", args.plugin_python]
            if args.compiled:
                install[4:4] = ["--compiled", args.compiled]
            subprocess.run(install, check=True, capture_output=True)
            for ns in (parent, *pods):
                sh("ip", "netns", "add", ns)
                created.append(ns)
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
                for key in ("all", "default"):
                    sh("ip", "netns", "exec", ns, "sh", "-c", f"echo 0 > /proc/sys/net/ipv6/conf/{key}/accept_dad")
            import dsipam.cni

            spec = {"cni_bin": str(tmp / "bin"), "sock": str(sock), "data_dir": str(tmp / "host-local"),
                    "bridges": [f"cbd{run}", f"cbh{run}"], "pods": pods, "cycles": args.cycles, "runs": args.runs,
                    "repeat": args.repeat, "stand_ins": args.stand_ins,
                    "pause": args.pause,
                    "python": args.plugin_python or sys.executable, "venv_python": sys.executable,
                    "grpc": not (args.plugin_python or args.compiled), "cni_root": str(Path(dsipam.cni.__file__).resolve().parents[2])}
            # bench/cni_trace.py: the worker marks its timed runs in the kernel's trace (through an
            # inherited descriptor: `ip netns exec` mounts another /sys for the worker).
            marks = os.environ.get("DSIPAM_BENCH_TRACE_MARKS")
            spec["mark_fd"] = os.open(marks, os.O_WRONLY) if marks else None
            done = subprocess.run(["ip", "netns", "exec", parent, sys.executable, str(Path(__file__).resolve()),
                                   "--worker", json.dumps(spec)], capture_output=True, text=True,
                                  pass_fds=(spec["mark_fd"],) if marks else ())
            if marks:
                os.close(spec["mark_fd"])
            sys.stderr.write(done.stderr)
            if done.returncode != 0:
                raise RuntimeError(f"worker failed ({done.returncode})")
            measured = json.loads(done.stdout)
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    machine["plugin_python"] = args.plugin_python or sys.executable
    if args.compiled:
        machine["plugin_python"] = f"none: the compiled plugin {args.compiled}"
    per_run = run_ratios(measured["per_run"])
    results = {"machine": machine, "command": " ".join(sys.argv), "cycles": args.cycles, "repeat": args.repeat,
               "runs": args.runs, "pause": args.pause, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
               "samples": measured["samples"], "per_run": per_run, "ratios": ratios(measured["samples"], per_run)}
    print(report(results, machine))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    # The results and the ADD-time figure (bench/plots.py) in bench/results/; with --docs-figure in docs/ too.
    stem = HERE / "results" / (time.strftime("%Y%m%d-%H%M%S") + "-cni")
    stem.parent.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    import plots  # matplotlib only once the run is done

    figures = [plots.cni_add(results, stem.parent / (stem.name + "-add.png"))]
    if args.docs_figure:
        figures.append(plots.cni_add(results, plots.DOC_FIGURES / "cni-add.png"))
    log(f"results in {stem}.json; figures {', '.join(str(f) for f in figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
