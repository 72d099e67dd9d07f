"""The ``dsipam`` admin CLI as a subprocess against a real server: tables, JSON and YAML output,
per-range options, the alloc forms, exit codes (2 usage, 1 refusals), one-line errors,
progress on a terminal, lazy imports, and serve/migrate/fsck still in place. The lifecycle,
node and watch commands are in test_cli_lifecycle.py."""

from __future__ import annotations

import ipaddress
import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsipam.client import IpamClient, Range

DSIPAM = str(Path(sys.executable).with_name("dsipam"))

WAIT = 30.0  # deadline of the tests' calls: generous, for a loaded machine


def dsipam(*args: str, target: str | None = None, env: dict[str, str] | None = None,
           stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs the real command; DSIPAM_* variables come only from ``target`` and ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}
    base["DSIPAM_TIMEOUT"] = str(WAIT)
    if target is not None:
        base["DSIPAM_TARGET"] = target
    return subprocess.run([DSIPAM, *args], capture_output=True, text=True, timeout=60, input=stdin,
                          env={**base, **(env or {})})


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


def create_dual(target: str, name: str = "pods") -> None:
    ok(dsipam("pool", "create", name,
              "--range", "198.18.0.0/24", "--gateway", "198.18.0.1", "--exclude", "198.18.0.128/25",
              "--exclude", "198.18.0.5",
              "--range", "fd00::/120", "--first", "fd00::10", "--last", "fd00::ff", "--block-size", "16",
              "--label", "env=dev", target=target))


# -- pools --------------------------------------------------------------------------------------


def test_pool_create_attaches_options_to_the_preceding_range(target: str) -> None:
    create_dual(target)
    with IpamClient(target, timeout=WAIT) as ipam:
        pool = ipam.get_pool("pods")
    v4, v6 = pool.ranges
    assert (str(v4.cidr), str(v4.gateway), v4.first, v4.last) == ("198.18.0.0/24", "198.18.0.1", None, None)
    assert sorted(map(str, v4.exclude)) == ["198.18.0.128/25", "198.18.0.5/32"]
    assert (str(v6.cidr), v6.gateway, str(v6.first), str(v6.last), v6.block_size) == (
        "fd00::/120", None, "fd00::10", "fd00::ff", 16)
    assert dict(pool.labels) == {"env": "dev"}


def test_pool_show_table_has_size_allocated_free_and_a_bar_per_family(target: str) -> None:
    create_dual(target)
    for owner in ("a", "b", "c"):
        ok(dsipam("alloc", "pods", owner, "--policy", "require", target=target))
    ok(dsipam("alloc", "pods", "v6-only", "--family", "ipv6", target=target))
    out = ok(dsipam("pool", "show", "pods", target=target))
    assert re.search(r"^Pool:\s+pods$", out, re.M) and re.search(r"^Labels:\s+env=dev$", out, re.M)
    assert re.search(r"^\s+198\.18\.0\.0/24\s+-\s+-\s+198\.18\.0\.1\s+198\.18\.0\.128/25,198\.18\.0\.5/32\s+64$", out,
                     re.M), out
    assert re.search(r"^\s+fd00::/120\s+fd00::10\s+fd00::ff\s+-\s+-\s+16$", out, re.M), out
    assert re.search(r"^\s+FAMILY\s+SIZE\s+ALLOCATED\s+COOLDOWN\s+RESERVED\s+FREE\s+UTILISATION$", out, re.M), out
    usage = {m[0]: m[1:] for m in re.findall(
        r"^\s+(IPv[46])\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+\[(.+)\]\s+([\d.]+)%$", out, re.M)}
    with IpamClient(target, timeout=WAIT) as ipam:
        pool = ipam.get_pool("pods")
    for u in pool.usage:
        size, allocated, cooldown, reserved, free, bar, percent = usage[u.family.label]
        assert (int(size), int(allocated), int(cooldown), int(reserved), int(free)) == (
            u.size, u.allocated, u.cooldown, u.reserved, u.free)
        assert len(bar) == 20 and bar != bar[0] * 20  # something of each is in use: a partly filled bar
        assert float(percent) == pytest.approx(u.allocated / u.size * 100, abs=0.05)
    assert usage["IPv4"][1] == "3" and usage["IPv6"][1] == "4"


def test_pool_list_and_show_json_are_stable_documents(target: str) -> None:
    create_dual(target)
    ok(dsipam("pool", "create", "v4", "--range", "198.18.1.0/24", target=target))
    listed = json.loads(ok(dsipam("pool", "list", "-o", "json", target=target)))
    assert list(listed) == ["pools"] and [p["name"] for p in listed["pools"]] == ["pods", "v4"]
    shown = json.loads(ok(dsipam("pool", "show", "pods", "--output", "json", target=target)))
    assert shown == listed["pools"][0]
    assert list(shown) == ["name", "ranges", "labels", "usage", "create_time", "cooldown", "node_affinity",
                           "reservations", "network"]
    assert (shown["cooldown"], shown["node_affinity"], shown["reservations"], shown["network"]) == (
        30, "borrow", [], "")
    assert shown["ranges"][0] == {"cidr": "198.18.0.0/24", "family": "ipv4", "first": None, "last": None,
                                  "gateway": "198.18.0.1", "exclude": ["198.18.0.128/25", "198.18.0.5/32"],
                                  "block_size": 64}
    assert shown["ranges"][1]["first"] == "fd00::10" and shown["ranges"][1]["block_size"] == 16
    assert shown["labels"] == {"env": "dev"}
    assert [list(u) for u in shown["usage"]] == [["family", "size", "allocated", "free", "utilisation", "cooldown",
                                                  "reserved"]] * 2
    assert shown["usage"][0] == {"family": "ipv4", "size": 125, "allocated": 0, "free": 125, "utilisation": 0.0,
                                 "cooldown": 0, "reserved": 0}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", shown["create_time"])
    table = ok(dsipam("pool", "list", target=target)).splitlines()
    assert table[0].split() == ["NAME", "RANGES", "IPV4", "USED", "IPV6", "USED", "CREATED"]
    assert table[1].split()[:4] == ["pods", "198.18.0.0/24", "fd00::/120", "0/125"]
    assert table[2].split()[:3] == ["v4", "198.18.1.0/24", "0/254"] and " - " in table[2]
    assert yaml.safe_load(ok(dsipam("pool", "list", "-o", "yaml", target=target))) == listed
    # Pools of one network never overlap; --network puts a pool in an address space of its own.
    refused(dsipam("pool", "create", "twin", "--range", "198.18.0.0/25", target=target), 1, "[POOLS_OVERLAP]",
            "overlaps 198.18.0.0/24 of pool 'pods'")
    twin = json.loads(ok(dsipam("pool", "create", "twin", "--range", "198.18.0.0/25", "--network", "lab", "-o",
                                "json", target=target)))
    assert twin["network"] == "lab"
    assert "Network:        lab" in ok(dsipam("pool", "show", "twin", target=target))


def test_pool_delete_refuses_while_allocations_exist_unless_forced(target: str) -> None:
    create_dual(target)
    ok(dsipam("alloc", "pods", "a", target=target))
    refused(dsipam("pool", "delete", "pods", target=target), 1, "POOL_HAS_ALLOCATIONS", "pods")
    assert ok(dsipam("pool", "delete", "pods", "--force", target=target)).strip() == "deleted pool pods"
    refused(dsipam("pool", "show", "pods", target=target), 1, "POOL_NOT_FOUND")
    assert json.loads(ok(dsipam("pool", "list", "-o", "json", target=target))) == {"pools": []}
    assert ok(dsipam("pool", "list", target=target)).strip() == "no pools"


# -- allocations ---------------------------------------------------------------------------------


def test_alloc_forms_and_outputs(target: str) -> None:
    create_dual(target)
    first = json.loads(ok(dsipam("alloc", "pods", "c1/eth0", "--policy", "require", "--family", "ipv6",
                                 "--family", "ipv4", "--attr", "ns=default", "-o", "json", target=target)))
    assert list(first) == ["allocation", "created"] and first["created"] is True
    alloc = first["allocation"]
    assert list(alloc) == ["pool", "owner", "addresses", "attributes", "create_time", "node", "borrowed"]
    assert (alloc["node"], alloc["borrowed"]) == (None, False)
    assert [a["family"] for a in alloc["addresses"]] == ["ipv6", "ipv4"]
    assert list(alloc["addresses"][0]) == ["family", "ip", "prefix_length", "gateway"]
    v6, v4 = alloc["addresses"]
    assert ipaddress.ip_address(v4["ip"]) in ipaddress.ip_network("198.18.0.0/24")
    assert (v4["prefix_length"], v4["gateway"], v6["gateway"]) == (24, "198.18.0.1", None)
    assert alloc["attributes"] == {"ns": "default"}

    again = json.loads(ok(dsipam("alloc", "new", "pods", "c1/eth0", "--policy", "require", "-o", "json",
                                 target=target)))
    assert again["created"] is False
    assert {a["ip"] for a in again["allocation"]["addresses"]} == {v4["ip"], v6["ip"]}

    table = ok(dsipam("alloc", "pods", "c2/eth0", "--ip", "198.18.0.42", target=target))
    assert re.search(r"^Result:\s+allocated$", table, re.M)
    assert re.search(r"^IPv4:\s+198\.18\.0\.42/24 via 198\.18\.0\.1$", table, re.M)

    # a pool named like a subcommand needs the explicit form
    ok(dsipam("pool", "create", "list", "--range", "198.18.3.0/24", target=target))
    assert "198.18.3." in ok(dsipam("alloc", "new", "list", "owner", target=target))

    shown = ok(dsipam("alloc", "show", "pods", "c1/eth0", target=target))
    assert re.search(rf"^IPv4:\s+{re.escape(v4['ip'])}/24 via 198\.18\.0\.1$", shown, re.M)
    assert re.search(rf"^IPv6:\s+{re.escape(v6['ip'])}/120$", shown, re.M)
    assert re.search(r"^Attributes:\s+ns=default$", shown, re.M)
    as_json = json.loads(ok(dsipam("alloc", "show", "pods", "c1/eth0", "-o", "json", target=target)))
    assert as_json["owner"] == "c1/eth0" and {a["ip"] for a in as_json["addresses"]} == {v4["ip"], v6["ip"]}
    assert yaml.safe_load(ok(dsipam("alloc", "show", "pods", "c1/eth0", "-o", "yaml", target=target))) == as_json

    listed = json.loads(ok(dsipam("alloc", "list", "pods", "-o", "json", target=target)))
    assert list(listed) == ["pool", "allocations"] and listed["pool"] == "pods"
    assert [a["owner"] for a in listed["allocations"]] == ["c1/eth0", "c2/eth0"]
    assert yaml.safe_load(ok(dsipam("alloc", "list", "pods", "-o", "yaml", target=target))) == listed
    rows = ok(dsipam("alloc", "list", "pods", target=target)).splitlines()
    assert rows[0].split() == ["OWNER", "IPV4", "IPV6", "NODE", "CREATED"]
    assert rows[1].split()[:4] == ["c1/eth0", f"{v4['ip']}/24", f"{v6['ip']}/120", "-"]
    assert rows[2].split()[:4] == ["c2/eth0", "198.18.0.42/24", "-", "-"]
    assert rows[-1] == "(2 allocations)"


def test_release_by_family_and_idempotent(target: str) -> None:
    create_dual(target)
    got = json.loads(ok(dsipam("alloc", "pods", "o", "--policy", "require", "-o", "json", target=target)))
    v4 = next(a for a in got["allocation"]["addresses"] if a["family"] == "ipv4")
    out = json.loads(ok(dsipam("release", "pods", "o", "--family", "ipv4", "-o", "json", target=target)))
    assert out == {"pool": "pods", "owner": "o", "released": [v4]}
    text = ok(dsipam("release", "pods", "o", target=target)).strip()
    assert text.startswith("released fd00::") and text.endswith("held by o in pods")
    assert ok(dsipam("release", "pods", "o", target=target)).strip() == "o held nothing to release in pods"
    refused(dsipam("alloc", "show", "pods", "o", target=target), 1, "ALLOCATION_NOT_FOUND")


def test_gc_releases_owners_that_are_not_kept(target: str) -> None:
    create_dual(target)
    for owner in ("live", "gone-1", "gone-2"):
        ok(dsipam("alloc", "pods", owner, target=target))
    refused(dsipam("gc", "pods", target=target), 2, "--keep")
    out = json.loads(ok(dsipam("gc", "pods", "--keep-file", "-", "--grace", "0", "-o", "json", target=target,
                               stdin="live\n")))
    assert sorted(a["owner"] for a in out["released"]) == ["gone-1", "gone-2"]
    assert ok(dsipam("gc", "pods", "--keep", "live", "--grace", "0", target=target)).strip() == "released nothing"


# -- exit codes and errors ------------------------------------------------------------------------


def test_usage_errors_exit_2_with_one_line(target: str) -> None:
    refused(dsipam(target=target), 2, "required")
    refused(dsipam("bogus", target=target), 2, "invalid choice")
    refused(dsipam("pool", "create", "p", target=target), 2, "--range")
    refused(dsipam("pool", "create", "p", "--gateway", "198.18.0.1", "--range", "198.18.0.0/24", target=target), 2,
            "--gateway", "must follow the --range")
    refused(dsipam("pool", "create", "p", "--range", "198.18.0.0/24", "--first", "198.18.0.2", "--first",
                   "198.18.0.3", target=target), 2, "given twice")
    refused(dsipam("pool", "create", "p", "--range", "198.18.0.1/24", target=target), 2, "198.18.0.1/24", "cidr")
    refused(dsipam("pool", "create", "p", "--range", "198.18.0.0/24", "--gateway", "nope", target=target), 2,
            "gateway")
    refused(dsipam("pool", "create", "p", "--range", "198.18.0.0/24", "--label", "novalue", target=target), 2,
            "KEY=VALUE")
    refused(dsipam("alloc", "pods", "o", "--policy", "dual", target=target), 2, "invalid choice")
    refused(dsipam("alloc", "pods", "o", "--ip", "198.18.0.300", target=target), 2, "addresses[0]")
    refused(dsipam("--target", "no-port", "pool", "list"), 2, "target")
    refused(dsipam("--timeout", "-1", "pool", "list", target=target), 2, "--timeout")
    refused(dsipam("pool", "list", target=target, env={"DSIPAM_OUTPUT": "xml"}), 2, "DSIPAM_OUTPUT")
    with IpamClient(target, timeout=WAIT) as ipam:
        assert list(ipam.list_pools()) == []  # nothing reached the server


def test_server_refusals_exit_1_with_the_reason(target: str) -> None:
    create_dual(target)
    ok(dsipam("pool", "create", "one", "--range", "198.18.2.0/24", "--first", "198.18.2.9", "--last", "198.18.2.9",
              target=target))
    ok(dsipam("alloc", "one", "holder", target=target))
    refused(dsipam("alloc", "one", "another", target=target), 1, "POOL_EXHAUSTED", "'one'")
    refused(dsipam("pool", "create", "pods", "--range", "198.18.9.0/24", target=target), 1, "POOL_ALREADY_EXISTS")
    refused(dsipam("pool", "show", "missing", target=target), 1, "POOL_NOT_FOUND", "'missing'")
    refused(dsipam("alloc", "list", "missing", target=target), 1, "POOL_NOT_FOUND")
    refused(dsipam("pool", "show", "Not_A_Label", target=target), 1, "INVALID_ARGUMENT", "name")
    refused(dsipam("alloc", "one", "x", "--ip", "198.18.2.9", target=target), 1, "ADDRESS_IN_USE")
    refused(dsipam("alloc", "one", "x", "--family", "ipv6", target=target), 1, "FAMILY_NOT_IN_POOL")
    line = refused(dsipam("--timeout", "1", "pool", "list", target="127.0.0.1:9"), 1, "cannot reach 127.0.0.1:9",
                   "[UNAVAILABLE]")
    assert "attempts" in line
    debug = dsipam("--debug", "pool", "show", "missing", target=target)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "PoolNotFound" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("dsipam: ")


# -- progress, imports, and the server's own subcommands ------------------------------------------------


def _run_with_terminal_stderr(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Runs with stderr on a pseudo-terminal and stdout on a pipe; returns (code, stdout, terminal)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            data = os.read(leader, 4096)
        except OSError:  # the follower side closed
            break
        if not data:
            break
        chunks.append(data)
    out, _ = proc.communicate(timeout=60)
    os.close(leader)
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def test_alloc_list_pages_with_progress_on_a_terminal_only(target: str) -> None:
    with IpamClient(target, timeout=WAIT) as ipam:
        ipam.create_pool("big", [Range("198.18.0.0/22"), "fd00::/118"])
        owners = [f"pod-{i:03d}" for i in range(120)]
        for owner in owners:
            ipam.allocate("big", owner, policy="require")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}, "DSIPAM_TARGET": target,
           "DSIPAM_TIMEOUT": str(WAIT)}
    code, out, terminal = _run_with_terminal_stderr([DSIPAM, "alloc", "list", "big", "--page-size", "25", "-o", "json"],
                                                    env)
    assert code == 0
    assert [a["owner"] for a in json.loads(out)["allocations"]] == owners  # stdout stays clean JSON
    assert "listing allocations of big" in terminal and "of about 120" in terminal
    assert "\r" in terminal and terminal.rstrip().endswith("\x1b[2K")  # the line is cleared at the end
    piped = dsipam("alloc", "list", "big", "--page-size", "25", target=target)
    assert piped.returncode == 0 and piped.stderr == ""  # no progress when stderr is not a terminal
    assert piped.stdout.splitlines()[-1] == "(120 allocations)"


@pytest.mark.parametrize("code", [
    "from dsipam.server.cli import main; main(['--help'])",
    "from dsipam.client._cli import main; main(['pool', 'create', '--help'])",
])
def test_help_does_not_import_grpc(code: str) -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "argparse" in imported
    assert not [m for m in imported if m.split(".")[0] in ("grpc", "google", "sqlalchemy", "asyncpg")], imported


def test_serve_migrate_and_fsck_still_work(target: str, db_url: str) -> None:
    create_dual(target)
    ok(dsipam("alloc", "pods", "a", "--policy", "require", target=target))
    out = ok(dsipam("fsck", "pods", "--database-url", db_url))
    assert out.strip().endswith("fsck pods: clean")
    for command, flag in (("serve", "--listen"), ("migrate", "--revision"), ("fsck", "--database-url")):
        assert flag in ok(dsipam(command, "--help"))
    client_only = subprocess.run([sys.executable, "-c", "from dsipam.client._cli import main; main(['--help'])"],
                                 capture_output=True, text=True, timeout=60)
    assert client_only.returncode == 0
    assert re.search(r"^\s+alloc\s", client_only.stdout, re.M)
    assert not re.search(r"^\s+serve\s", client_only.stdout, re.M)


def test_yaml_output_keeps_awkward_strings(target: str) -> None:
    ok(dsipam("pool", "create", "odd", "--range", "198.18.4.0/24", "--label", "note=x: y #z", target=target))
    attrs = ["--attr", "ip=fd00::", "--attr", "empty=", "--attr", "word=null", "--attr", "yes=no", "--attr",
             "when=2026-01-01T00:00:00Z", "--attr", "uni=é ✓", "--attr", "num=010"]
    as_yaml = yaml.safe_load(ok(dsipam("alloc", "odd", "o", *attrs, "-o", "yaml", target=target)))
    as_json = json.loads(ok(dsipam("alloc", "show", "odd", "o", "-o", "json", target=target)))
    assert as_yaml["allocation"] == as_json
    assert as_json["attributes"] == {"empty": "", "ip": "fd00::", "num": "010", "uni": "é ✓",
                                     "when": "2026-01-01T00:00:00Z", "word": "null", "yes": "no"}
    pool = yaml.safe_load(ok(dsipam("pool", "show", "odd", "-o", "yaml", target=target)))
    assert pool["labels"] == {"note": "x: y #z"}
