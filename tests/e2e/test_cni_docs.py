"""docs/cni.md says what the plugin does: its example parses, its tables match the code."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ServerProcess
from test_cni_plugin import (  # noqa: F401 - fixtures
    Plugin,
    allocation,
    cni_server,
    ipam,
    netconf,
    plugin,
    plugin_dir,
    pool,
)

from dsipam.cni import _config, _errors
from dsipam.v1 import ipam_pb2_grpc

DOC = Path(__file__).resolve().parents[2] / "docs" / "cni.md"


def test_the_example_configuration_is_valid() -> None:
    text = DOC.read_text()
    example = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))  # type: ignore[union-attr]
    first = example["plugins"][0]
    cfg = _config.parse({"cniVersion": example["cniVersion"], "name": example["name"], **first})
    assert (cfg.pool, cfg.target, cfg.policy, cfg.families) == ("pods", "unix:///run/dsipam/dsipam.sock", 3, [1, 2])


def test_every_ipam_key_is_documented_and_read() -> None:
    text = DOC.read_text()
    table = text[text.index("| `ipam` key |"):text.index("Unknown keys")]
    documented = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, re.M):
        documented |= set(re.findall(r"`([A-Za-z]+)`", cell))
    source = inspect.getsource(_config)
    read = set(re.findall(r'"([A-Za-z]+)", "ipam\.\1"', source)) | set(re.findall(r'ipam\.get\("([A-Za-z]+)"', source))
    assert read - {"type"} == documented - {"ipam"}, (read, documented)


def test_every_error_code_is_documented() -> None:
    text = DOC.read_text()
    table = text[text.index("| code | when |"):text.index("## Authentication")]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)}
    in_code = {v for k, v in vars(_errors).items() if k.isupper() and isinstance(v, int)}
    used = in_code - {_errors.UNSUPPORTED_FIELD, _errors.UNKNOWN_CONTAINER, _errors.IO_FAILURE,
                      _errors.NOT_AVAILABLE_LIMITED}  # well-known codes the plugin never returns
    assert documented == used | {999}


# -- the commands of "GC in a bridge chain", run against a real server -------------------------

SECTION = ("### GC in a bridge chain", "## Errors")


def bridge_chain_blocks() -> list[str]:
    text = DOC.read_text()
    section = text[text.index(SECTION[0]):text.index(SECTION[1])]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def test_the_section_has_the_commands_tested_below() -> None:
    blocks = bridge_chain_blocks()
    assert len(blocks) == 2, blocks
    assert "CNI_COMMAND=GC" in blocks[0] and "crictl pods -q" in blocks[0]
    assert "dsipam node release" in blocks[1] and "dsipam release" in blocks[1]


def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)


def _env(tmp: Path, live: str | None, **extra: str) -> dict[str, str]:
    """PATH with a stand-in crictl (the runtime's CLI: prints the live sandbox IDs, or fails)
    and the virtualenv's dsipam admin CLI."""
    fake = tmp / "fakebin"
    fake.mkdir(exist_ok=True)
    crictl = fake / "crictl"
    crictl.write_text("#!/bin/sh\necho 'crictl: runtime down' >&2\nexit 1\n" if live is None
                      else f"#!/bin/sh\n[ \"$*\" = 'pods -q' ] || exit 2\nprintf '%s' '{live}'\n")
    crictl.chmod(0o755)
    return {"PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}", **extra}


@pytest.mark.skipif(shutil.which("jq") is None, reason="the documented commands use jq")
def test_per_node_gc_commands(tmp_path: Path, cni_server: tuple[ServerProcess, Path],  # noqa: F811
                              ipam: ipam_pb2_grpc.IpamServiceStub, plugin: Plugin,  # noqa: F811
                              plugin_dir: Path, pool: str) -> None:  # noqa: F811
    sock = cni_server[1]
    section = {"type": "dsipam", "endpoint": str(sock), "pool": pool, "node": "node-a",
               "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"], "timeout": 10, "gcGrace": 0}
    conflist = {"cniVersion": "1.0.0", "name": "docs-net", "plugins": [
        {"type": "bridge", "bridge": "dsipam0", "isGateway": True, "ipam": section},
        {"type": "portmap", "capabilities": {"portMappings": True}}]}
    conf_path = tmp_path / "90-dsipam.conflist"
    conf_path.write_text(json.dumps(conflist))

    def add(container: str, node: str = "node-a", name: str = "docs-net") -> str:
        conf = {"cniVersion": "1.0.0", "name": name, "type": "dsipam", "ipam": {**section, "node": node}}
        assert plugin("ADD", conf, container=container)[0] == 0
        return f"{container}/eth0"

    def held(*owners: str) -> dict[str, bool]:
        return {o: allocation(ipam, pool, o) is not None for o in owners}

    others = [add("elsewhere", node="node-b"), add("othernet", name="other-net")]
    live, gone = add("live1"), add("gone1")
    script = (bridge_chain_blocks()[0]
              .replace("/etc/cni/net.d/90-dsipam.conflist", str(conf_path))
              .replace("/run/dsipam-", f"{tmp_path}/dsipam-")
              .replace("/opt/cni/bin", str(plugin_dir)))
    assert "/etc/" not in script and "/run/" not in script and "/opt/" not in script, script

    # the runtime cannot be asked: the script stops, nothing is released
    proc = _run(script, _env(tmp_path, None))
    assert proc.returncode != 0 and "runtime down" in proc.stderr
    assert held(live, gone, *others) == dict.fromkeys([live, gone, *others], True)

    # live1 (and a sandbox without an allocation) are alive: gone1 goes, nothing else
    proc = _run(script, _env(tmp_path, "live1\nunrelated\n"))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), proc
    assert held(live, gone, *others) == {live: True, gone: False, others[0]: True, others[1]: True}

    # no pod left on the node: all of node-a's allocations of docs-net go
    proc = _run(script, _env(tmp_path, ""))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), proc
    assert held(live, *others) == {live: False, others[0]: True, others[1]: True}


@pytest.mark.skipif(shutil.which("jq") is None, reason="the documented commands use jq")
def test_gone_node_and_pool_wide_commands(tmp_path: Path, cni_server: tuple[ServerProcess, Path],  # noqa: F811
                                          ipam: ipam_pb2_grpc.IpamServiceStub, plugin: Plugin,  # noqa: F811
                                          pool: str) -> None:  # noqa: F811
    sock = cni_server[1]
    env = _env(tmp_path, "", DSIPAM_TARGET=cni_server[0].target)

    def add(container: str, node: str) -> str:
        conf = netconf(sock, pool, node=node)
        assert plugin("ADD", conf, container=container)[0] == 0
        return f"{container}/eth0"

    b1, b2, a1, a2 = add("b1", "node-b"), add("b2", "node-b"), add("a1", "node-a"), add("a2", "node-a")
    script = bridge_chain_blocks()[1].replace("POOL=pods", f"POOL={pool}")
    assert f"POOL={pool}" in script and "NODE=node-b" in script
    proc = _run(script, env)
    assert proc.returncode == 0, proc
    assert {o: allocation(ipam, pool, o) is not None for o in (b1, b2, a1, a2)} == {
        b1: False, b2: False, a1: True, a2: True}
    assert "node-b" in proc.stdout

    # dsipam gc POOL --keep-file OWNERS [--grace SECONDS], as the text gives it
    text = DOC.read_text()
    section = text[text.index(SECTION[0]):text.index(SECTION[1])]
    command = re.search(r"`(dsipam gc POOL --keep-file OWNERS \[--grace SECONDS\])`", section).group(1)  # type: ignore[union-attr]
    owners = tmp_path / "owners.txt"
    owners.write_text(f"{a1}\n")
    argv = command.replace("POOL", pool).replace("OWNERS", str(owners)).replace("[--grace SECONDS]", "--grace 0")
    proc = _run(argv, env)
    assert proc.returncode == 0, proc
    assert {o: allocation(ipam, pool, o) is not None for o in (a1, a2)} == {a1: True, a2: False}
