#!/usr/bin/env python3
"""Why a bridge ADD sometimes takes 50 ms more: bench/cni_bench.py under the kernel's tracer.

    sudo .venv/bin/python bench/cni_trace.py [cni_bench.py options, e.g. --repeat 1 --cycles 30 --runs 0]

Needs root and tracefs with the ``sched``, ``workqueue`` and ``syscalls`` events (it mounts
tracefs on /sys/kernel/tracing when nothing is there, and unmounts it again). It records
scheduler switches and wake-ups, process exec/exit, work items queued and run, and every
netlink ``sendto`` while the benchmark runs (only between the markers the benchmark writes
around its timed runs), then reports for every bridge ADD, per IPAM plugin:

* ``polls``: gaps of 40 ms or more between two netlink requests of the bridge after the IPAM
  plugin returned, i.e. the bridge's 50 ms sleeps (``ip.SettleAddresses`` while an IPv6 address
  is still tentative; the bridge-port check while the host veth is not yet up);
* ``DAD work late``: the kernel clears an IPv6 address's tentative flag in a work item
  (``addrconf_dad_work``), even with ``accept_dad=0``; "late" means it had not started 0.1 ms
  after the bridge added the address, by which time the bridge has listed the addresses;
* where that work item's kworker was woken: on the bridge thread's CPU (it then runs only
  when the bridge thread gives way) or on the other CPU, and what that other CPU was running.

docs/performance.md, "CNI plugin", has the findings.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRACING = Path("/sys/kernel/tracing")
EVENTS = ("sched/sched_switch", "sched/sched_wakeup", "sched/sched_process_exec", "sched/sched_process_exit",
          "workqueue/workqueue_queue_work", "workqueue/workqueue_execute_start", "syscalls/sys_enter_sendto")
MARK = "cni_bench:"
LINE = re.compile(r"^\s*(.+?)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+): (\w+)(?:: |\()(.*)$")
POLL_S = 0.040
LATE_S = 0.0001
PLUGINS = (("/replay-slow/", "replay-slow"), ("/replay/", "replay"), ("/host-local", "host-local"),
           ("/bin/dsipam", "dsipam"))


def write(name: str, value: str) -> None:
    (TRACING / name).write_text(value)


def record(bench_args: list[str]) -> list[str]:
    """Runs cni_bench.py with the events on; returns the trace's lines."""
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
        write("events/syscalls/sys_enter_sendto/filter", "addr_len == 12")  # netlink: sockaddr_nl
        write("tracing_on", "1")
        env = {**os.environ, "DSIPAM_BENCH_TRACE_MARKS": str(TRACING / "trace_marker")}
        done = subprocess.run([sys.executable, str(HERE / "cni_bench.py"), *bench_args], env=env)
        write("tracing_on", "0")
        if done.returncode != 0:
            raise SystemExit(f"cni_bench.py failed ({done.returncode})")
        return (TRACING / "trace").read_text().splitlines()
    finally:
        write("tracing_on", "0")  # before the saved values come back
        write("events/syscalls/sys_enter_sendto/filter", "0")
        for event in EVENTS:
            write(f"events/{event}/enable", "0")
        write("trace", "")
        for name, value in saved.items():
            write(name, value)
        if mounted:
            subprocess.run(["umount", str(TRACING)], check=True)


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
    spans: list[list[int]] = []  # [exec index, exit index] of each bridge process
    for i, (_, comm, _pid, _, name, rest) in enumerate(events):
        if name == "sched_process_exec" and rest.startswith("filename=/usr/lib/cni/bridge"):
            spans.append([i, -1])
        elif name == "sched_process_exit" and comm == "bridge" and "group_dead=true" in rest:
            for span in reversed(spans):
                if span[1] < 0:
                    span[1] = i
                    break
    running: dict[int, str] = {}  # what each CPU runs, as of the event being looked at
    position = 0
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for first, last in spans:
        if last < 0:
            continue
        span = events[first:last + 1]
        plugin, plugin_exit = None, None
        for ts, comm, _, _, name, rest in span:
            if name == "sched_process_exec" and plugin is None:
                plugin = next((label for key, label in PLUGINS if key in rest), None)
            if name == "sched_process_exit" and "group_dead=true" in rest and comm != "bridge":
                plugin_exit = ts
        if plugin is None or plugin_exit is None:
            continue
        sends = [e for e in span if e[4] == "sys_sendto" and e[1] == "bridge" and e[0] > plugin_exit]
        if len(sends) < 3:  # a DEL: the IPAM plugin runs after the interface is gone
            continue
        c = out[plugin]
        c["ADDs"] += 1
        polls = sum(1 for a, b in zip(sends, sends[1:], strict=False) if b[0] - a[0] >= POLL_S)
        c["ADDs with a poll"] += bool(polls)
        queued = next((k for k, e in enumerate(span) if e[4] == "workqueue_queue_work" and e[1] == "bridge"
                       and e[0] > plugin_exit and "function=addrconf_dad_work" in e[5]), None)
        if queued is None:
            continue
        tq, _, _, qcpu, _, qrest = span[queued]
        work = qrest.split("work struct=")[1].split()[0]
        started = next((e[0] for e in span[queued:] if e[4] == "workqueue_execute_start"
                        and f"work struct {work}:" in e[5]), None)
        late = started is None or started - tq > LATE_S
        wake = next((e for e in span[queued:queued + 8] if e[4] == "sched_wakeup" and e[3] == qcpu
                     and "comm=kworker" in e[5]), None)
        # what the CPUs were running when the work was queued
        while position < first + queued:
            _, _, _, cpu, name, rest = events[position]
            if name == "sched_switch":
                running[cpu] = field(rest, "next_comm")
            position += 1
        key = "DAD work late" if late else "DAD work at once"
        c[key] += 1
        c[f"{key}, with a poll"] += bool(polls)
        if wake is not None:
            target = int(field(wake[5], "target_cpu"))
            other = next((running.get(cpu, "?") for cpu in running if cpu != qcpu), "?")
            what = "idle" if other.startswith("swapper") else other
            c[f"kworker woken on the bridge's CPU (other CPU: {what})" if target == qcpu
              else "kworker woken on the other CPU"] += 1
        else:
            c["no kworker woken (one was awake already)"] += 1
    return out


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("needs root (tracefs, network namespaces)")
    counters = analyse(parse(record(sys.argv[1:])))
    print("\nbridge ADDs under the tracer, per IPAM plugin")
    for plugin, c in sorted(counters.items()):
        print(f"\n{plugin}:")
        for key in ("ADDs", "ADDs with a poll", "DAD work at once", "DAD work at once, with a poll",
                    "DAD work late", "DAD work late, with a poll"):
            print(f"  {key:55} {c[key]:>4}")
        for key, n in sorted(c.items()):
            if "kworker" in key:
                print(f"  {key:55} {n:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
