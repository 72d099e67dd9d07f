#!/usr/bin/env python3
"""Why a bridge ADD sometimes takes 50 ms more: bench/cni_bench.py under the kernel's tracer.

    sudo .venv/bin/python bench/cni_trace.py [--save trace.txt] [cni_bench.py options, e.g. --repeat 1 --runs 0]

Needs root and tracefs with the ``sched``, ``workqueue`` and ``syscalls`` events (it mounts
tracefs on /sys/kernel/tracing when nothing is there, and unmounts it again). It records
kworker wake-ups, process exec/exit, work items queued and run, and every netlink
``sendto`` while the benchmark runs (only between the markers the benchmark writes around
its timed runs), then reports for every bridge ADD, per IPAM plugin:

* ``polls``: gaps of 40 ms or more between two netlink requests of the bridge after the IPAM
  plugin returned, i.e. the bridge's 50 ms sleeps (``ip.SettleAddresses`` while an IPv6 address
  is still tentative; the bridge-port check while the host veth is not yet up);
* whether the first poll began while the work item that clears the new IPv6 address's
  tentative flag (``addrconf_dad_work``; the kernel defers it to a kworker even with
  ``accept_dad=0``) had not run yet: then the bridge found the address tentative and slept;
* where that work item's kworker was woken: on the bridge thread's CPU (it then runs only
  when the bridge thread gives way) or on another CPU.

docs/performance.md, "CNI plugin", has the findings.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRACING = Path("/sys/kernel/tracing")
EVENTS = ("sched/sched_wakeup", "sched/sched_process_exec", "sched/sched_process_exit",
          "workqueue/workqueue_queue_work", "workqueue/workqueue_execute_start", "syscalls/sys_enter_sendto")
FILTERS = {"syscalls/sys_enter_sendto": "addr_len == 12",  # netlink: a sockaddr_nl
           "sched/sched_wakeup": 'comm ~ "kworker*"'}
MARK = "cni_bench:"
BRIDGE = ("bridge", "<...>")
LINE = re.compile(r"^\s*(.+?)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+): (\w+)(?:: |\()(.*)$")
POLL_S = 0.040
PLUGINS = (("/stand-ins/replay-slow/dsipam ", "replay-slow"), ("/stand-ins/replay/dsipam ", "replay"),
           ("filename=/usr/lib/cni/host-local ", "host-local"), ("/bin/dsipam ", "dsipam"))  # cni_bench.py's paths


def write(name: str, value: str) -> None:
    (TRACING / name).write_text(value)


def record(bench_args: list[str], save: Path) -> list[str]:
    """Runs cni_bench.py with the events on; saves the trace to ``save`` and returns its lines.

    Few events, filtered in the kernel, into a large ring buffer read at the end: a reader
    running alongside (``trace_pipe``) costs enough CPU on a 2-CPU machine to change what is
    measured. Lost events (overrun) are reported."""
    mounted = False
    saved = {}
    if not (TRACING / "README").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)], check=True)
        mounted = True
    try:
        saved = {name: (TRACING / name).read_text().strip() for name in ("tracing_on", "buffer_size_kb")}
        write("tracing_on", "0")
        write("trace", "")
        write("buffer_size_kb", "65536")
        for event in EVENTS:
            write(f"events/{event}/enable", "1")
        for event, expression in FILTERS.items():
            write(f"events/{event}/filter", expression)
        write("tracing_on", "1")
        env = {**os.environ, "DSIPAM_BENCH_TRACE_MARKS": str(TRACING / "trace_marker")}
        done = subprocess.run([sys.executable, str(HERE / "cni_bench.py"), *bench_args], env=env)
        write("tracing_on", "0")
        if done.returncode != 0:
            raise SystemExit(f"cni_bench.py failed ({done.returncode})")
        lost = sum(int(line.split()[-1]) for cpu in os.listdir(TRACING / "per_cpu")
                   for line in (TRACING / "per_cpu" / cpu / "stats").read_text().splitlines()
                   if line.startswith(("overrun:", "dropped events:")))
        if lost:
            print(f"warning: the trace lost {lost} events (overrun); counts below may miss ADDs", file=sys.stderr)
        save.write_text((TRACING / "trace").read_text())
    finally:
        write("tracing_on", "0")  # before the saved values come back
        for event in FILTERS:
            write(f"events/{event}/filter", "0")
        for event in EVENTS:
            write(f"events/{event}/enable", "0")
        write("trace", "")
        for name, value in saved.items():
            write(name, value)
        if mounted:
            subprocess.run(["umount", str(TRACING)], check=True)
    return save.read_text().splitlines()


def parse(lines: list[str]) -> list[tuple[float, str, int, int, str, str]]:
    """(time, comm, pid, cpu, event, details) between the benchmark's first and last marker."""
    events, inside, marks = [], False, 0
    for line in lines:
        m = LINE.match(line)
        if not m:
            continue
        comm, pid, cpu, ts, name, rest = m.groups()
        if name == "tracing_mark_write" and MARK in rest:
            marks += 1
            inside = "start" in rest
            continue
        if inside:
            events.append((float(ts), comm, int(pid), int(cpu), name, rest))
    if not marks:
        raise SystemExit("no benchmark markers in the trace (is this cni_bench.py with DSIPAM_BENCH_TRACE_MARKS?)")
    return events


def field(rest: str, key: str) -> str:
    return rest.split(f"{key}=")[1].split()[0]


def analyse(events: list[tuple[float, str, int, int, str, str]]) -> dict[str, collections.Counter]:
    """Counters per IPAM plugin over the bridge ADDs."""
    # Each bridge process, from its exec to the next one's (the benchmark runs them one at a time;
    # a thread's exit event does not always come with group_dead=true for the last one).
    starts = [i for i, e in enumerate(events)
              if e[4] == "sched_process_exec" and e[5].startswith("filename=/usr/lib/cni/bridge")]
    spans = list(zip(starts, [*starts[1:], len(events)], strict=True))
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for first, end in spans:
        span = events[first:end]
        plugin, plugin_exec = None, None
        for ts, _, _, _, name, rest in span:
            if name == "sched_process_exec" and plugin is None:
                plugin = next((label for key, label in PLUGINS if key in rest and (
                    "dsipam-cni-bench-" in rest or label == "host-local")), None)
                plugin_exec = ts if plugin else None
        if plugin is None:
            continue
        # The bridge waits for the plugin: its next netlink request comes after the plugin's exit.
        # (The tracer names a task "<...>" when it missed its name.)
        sends = [e for e in span if e[0] > plugin_exec and e[4] == "sys_sendto" and e[1] in BRIDGE]
        if len(sends) < 3:  # a DEL: the IPAM plugin runs after the interface is gone
            continue
        plugin_exit = sends[0][0]
        c = out[plugin]
        c["ADDs"] += 1
        gaps = [(x[0], y[0]) for x, y in zip(sends, sends[1:], strict=False) if y[0] - x[0] >= POLL_S]
        c["ADDs with a poll"] += bool(gaps)
        queued = next((k for k, e in enumerate(span) if e[4] == "workqueue_queue_work" and e[1] in BRIDGE
                       and e[0] >= plugin_exit and "function=addrconf_dad_work" in e[5]), None)
        if queued is None:
            c["no DAD work queued by the bridge"] += 1
            continue
        tq, _, _, qcpu, _, qrest = span[queued]
        work = qrest.split("work struct=")[1].split()[0]
        started = next((e[0] for e in span[queued:] if e[4] == "workqueue_execute_start"
                        and f"work struct {work}:" in e[5]), None)
        if gaps:
            pending = started is None or started > gaps[0][0]
            c["poll while the DAD work was still pending" if pending else "poll after the DAD work had run"] += 1
        wake = next((e for e in span[queued:queued + 8] if e[4] == "sched_wakeup" and e[3] == qcpu
                     and "comm=kworker" in e[5]), None)
        if wake is None:
            where = "no kworker woken (one was awake already)"
        elif int(field(wake[5], "target_cpu")) == qcpu:
            where = "kworker woken on the bridge thread's CPU"
        else:
            where = "kworker woken on another CPU"
        c[f"@{where}"] += 1
        c[f"@{where}|poll"] += bool(gaps)
    return out


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("needs root (tracefs, network namespaces)")
    args = sys.argv[1:]
    save = Path(tempfile.mkstemp(prefix="cni-trace-", suffix=".txt")[1])
    if args[:1] == ["--save"]:
        save, args = Path(args[1]), args[2:]
    counters = analyse(parse(record(args, save)))
    print(f"\nthe trace: {save}")
    print("\nbridge ADDs under the tracer, per IPAM plugin")
    for plugin, c in sorted(counters.items()):
        print(f"\n{plugin}:")
        for key in ("ADDs", "ADDs with a poll", "poll while the DAD work was still pending",
                    "poll after the DAD work had run", "no DAD work queued by the bridge"):
            print(f"  {key:62} {c[key]:>4}")
        print("  the DAD work's kworker (ADDs, of which with a poll):")
        for key, n in sorted(c.items()):
            if key.startswith("@") and "|" not in key:
                print(f"    {key[1:]:60} {n:>4} {c[key + '|poll']:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
