"""The ``dsipam`` lifecycle, node and watch commands as subprocesses against a real server:
pool settings (create, update, show), reservations, ranges on a live pool, migration with
progress, alloc --node and filtered lists, blocks, node release and watch (lines, JSON lines,
resume tokens, Ctrl-C), in tables and JSON, with the usual exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dsipam.client import IpamClient, Range

DSIPAM = str(Path(sys.executable).with_name("dsipam"))

WAIT = 30.0  # deadline of the tests' calls: generous, for a loaded machine


def _env(target: str | None, env: dict[str, str] | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}
    base["DSIPAM_TIMEOUT"] = str(WAIT)
    if target is not None:
        base["DSIPAM_TARGET"] = target
    return {**base, **(env or {})}


def dsipam(*args: str, target: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs the real command; DSIPAM_* variables come only from ``target`` and ``env``."""
    return subprocess.run([DSIPAM, *args], capture_output=True, text=True, timeout=60, env=_env(target, env))


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stderr == ""
    return result.stdout


def refused(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """Asserts the exit code and a one-line error (no traceback) containing ``words``."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dsipam"), lines[0]
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def field(out: str, name: str) -> str:
    """The value of a ``Name:  value`` line of a table."""
    match = re.search(rf"^{re.escape(name)}:\s+(.*)$", out, re.M)
    assert match, (name, out)
    return match[1]


# -- pool settings ----------------------------------------------------------------------------------


def test_pool_create_update_and_show_settings(target: str) -> None:
    created = json.loads(ok(dsipam("pool", "create", "pods", "--range", "198.18.0.0/24", "--range", "fd00::/120",
                                   "--cooldown", "45", "--node-affinity", "strict", "--label", "env=dev",
                                   "-o", "json", target=target)))
    assert (created["cooldown"], created["node_affinity"], created["reservations"]) == (45, "strict", [])
    shown = ok(dsipam("pool", "show", "pods", target=target))
    assert (field(shown, "Cooldown"), field(shown, "Node affinity"), field(shown, "Reservations")) == (
        "45s", "strict", "-")

    out = ok(dsipam("pool", "update", "pods", "--cooldown", "0.5", target=target))
    assert (field(out, "Cooldown"), field(out, "Labels"), field(out, "Node affinity")) == ("0.5s", "env=dev", "strict")
    doc = json.loads(ok(dsipam("pool", "update", "pods", "--label", "team=net", "--label", "tier=1", "--cooldown", "0",
                               "-o", "json", target=target)))
    assert (doc["labels"], doc["cooldown"], doc["node_affinity"]) == ({"team": "net", "tier": "1"}, 0, "strict")
    doc = json.loads(ok(dsipam("pool", "update", "pods", "--clear-labels", "--node-affinity", "borrow", "-o", "json",
                               target=target)))
    assert (doc["labels"], doc["cooldown"], doc["node_affinity"]) == ({}, 0, "borrow")
    assert field(ok(dsipam("pool", "show", "pods", target=target)), "Cooldown") == "0s (none)"
    with IpamClient(target, timeout=WAIT) as ipam:
        pool = ipam.get_pool("pods")
    assert (pool.cooldown.total_seconds(), pool.node_affinity.value, dict(pool.labels)) == (0, "borrow", {})

    refused(dsipam("pool", "update", "pods", target=target), 2, "nothing to change")
    refused(dsipam("pool", "update", "pods", "--cooldown", "-1", target=target), 2, "--cooldown")
    refused(dsipam("pool", "update", "pods", "--label", "a=b", "--clear-labels", target=target), 2, "--clear-labels")
    refused(dsipam("pool", "create", "x", "--range", "198.18.1.0/24", "--node-affinity", "loose", target=target), 2,
            "invalid choice")
    refused(dsipam("pool", "update", "pods", "--cooldown", "200000", target=target), 1, "INVALID_ARGUMENT", "cooldown")
    refused(dsipam("pool", "update", "missing", "--cooldown", "1", target=target), 1, "POOL_NOT_FOUND")


def test_pool_reserve_and_unreserve(target: str) -> None:
    ok(dsipam("pool", "create", "res", "--range", "198.18.0.0/29", "--cooldown", "0", target=target))  # .1-.6
    holder = json.loads(ok(dsipam("alloc", "res", "a", "-o", "json", target=target)))["allocation"]
    held = holder["addresses"][0]["ip"]
    assert held == "198.18.0.1"
    out = ok(dsipam("pool", "reserve", "res", "198.18.0.2", "198.18.0.4/31", target=target))
    assert field(out, "Reservations") == "198.18.0.2/32, 198.18.0.4/31"
    row = re.search(r"^\s+IPv4\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s", out, re.M)
    assert row and row.groups() == ("6", "1", "0", "3", "2")  # size, allocated, cooldown, reserved, free

    refused(dsipam("pool", "reserve", "res", held, target=target), 1, "ADDRESS_ALLOCATED", held)
    doc = json.loads(ok(dsipam("pool", "reserve", "res", held, "--force", "-o", "json", target=target)))
    assert set(doc["reservations"]) == {"198.18.0.1/32", "198.18.0.2/32", "198.18.0.4/31"}
    refused(dsipam("pool", "reserve", "res", "nonsense", target=target), 2, "addresses[0]")
    refused(dsipam("pool", "reserve", "res", "198.18.7.7", target=target), 1, "INVALID_ARGUMENT", "198.18.7.7")
    refused(dsipam("pool", "reserve", "res", target=target), 2, "required")

    doc = json.loads(ok(dsipam("pool", "unreserve", "res", "198.18.0.4/31", "198.18.0.2", "-o", "json",
                               target=target)))
    assert doc["reservations"] == ["198.18.0.1/32"]
    assert doc["usage"][0]["reserved"] == 1  # the forced one, allocated and reserved
    refused(dsipam("pool", "unreserve", "res", "198.18.0.3", target=target), 1, "not reserved")
    with IpamClient(target, timeout=WAIT) as ipam:
        ipam.release("res", "a")  # .1 is free now, but reserved
        got = {str(ipam.allocate("res", f"n{i}").allocation.ipv4.ip) for i in range(5)}
    assert got == {f"198.18.0.{i}" for i in range(2, 7)}  # everything but the reserved .1


# -- ranges and migration ---------------------------------------------------------------------------


def test_add_range_migrate_and_remove_range(target: str) -> None:
    with IpamClient(target, timeout=WAIT) as ipam:
        ipam.create_pool("mig", "198.18.0.0/24")
        before = {f"o{i}": ipam.allocate("mig", f"o{i}").allocation.ipv4 for i in range(5)}
        ipam.create_pool("short", ["198.18.1.0/24", Range("fd00:1::/120", first="fd00:1::1", last="fd00:1::2")])
        for i in range(4):
            ipam.allocate("short", f"s{i}")

    doc = json.loads(ok(dsipam("pool", "add-range", "mig", "--range", "fd00::/120", "--first", "fd00::10",
                               "--range", "198.18.9.0/24", "-o", "json", target=target)))
    assert [(r["cidr"], r["first"]) for r in doc["ranges"]] == [("198.18.0.0/24", None), ("fd00::/120", "fd00::10"),
                                                                ("198.18.9.0/24", None)]
    refused(dsipam("pool", "add-range", "mig", "--range", "198.18.0.128/25", target=target), 1, "INVALID_ARGUMENT",
            "overlaps")
    refused(dsipam("pool", "add-range", "mig", "--gateway", "198.18.3.1", target=target), 2, "--range")

    lines = ok(dsipam("pool", "migrate", "mig", "--batch-size", "2", target=target)).splitlines()
    assert lines == [
        "processed 2 of 5: 2 upgraded, 0 failed",
        "processed 4 of 5: 4 upgraded, 0 failed",
        "processed 5 of 5: 5 upgraded, 0 failed",
        "migrated pool mig to PreferDualStack: 5 owner(s) processed, 5 upgraded, 0 failed",
    ]
    with IpamClient(target, timeout=WAIT) as ipam:
        after = list(ipam.iter_allocations("mig"))
    assert {a.owner: a.ipv4 for a in after} == before and all(a.ipv6 for a in after)
    again = json.loads(ok(dsipam("pool", "migrate", "mig", "--policy", "require", "-o", "json", target=target)))
    assert again == {"pool": "mig", "policy": "RequireDualStack", "total": 5, "processed": 5, "upgraded": 0,
                     "failed": 0, "errors": []}

    failed = dsipam("pool", "migrate", "short", "--policy", "require", target=target)
    line = refused(failed, 1, "migration of pool short incomplete", "2 of 4 owner(s) failed", "s2:")
    assert "[" not in line.split("first:")[0]  # not dressed as a server reason
    out = failed.stdout.splitlines()
    assert [x.split(": ")[1] for x in out if x.startswith("  failed: ")] == ["s2", "s3"]
    assert out[-1] == "migrated pool short to RequireDualStack: 4 owner(s) processed, 2 upgraded, 2 failed"
    refused(dsipam("pool", "migrate", "missing", target=target), 1, "POOL_NOT_FOUND")
    refused(dsipam("pool", "migrate", "mig", "--policy", "single", target=target), 2, "invalid choice")

    refused(dsipam("pool", "remove-range", "mig", "fd00::/120", target=target), 1, "ADDRESS_ALLOCATED", "fd00::/120")
    refused(dsipam("pool", "remove-range", "mig", "fd00:9::/120", target=target), 1, "RANGE_NOT_FOUND")
    refused(dsipam("pool", "remove-range", "mig", "fd00::1/120", target=target), 2, "cidr")
    out = ok(dsipam("pool", "remove-range", "mig", "198.18.9.0/24", target=target))
    assert "198.18.9.0/24" not in out and "fd00::/120" in out


# -- allocations with nodes, filtered lists, blocks and nodes --------------------------------------------


def test_alloc_node_filters_blocks_and_node_release(target: str) -> None:
    ok(dsipam("pool", "create", "aff", "--range", "198.18.0.0/24", "--range", "fd00::/120", "--cooldown", "0",
              target=target))
    out = ok(dsipam("alloc", "aff", "web-1", "--node", "node-a", "--policy", "require", "--attr", "app=web",
                    target=target))
    assert field(out, "Node") == "node-a"
    doc = json.loads(ok(dsipam("alloc", "aff", "db-1", "--node", "node-b", "--family", "ipv6", "--attr", "app=db",
                               "-o", "json", target=target)))
    assert (doc["allocation"]["node"], doc["allocation"]["borrowed"]) == ("node-b", False)
    ok(dsipam("alloc", "aff", "web-2", "--family", "ipv4", "--attr", "app=web", target=target))

    rows = ok(dsipam("alloc", "list", "aff", "--selector", "app=web", target=target)).splitlines()
    assert rows[0].split() == ["OWNER", "IPV4", "IPV6", "NODE", "CREATED"]
    assert [r.split()[0] for r in rows[1:-1]] == ["web-1", "web-2"]
    assert rows[1].split()[3] == "node-a" and rows[2].split()[2:4] == ["-", "-"]
    listed = json.loads(ok(dsipam("alloc", "list", "aff", "--family", "ipv6", "-o", "json", target=target)))
    assert [a["owner"] for a in listed["allocations"]] == ["db-1", "web-1"]
    assert [a["node"] for a in listed["allocations"]] == ["node-b", "node-a"]
    assert ok(dsipam("alloc", "list", "aff", "--selector", "app=none", target=target)).strip() == (
        "no allocations in pool aff match")
    refused(dsipam("alloc", "list", "aff", "--selector", "novalue", target=target), 2, "KEY=VALUE")

    with IpamClient(target, timeout=WAIT) as ipam:
        blocks = list(ipam.iter_blocks("aff"))
    table = ok(dsipam("blocks", "aff", target=target)).splitlines()
    assert table[0].split() == ["CIDR", "FAMILY", "NODE", "USED", "FREE"]
    assert sorted(tuple(r.split()) for r in table[1:]) == sorted(
        (str(b.cidr), b.family.label, b.node or "-", str(b.used), str(b.free)) for b in blocks)
    mine = json.loads(ok(dsipam("blocks", "aff", "--node", "node-a", "-o", "json", target=target)))
    assert mine["pool"] == "aff" and mine["node"] == "node-a"
    assert sorted((b["family"], b["node"], b["used"]) for b in mine["blocks"]) == [("ipv4", "node-a", 1),
                                                                                  ("ipv6", "node-a", 1)]
    assert list(mine["blocks"][0]) == ["cidr", "family", "node", "used", "free"]
    assert ok(dsipam("blocks", "aff", "--node", "node-z", target=target)).strip() == "no blocks of node node-z in pool aff"

    ok(dsipam("release", "aff", "db-1", target=target))
    out = ok(dsipam("node", "release", "aff", "node-b", target=target)).strip()
    node_b = [str(b.cidr) for b in blocks if b.node == "node-b"]
    assert out == f"released 1 empty block(s) of node node-b in aff: {node_b[0]}"
    kept = json.loads(ok(dsipam("node", "release", "aff", "node-a", "-o", "json", target=target)))
    assert (kept["pool"], kept["node"], kept["released"]) == ("aff", "node-a", [])
    assert sorted(b["family"] for b in kept["kept"]) == ["ipv4", "ipv6"]
    text = ok(dsipam("node", "release", "aff", "node-a", target=target))
    assert text.startswith("released 0 empty block(s) of node node-a in aff\nkept 2 block(s)")
    refused(dsipam("node", "release", "aff", "", target=target), 1, "INVALID_ARGUMENT", "node")
    refused(dsipam("blocks", "missing", target=target), 1, "POOL_NOT_FOUND")


def test_alloc_list_marks_borrowed_addresses(target: str) -> None:
    ok(dsipam("pool", "create", "tight", "--range", "198.18.0.0/26", target=target))  # one block
    ok(dsipam("alloc", "tight", "a", "--node", "node-a", target=target))
    out = ok(dsipam("alloc", "tight", "b", "--node", "node-b", target=target))
    assert field(out, "Node") == "node-b (borrowed)"
    rows = ok(dsipam("alloc", "list", "tight", target=target)).splitlines()
    assert "node-b (borrowed)" in rows[2] and "borrowed" not in rows[1]
    ok(dsipam("pool", "update", "tight", "--node-affinity", "strict", target=target))
    refused(dsipam("alloc", "tight", "c", "--node", "node-c", target=target), 1, "POOL_EXHAUSTED", "node-c")


# -- watch ----------------------------------------------------------------------------------------------------


class Lines:
    """The stdout lines of a running process, read by a thread (no blocking reads in the test)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=lambda: ([self.queue.put(x) for x in stdout], self.queue.put(None)),
                         daemon=True).start()

    def next(self) -> str:
        line = self.queue.get(timeout=WAIT)
        assert line is not None, "dsipam watch ended"
        return line.rstrip("\n")


def _interruptible() -> None:
    """In the child before exec: Ctrl-C as a terminal would deliver it, even when the test runs with
    SIGINT ignored (`nohup scripts/test &`, which the child would inherit)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_watch(target: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([DSIPAM, "watch", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(target), preexec_fn=_interruptible)


def test_watch_prints_json_lines_and_a_resume_token_on_ctrl_c(target: str) -> None:
    ok(dsipam("pool", "create", "w", "--range", "198.18.0.0/24", "--range", "fd00::/120", "--cooldown", "0",
              target=target))
    watcher = spawn_watch(target, "w", "--bookmarks", "-o", "json")
    try:
        lines = Lines(watcher)
        first = json.loads(lines.next())
        assert first["type"] == "bookmark" and first["resume_token"] and first["owner"] is None  # it is watching
        with IpamClient(target, timeout=WAIT) as ipam:
            a = ipam.allocate("w", "a", policy="require").allocation
            b = ipam.allocate("w", "b", families="ipv6").allocation
            ipam.release("w", "a")
        events = []
        while len(events) < 3:
            doc = json.loads(lines.next())  # JSON lines: one document per line
            if doc["type"] != "bookmark":
                events.append(doc)
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
        watcher.wait()
    assert [(e["type"], e["owner"]) for e in events] == [("allocated", "a"), ("allocated", "b"), ("released", "a")]
    assert [x["ip"] for x in events[0]["addresses"]] == [str(x.ip) for x in a.addresses]
    assert [x["ip"] for x in events[1]["addresses"]] == [str(b.ipv6.ip)]
    assert list(events[0]) == ["type", "owner", "addresses", "time", "resume_token"]
    assert all(e["resume_token"] and re.fullmatch(r"\d{4}-.*Z", e["time"]) for e in events)

    # Ctrl-C: exit 130, one line with the token to resume from, which misses nothing
    assert watcher.returncode == 130, err
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    token = re.fullmatch(r"dsipam: interrupted; resume with --resume-token (\S+)", line)
    assert token, line
    with IpamClient(target, timeout=WAIT) as ipam:
        ipam.allocate("w", "c")
    resumed = json.loads(ok(dsipam("watch", "w", "--resume-token", token[1], "--count", "1", "-o", "json",
                                   target=target)))
    assert (resumed["type"], resumed["owner"]) == ("allocated", "c")

    # from the first event's token: the ones after it, one line each, then exit 0 (--count)
    out = ok(dsipam("watch", "w", "--resume-token", events[0]["resume_token"], "--count", "2", target=target))
    rows = out.splitlines()
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\dZ  allocated  b  {re.escape(str(b.ipv6.interface))}",
                        rows[0]), rows
    assert re.fullmatch(r"\S+ \S+  released   a  198\.18\.0\.\d+/24, fd00::\S*/120", rows[1]), rows
    bookmark = ok(dsipam("watch", "w", "--bookmarks", "--count", "1", target=target)).strip()
    assert re.fullmatch(r"-  bookmark  resume-token=\S+", bookmark)

    refused(dsipam("watch", "missing", target=target), 1, "POOL_NOT_FOUND")
    refused(dsipam("watch", "w", "--resume-token", "junk", "--count", "1", target=target), 1, "INVALID_ARGUMENT",
            "resume_token")
    refused(dsipam("watch", "w", "--count", "0", target=target), 2, "--count")


def test_watch_ctrl_c_works_when_the_test_runs_with_sigint_ignored(target: str) -> None:
    """Regression: run with SIGINT ignored (as under `nohup scripts/test &`), the watch child inherited
    the ignored signal, never saw the test's Ctrl-C and the test hung."""
    ok(dsipam("pool", "create", "w", "--range", "198.18.0.0/24", target=target))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        watcher = spawn_watch(target, "w", "--bookmarks", "-o", "json")
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        lines = Lines(watcher)
        assert json.loads(lines.next())["type"] == "bookmark"  # it is watching: Python's handlers are set
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=20)
    finally:
        watcher.kill()
        watcher.wait()
    assert watcher.returncode == 130, err
    assert re.fullmatch(r"dsipam: interrupted; resume with --resume-token \S+", err.strip()), err


@pytest.mark.parametrize("command", [["pool", "update", "--help"], ["watch", "--help"], ["blocks", "--help"]])
def test_new_commands_have_help(command: list[str]) -> None:
    out = ok(dsipam(*command))
    assert out.startswith("usage: dsipam")
