"""docs/sdk.md: the examples marked ``<!-- test: run ... -->`` run exactly as written against a
real server, and the controller example does what the text says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

from dsipam.client import IpamClient

DOC = ROOT / "docs" / "sdk.md"
MARKED = re.compile(r"<!-- test: run(?: (?P<name>[\w-]+))? -->\n```python\n(?P<code>.*?)\n```", re.S)

WAIT = 30.0  # deadline of the tests' calls: generous, for a loaded machine


def examples() -> dict[str, str]:
    found = {m["name"] or f"example-{i}": m["code"] for i, m in enumerate(MARKED.finditer(DOC.read_text()))}
    assert "controller" in found, "docs/sdk.md lost its controller example"
    return found


def run(code: str, target: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "example.py"
    script.write_text(code + "\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}, "DSIPAM_TARGET": target}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)


def test_the_controller_example_allocates_reconciles_and_releases(target: str, tmp_path: Path) -> None:
    out = run(examples()["controller"], target, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    pairs = [line.split() for line in lines if line.startswith("default/web-")]
    assert [p[0] for p in pairs] == [f"default/web-{i}/eth0" for i in range(6)]
    v4 = [p[1] for p in pairs]
    v6 = [p[2] for p in pairs]
    assert len(set(v4)) == len(set(v6)) == 6
    assert all(a.startswith("198.18.16.") and a.endswith("/24") for a in v4)
    assert all(a.startswith("fd00:16::") and a.endswith("/120") for a in v6)
    assert "reconciled: added ['default/api-0/eth0'], released ['default/web-0/eth0', 'default/web-1/eth0']" in lines
    # the watch saw every change once: six pairs and api-0's, two collected and five released
    assert lines[-2] == "watched: {'allocated': 7, 'released': 7}, cached owners: []"
    assert lines[-1] == "allocated now: {'IPv4': 0, 'IPv6': 0}"
    with IpamClient(target, timeout=WAIT) as ipam:
        pool = ipam.get_pool("web")
        assert dict(pool.labels) == {"managed-by": "web-controller"}
        assert list(ipam.iter_allocations("web")) == []
    # run again: the pool is found, not created, and the same story holds
    again = run(examples()["controller"], target, tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-2:] == ["watched: {'allocated': 7, 'released': 7}, cached owners: []",
                                              "allocated now: {'IPv4': 0, 'IPv6': 0}"]


@pytest.mark.parametrize("name", [n for n in examples() if n != "controller"])
def test_the_other_examples_run(name: str, target: str, tmp_path: Path) -> None:
    out = run(examples()[name], target, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
