"""The installed ``dsipam`` CNI plugin, run as a container runtime runs it, against a real server.

The server listens on loopback and on a unix socket; the plugin is installed with
``python -m dsipam.cni install DIR`` and executed as ``DIR/dsipam`` with the CNI_* environment
and the network configuration on stdin. Both transports (the built-in HTTP/2 client and
grpcio) are exercised where they could differ.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support import ServerProcess, free_port, install_plugin, spawn_server

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

_pool_ids = itertools.count(1)
ERROR_KEYS = {"cniVersion", "code", "msg", "details"}


@pytest.fixture(scope="module")
def cni_server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("cni-server")
    sock = tmp / "dsipam.sock"
    server = spawn_server(db_url, tmp, args=("--listen", f"unix://{sock}"))
    yield server, sock
    server.terminate()


# Every test that runs the installed plugin runs twice: with the Python plugin's launcher and with
# the compiled plugin. They must behave alike: configuration, results, error codes and messages.
@pytest.fixture(scope="module", params=["python", "compiled"])
def plugin_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiled = request.getfixturevalue("compiled_plugin") if request.param == "compiled" else None
    return install_plugin(tmp_path_factory.mktemp(f"cni-bin-{request.param}"), compiled).parent


@pytest.fixture(scope="module")
def ipam(cni_server: tuple[ServerProcess, Path]) -> Iterator[ipam_pb2_grpc.IpamServiceStub]:
    with grpc.insecure_channel(cni_server[0].target) as channel:
        yield ipam_pb2_grpc.IpamServiceStub(channel)


def make_pool(stub: ipam_pb2_grpc.IpamServiceStub, v4: str = "198.18.0.0/24", v6: str = "fd00:1::/120",
              v4_gateway: str = "198.18.0.1", v6_gateway: str = "fd00:1::1") -> str:
    name = f"cni-{os.getpid()}-{next(_pool_ids)}"
    ranges = []
    if v4:
        ranges.append(pb.IpRange(cidr=v4, gateway=v4_gateway))
    if v6:
        ranges.append(pb.IpRange(cidr=v6, gateway=v6_gateway))
    stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name=name, ranges=ranges)))
    return name


@pytest.fixture
def pool(ipam: ipam_pb2_grpc.IpamServiceStub) -> Iterator[str]:
    name = make_pool(ipam)
    yield name
    ipam.DeletePool(pb.DeletePoolRequest(name=name, force=True))


def netconf(sock: Path | str, pool: str, version: str = "1.0.0", **ipam: object) -> dict:
    section = {"type": "dsipam", "endpoint": str(sock), "pool": pool, "ipFamilyPolicy": "RequireDualStack",
               "ipFamilies": ["IPv4", "IPv6"], "timeout": 5}
    section.update(ipam)
    return {"cniVersion": version, "name": "cni-test", "type": "dsipam", "ipam": section}


class Plugin:
    """Runs the installed plugin like a runtime: CNI_* in the environment, config on stdin."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, command: str, conf: dict | str | bytes | None, container: str | None = "c1",
                 ifname: str = "eth0", args: str = "", netns: str | None = "/var/run/netns/none",
                 **extra_env: str) -> tuple[int, object, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_PATH": str(self.path.parent)}
        if command:
            env["CNI_COMMAND"] = command
        if container is not None:
            env["CNI_CONTAINERID"] = container
        if ifname:
            env["CNI_IFNAME"] = ifname
        if netns is not None:
            env["CNI_NETNS"] = netns
        if args:
            env["CNI_ARGS"] = args
        env.update(extra_env)
        data = conf if isinstance(conf, (str, bytes)) else json.dumps(conf) if conf is not None else ""
        if isinstance(data, str):
            data = data.encode()
        proc = subprocess.run([str(self.path)], input=data, env=env, capture_output=True, timeout=60)
        out = proc.stdout.decode()
        parsed = json.loads(out) if out.strip() else None
        return proc.returncode, parsed, proc.stderr.decode()


@pytest.fixture(scope="module")
def plugin(plugin_dir: Path) -> Plugin:
    return Plugin(plugin_dir / "dsipam")


@pytest.fixture(params=["native", "grpc"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def assert_cni_error(rc: int, out: object, code: int) -> dict:
    """A valid CNI error: exit 1, one JSON object with cniVersion, code, msg (and maybe details)."""
    assert rc == 1, out
    assert isinstance(out, dict) and set(out) <= ERROR_KEYS and {"cniVersion", "code", "msg"} <= set(out), out
    assert isinstance(out["cniVersion"], str) and isinstance(out["msg"], str) and out["msg"]
    assert isinstance(out.get("details", ""), str)
    assert out["code"] == code, out
    return out


def allocation(stub: ipam_pb2_grpc.IpamServiceStub, pool: str, owner: str) -> pb.Allocation | None:
    try:
        return stub.GetAllocation(pb.GetAllocationRequest(pool=pool, owner=owner))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        return None


# -- install and VERSION --------------------------------------------------------------------


def is_compiled(plugin_dir: Path) -> bool:
    """Whether ``plugin_dir`` holds the compiled plugin (else the Python plugin's launcher)."""
    return plugin_dir.name.startswith("cni-bin-compiled")


def test_install_writes_a_fast_launcher_and_the_dsipam_link(plugin_dir: Path, request: pytest.FixtureRequest) -> None:
    launcher = plugin_dir / "dsipam-cni"
    assert os.access(launcher, os.X_OK)
    if is_compiled(plugin_dir):
        assert launcher.read_bytes() == request.getfixturevalue("compiled_plugin").read_bytes()
    else:
        assert launcher.read_text().splitlines()[0] == f"#!{sys.executable} -IS"
    assert (plugin_dir / "dsipam").resolve() == launcher.resolve()
    assert [p.name for p in plugin_dir.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_launcher_output_reaches_a_file_whole(plugin_dir: Path, tmp_path: Path) -> None:
    """The launcher ends the process without the interpreter's finalization (docs/cni.md): what
    the plugin printed must still be all there when stdout is a block-buffered file."""
    if not is_compiled(plugin_dir):
        assert "exit_now(main([]))" in (plugin_dir / "dsipam-cni").read_text()
    out = tmp_path / "out.json"
    env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": "VERSION"}
    with open(out, "wb") as f:
        proc = subprocess.run([str(plugin_dir / "dsipam")], input=b"{}", env=env, stdout=f, timeout=60)
    assert proc.returncode == 0
    assert "1.0.0" in json.loads(out.read_text())["supportedVersions"]


def _install_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dsipam.cni", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("args", [("install", "--help"), ("install", "-h"), ("--help",), ("-h",)])
def test_install_help_prints_usage_and_creates_nothing(tmp_path: Path, args: tuple[str, ...]) -> None:
    proc = _install_cli(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: dsipam-cni") and "install" in proc.stdout, proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ("install", "-x"), ("install", "-x", "bin"), ("install", "--pyton", "/usr/bin/python3", "bin"),
    ("install",), ("install", "a", "b"), ("install", "--python"), ("-x",), ("instal", "bin"),
    ("install", "--python", "/usr/bin/python 3", "bin"),
])
def test_install_usage_errors_exit_2_and_create_nothing(tmp_path: Path, args: tuple[str, ...]) -> None:
    proc = _install_cli(tmp_path, *args)
    assert proc.returncode == (1 if "/usr/bin/python 3" in args else 2), (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.startswith("usage: dsipam-cni") or "--python" in proc.stderr, proc.stderr
    if args[0] == "install" and proc.returncode == 2:  # the install usage, not the top level's
        assert proc.stderr.startswith("usage: dsipam-cni install "), proc.stderr
        assert "dsipam-cni install: error:" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_install_takes_a_dash_directory_after_double_dash(tmp_path: Path) -> None:
    proc = _install_cli(tmp_path, "install", "--", "-bin")
    assert proc.returncode == 0, proc.stderr
    assert os.access(tmp_path / "-bin" / "dsipam-cni", os.X_OK)
    assert (tmp_path / "-bin" / "dsipam").resolve() == (tmp_path / "-bin" / "dsipam-cni").resolve()


def test_version_lists_1_0_0_and_1_1_0(plugin: Plugin) -> None:
    rc, out, _ = plugin("VERSION", {"cniVersion": "1.0.0"}, container=None, ifname="", netns=None)
    assert rc == 0
    assert isinstance(out, dict) and {"1.0.0", "1.1.0"} <= set(out["supportedVersions"])
    assert out["cniVersion"] in out["supportedVersions"]


def test_console_script_is_the_same_plugin(plugin_dir: Path) -> None:
    script = Path(sys.executable).parent / "dsipam-cni"
    if not script.exists():
        pytest.skip("dsipam-cni console script not installed next to this interpreter")
    env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": "VERSION"}
    a = subprocess.run([str(script)], input=b"{}", env=env, capture_output=True, check=True)
    b = subprocess.run([str(plugin_dir / "dsipam")], input=b"{}", env=env, capture_output=True, check=True)
    assert json.loads(a.stdout) == json.loads(b.stdout)


# -- ADD ------------------------------------------------------------------------------------


def test_add_prints_the_result_and_is_idempotent(plugin: Plugin, cni_server: tuple[ServerProcess, Path],
                                                 ipam: ipam_pb2_grpc.IpamServiceStub, pool: str, transport: str) -> None:
    server, sock = cni_server
    endpoint = str(sock) if transport == "native" else f"unix://{sock}"
    dns = {"nameservers": ["198.18.0.53", "fd00:1::53"], "search": ["svc.example"]}
    conf = netconf(endpoint, pool, transport=transport, defaultRoutes=True, dns=dns,
                   routes=[{"dst": "198.19.0.0/16", "gw": "198.18.0.254"}, {"dst": "fd00:99::/64"}])
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-0"
    rc, out, err = plugin("ADD", conf, container="add1", args=args, K8S_NODE_NAME="node-from-env")
    assert rc == 0, (out, err)
    assert isinstance(out, dict) and out["cniVersion"] == "1.0.0"
    held = allocation(ipam, pool, "add1/eth0")
    assert held is not None
    assert out["ips"] == [{"address": f"{a.ip}/{a.prefix_length}", "gateway": a.gateway} for a in held.addresses]
    assert [ip["address"].split("/")[0].count(":") > 0 for ip in out["ips"]] == [False, True]  # IPv4 first
    assert [ip["gateway"] for ip in out["ips"]] == ["198.18.0.1", "fd00:1::1"]
    assert out["routes"] == [{"dst": "198.19.0.0/16", "gw": "198.18.0.254"}, {"dst": "fd00:99::/64"},
                             {"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
    assert out["dns"] == dns
    attrs = dict(held.attributes)
    assert attrs["cni.containerID"] == "add1" and attrs["cni.ifname"] == "eth0" and attrs["cni.network"] == "cni-test"
    assert attrs["k8s.namespace"] == "team-a" and attrs["k8s.pod"] == "web-0"
    assert attrs["cni.node"] == "node-from-env" and held.node == "node-from-env"  # the node affinity field

    rc, again, _ = plugin("ADD", conf, container="add1", args=args)
    assert rc == 0 and again == out
    usage = ipam.GetPool(pb.GetPoolRequest(name=pool)).usage
    assert [u.allocated for u in usage] == [1, 1]


def test_add_single_stack_and_routes_only_for_families_held(plugin: Plugin, cni_server: tuple[ServerProcess, Path],
                                                           pool: str) -> None:
    conf = netconf(cni_server[1], pool, ipFamilyPolicy="SingleStack", ipFamilies=["IPv6"], defaultRoutes=True,
                   routes=[{"dst": "198.19.0.0/16"}, {"dst": "fd00:99::/64"}])
    rc, out, _ = plugin("ADD", conf, container="single")
    assert rc == 0 and isinstance(out, dict)
    assert len(out["ips"]) == 1 and out["ips"][0]["address"].startswith("fd00:1::")
    assert out["routes"] == [{"dst": "fd00:99::/64"}, {"dst": "::/0"}]


@pytest.mark.parametrize("where", ["CNI_ARGS", "runtimeConfig", "args", "ipam.addresses", "everywhere"])
def test_add_takes_the_addresses_asked_for(plugin: Plugin, cni_server: tuple[ServerProcess, Path], pool: str,
                                           where: str) -> None:
    wanted = ["198.18.0.77", "fd00:1::77"]
    conf = netconf(cni_server[1], pool)
    args = ""
    if where == "CNI_ARGS":
        args = "IgnoreUnknown=1;IP=" + ",".join(wanted)
    elif where == "runtimeConfig":
        conf["runtimeConfig"] = {"ips": ["198.18.0.77/24", "fd00:1::77/120"]}
    elif where == "args":
        conf["args"] = {"cni": {"ips": wanted}}
    elif where == "ipam.addresses":
        conf["ipam"]["addresses"] = wanted
    else:  # the same addresses from every source, spelt differently: asked for once
        args = "IP=198.18.0.77, fd00:1:0::77"
        conf["runtimeConfig"] = {"ips": ["198.18.0.77/24", "fd00:1::77/120"]}
        conf["args"] = {"cni": {"ips": ["fd00:1::0077", "198.18.0.77"]}}
        conf["ipam"]["addresses"] = wanted
    rc, out, _ = plugin("ADD", conf, container="static", args=args)
    assert rc == 0, out
    assert isinstance(out, dict) and [ip["address"] for ip in out["ips"]] == ["198.18.0.77/24", "fd00:1::77/120"]
    # the address is taken: another container asking for it gets the plugin's "in use" error
    rc, out, _ = plugin("ADD", conf, container="static2", args=args)
    err = assert_cni_error(rc, out, 101)
    assert "198.18.0.77" in err["msg"]


def test_legacy_result_versions_carry_ip_version(plugin: Plugin, cni_server: tuple[ServerProcess, Path],
                                                 pool: str) -> None:
    rc, out, _ = plugin("ADD", netconf(cni_server[1], pool, version="0.3.1"), container="old")
    assert rc == 0 and isinstance(out, dict) and out["cniVersion"] == "0.3.1"
    assert [ip["version"] for ip in out["ips"]] == ["4", "6"]


# -- DEL ------------------------------------------------------------------------------------


def test_del_releases_and_repeats(plugin: Plugin, cni_server: tuple[ServerProcess, Path],
                                  ipam: ipam_pb2_grpc.IpamServiceStub, pool: str, transport: str) -> None:
    conf = netconf(cni_server[1], pool, transport=transport)
    rc, _, _ = plugin("ADD", conf, container="del1")
    assert rc == 0 and allocation(ipam, pool, "del1/eth0") is not None
    for _ in range(2):  # DEL, then a repeated DEL
        rc, out, err = plugin("DEL", conf, container="del1", netns=None)
        assert (rc, out) == (0, None), err
        assert allocation(ipam, pool, "del1/eth0") is None
    assert [u.allocated for u in ipam.GetPool(pb.GetPoolRequest(name=pool)).usage] == [0, 0]
    rc, out, _ = plugin("DEL", conf, container="never-added")
    assert (rc, out) == (0, None)


def test_del_from_a_pool_that_is_gone_succeeds(plugin: Plugin, cni_server: tuple[ServerProcess, Path],
                                               ipam: ipam_pb2_grpc.IpamServiceStub) -> None:
    name = make_pool(ipam)
    conf = netconf(cni_server[1], name)
    assert plugin("ADD", conf, container="gone")[0] == 0
    ipam.DeletePool(pb.DeletePoolRequest(name=name, force=True))
    assert plugin("DEL", conf, container="gone")[:2] == (0, None)


# -- CHECK ----------------------------------------------------------------------------------


def test_check_passes_until_the_allocation_changes(plugin: Plugin, cni_server: tuple[ServerProcess, Path],
                                                   ipam: ipam_pb2_grpc.IpamServiceStub, pool: str,
                                                   transport: str) -> None:
    conf = netconf(cni_server[1], pool, transport=transport)
    rc, result, _ = plugin("ADD", conf, container="chk")
    assert rc == 0 and isinstance(result, dict)
    assert plugin("CHECK", {**conf, "prevResult": result}, container="chk")[:2] == (0, None)

    other = json.loads(json.dumps(result))
    other["ips"][0]["address"] = "198.18.0.250/24"
    err = assert_cni_error(*plugin("CHECK", {**conf, "prevResult": other}, container="chk")[:2], 104)
    assert "198.18.0.250/24" in err["msg"]

    ipam.Release(pb.ReleaseRequest(pool=pool, owner="chk/eth0", ip_families=[pb.IP_FAMILY_IPV6]))
    assert_cni_error(*plugin("CHECK", {**conf, "prevResult": result}, container="chk")[:2], 104)
    assert plugin("DEL", conf, container="chk")[0] == 0
    assert_cni_error(*plugin("CHECK", {**conf, "prevResult": result}, container="chk")[:2], 103)
    assert_cni_error(*plugin("CHECK", conf, container="chk")[:2], 7)  # no prevResult


# -- GC -------------------------------------------------------------------------------------


def gc_conf(sock: Path, pool: str, valid: list[tuple[str, str]], **ipam: object) -> dict:
    conf = netconf(sock, pool, version="1.1.0", **ipam)
    conf["cni.dev/valid-attachments"] = [{"containerID": c, "ifname": i} for c, i in valid]
    return conf


def test_gc_pool_scope_releases_what_is_not_valid(plugin: Plugin, cni_server: tuple[ServerProcess, Path],
                                                  ipam: ipam_pb2_grpc.IpamServiceStub, pool: str,
                                                  transport: str) -> None:
    sock = cni_server[1]
    conf = netconf(sock, pool, version="1.1.0")
    for container in ("keep", "leak"):
        assert plugin("ADD", conf, container=container)[0] == 0
    ipam.Allocate(pb.AllocateRequest(pool=pool, owner="someone-else"))  # not ours, but the pool's

    # within the grace period nothing goes: an ADD may be in flight
    young = gc_conf(sock, pool, [("keep", "eth0")], gcScope="pool", gcGrace=3600, transport=transport)
    assert plugin("GC", young, container=None, ifname="", netns=None)[:2] == (0, None)
    assert allocation(ipam, pool, "leak/eth0") is not None

    conf = gc_conf(sock, pool, [("keep", "eth0")], gcScope="pool", gcGrace=0, transport=transport)
    assert plugin("GC", conf, container=None, ifname="", netns=None)[:2] == (0, None)
    assert allocation(ipam, pool, "keep/eth0") is not None
    assert allocation(ipam, pool, "leak/eth0") is None
    assert allocation(ipam, pool, "someone-else") is None


def test_gc_node_scope_leaves_other_nodes_and_networks(plugin: Plugin, cni_server: tuple[ServerProcess, Path],
                                                       ipam: ipam_pb2_grpc.IpamServiceStub, pool: str,
                                                       transport: str) -> None:
    sock = cni_server[1]
    here = netconf(sock, pool, version="1.1.0", node="node-a")
    assert plugin("ADD", here, container="keep")[0] == 0
    assert plugin("ADD", here, container="leak")[0] == 0
    assert plugin("ADD", netconf(sock, pool, version="1.1.0", node="node-b"), container="elsewhere")[0] == 0
    other_net = {**netconf(sock, pool, version="1.1.0", node="node-a"), "name": "other-net"}
    assert plugin("ADD", other_net, container="othernet")[0] == 0
    ipam.Allocate(pb.AllocateRequest(pool=pool, owner="not-cni"))

    conf = gc_conf(sock, pool, [("keep", "eth0")], node="node-a", gcGrace=0, transport=transport)
    assert plugin("GC", conf, container=None, ifname="", netns=None)[:2] == (0, None)
    assert allocation(ipam, pool, "leak/eth0") is None
    for owner in ("keep/eth0", "elsewhere/eth0", "othernet/eth0", "not-cni"):
        assert allocation(ipam, pool, owner) is not None, owner

    assert plugin("ADD", here, container="young")[0] == 0  # default grace (60 s) protects it
    conf = gc_conf(sock, pool, [("keep", "eth0")], node="node-a", transport=transport)
    assert plugin("GC", conf, container=None, ifname="", netns=None)[:2] == (0, None)
    assert allocation(ipam, pool, "young/eth0") is not None


def test_gc_needs_valid_attachments_and_1_1_0(plugin: Plugin, cni_server: tuple[ServerProcess, Path],
                                              pool: str) -> None:
    err = assert_cni_error(*plugin("GC", netconf(cni_server[1], pool, version="1.1.0"), container=None)[:2], 7)
    assert "cni.dev/valid-attachments" in err["msg"]
    assert_cni_error(*plugin("GC", gc_conf(cni_server[1], pool, []) | {"cniVersion": "1.0.0"})[:2], 1)


# -- STATUS ---------------------------------------------------------------------------------


def test_status(plugin: Plugin, cni_server: tuple[ServerProcess, Path], ipam: ipam_pb2_grpc.IpamServiceStub,
                tmp_path: Path, transport: str) -> None:
    sock = cni_server[1]
    tiny = make_pool(ipam, v4="198.18.1.0/30", v6="fd00:2::/126", v4_gateway="", v6_gateway="")
    try:
        conf = netconf(sock, tiny, version="1.1.0", transport=transport)
        assert plugin("STATUS", conf, container=None, ifname="", netns=None)[:2] == (0, None)
        for i in range(2):
            ipam.Allocate(pb.AllocateRequest(pool=tiny, owner=f"o{i}", ip_family_policy=pb.IP_FAMILY_POLICY_SINGLE_STACK,
                                             ip_families=[pb.IP_FAMILY_IPV4]))
        err = assert_cni_error(*plugin("STATUS", conf, container=None)[:2], 50)
        assert "IPv4" in err["msg"]
        # an IPv6-only network still has room
        v6 = netconf(sock, tiny, version="1.1.0", ipFamilyPolicy="SingleStack", ipFamilies=["IPv6"])
        assert plugin("STATUS", v6, container=None)[:2] == (0, None)
        # PreferDualStack: one family with room is enough
        prefer = netconf(sock, tiny, version="1.1.0", ipFamilyPolicy="PreferDualStack")
        assert plugin("STATUS", prefer, container=None)[:2] == (0, None)
        prefer_v4 = netconf(sock, tiny, version="1.1.0", ipFamilyPolicy="PreferDualStack", ipFamilies=["IPv4"])
        err = assert_cni_error(*plugin("STATUS", prefer_v4, container=None)[:2], 50)
        assert "IPv4" in err["msg"]
    finally:
        ipam.DeletePool(pb.DeletePoolRequest(name=tiny, force=True))
    assert_cni_error(*plugin("STATUS", netconf(tmp_path / "absent.sock", "pods", version="1.1.0"))[:2], 50)
    assert_cni_error(*plugin("STATUS", netconf(sock, tiny, version="1.1.0"))[:2], 50)  # pool gone
    assert_cni_error(*plugin("STATUS", netconf(sock, tiny, version="1.0.0"))[:2], 1)


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
def test_server_down_is_try_again_later(plugin: Plugin, tmp_path: Path, command: str, transport: str) -> None:
    for endpoint in (str(tmp_path / "no-server.sock"), f"127.0.0.1:{free_port()}"):
        conf = netconf(endpoint, "pods", transport=transport)
        conf["prevResult"] = {"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.2/24"}]}
        err = assert_cni_error(*plugin(command, conf)[:2], 11)
        assert "UNAVAILABLE" in err["details"]
        if transport == "native" or "compiled" in str(plugin.path):  # grpcio says it in its own words
            assert err["msg"].startswith("cannot connect to "), err


def test_deadline_exceeded_is_try_again_later(plugin: Plugin, tmp_path: Path, transport: str) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:  # accepts connections, never answers
        silent.bind(str(path))
        silent.listen(8)
        started = time.monotonic()
        err = assert_cni_error(*plugin("ADD", netconf(path, "pods", timeout=0.5, transport=transport))[:2], 11)
        assert time.monotonic() - started < 30
    assert "DEADLINE_EXCEEDED" in err["details"]


def test_pool_exhausted_is_a_plugin_code_with_the_grpc_message(plugin: Plugin, cni_server: tuple[ServerProcess, Path],
                                                               ipam: ipam_pb2_grpc.IpamServiceStub,
                                                               transport: str) -> None:
    tiny = make_pool(ipam, v4="198.18.2.0/30", v6="", v4_gateway="")
    try:
        conf = netconf(cni_server[1], tiny, ipFamilyPolicy="SingleStack", ipFamilies=["IPv4"], transport=transport)
        for container in ("x1", "x2"):
            assert plugin("ADD", conf, container=container)[0] == 0
        rc, out, _ = plugin("ADD", conf, container="x3")
        err = assert_cni_error(rc, out, 100)
        with pytest.raises(grpc.RpcError) as exc:
            ipam.Allocate(pb.AllocateRequest(pool=tiny, owner="x4", ip_families=[pb.IP_FAMILY_IPV4]))
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err["msg"] == exc.value.details()
        assert "RESOURCE_EXHAUSTED (POOL_EXHAUSTED)" in err["details"]
    finally:
        ipam.DeletePool(pb.DeletePoolRequest(name=tiny, force=True))


BAD_IPAM = [
    ({"pool": None}, "ipam.pool"),
    ({"pool": ""}, "ipam.pool"),
    ({"endpoint": None}, "ipam.endpoint"),
    ({"endpoint": "no-port"}, "ipam.endpoint"),
    ({"endpoint": "relative/path.sock"}, "ipam.endpoint"),
    ({"endpoint": 50051}, "ipam.endpoint"),
    ({"ipFamilyPolicy": "DualStackPlease"}, "ipam.ipFamilyPolicy"),
    ({"ipFamilies": ["IPv5"]}, "ipam.ipFamilies[0]"),
    ({"ipFamilies": "IPv4"}, "ipam.ipFamilies"),
    ({"ipFamilyPolicy": "SingleStack"}, "ipam.ipFamilies"),
    ({"addresses": ["198.18.0.300"]}, "ipam.addresses[0]"),
    ({"routes": [{"dst": "198.18.0.0"}]}, "ipam.routes[0].dst"),
    ({"routes": [{"dst": "198.18.0.0/16", "gw": "fd00::1"}]}, "ipam.routes[0].gw"),
    ({"routes": {"dst": "0.0.0.0/0"}}, "ipam.routes"),
    ({"dns": {"nameservers": ["resolver"]}}, "ipam.dns.nameservers[0]"),
    ({"timeout": -1}, "ipam.timeout"),
    ({"timeout": "10s"}, "ipam.timeout"),
    ({"defaultRoutes": "yes"}, "ipam.defaultRoutes"),
    ({"transport": "carrier-pigeon"}, "ipam.transport"),
    ({"gcScope": "cluster"}, "ipam.gcScope"),
    ({"tls": {"cert": "/x.pem"}}, "ipam.tls"),
]


@pytest.mark.parametrize(("change", "field"), BAD_IPAM, ids=[f for _, f in BAD_IPAM])
def test_bad_config_is_code_7_naming_the_field(plugin: Plugin, tmp_path: Path, change: dict, field: str) -> None:
    conf = netconf(tmp_path / "unused.sock", "pods")
    for key, value in change.items():
        if value is None:
            del conf["ipam"][key]
        else:
            conf["ipam"][key] = value
    err = assert_cni_error(*plugin("ADD", conf)[:2], 7)
    assert err["msg"].startswith(f"{field}:"), err


def test_bad_config_outside_ipam(plugin: Plugin, tmp_path: Path) -> None:
    conf = netconf(tmp_path / "unused.sock", "pods")
    assert_cni_error(*plugin("ADD", {k: v for k, v in conf.items() if k != "ipam"})[:2], 7)
    assert_cni_error(*plugin("ADD", [conf])[:2], 7)
    assert_cni_error(*plugin("ADD", {**conf, "cniVersion": "0.2.0"})[:2], 1)
    assert_cni_error(*plugin("ADD", {k: v for k, v in conf.items() if k != "cniVersion"})[:2], 7)
    unknown = {**conf, "futureKey": {"x": 1}, "ipam": {**conf["ipam"], "futureKnob": True}}
    assert_cni_error(*plugin("ADD", unknown)[:2], 11)  # unknown keys are ignored: it got as far as the (absent) server


@pytest.mark.parametrize("stdin", [b"", b"{", b"\xff\xfe not utf-8", b'{"cniVersion": "1.0.0"} trailing'])
def test_undecodable_input_is_code_6(plugin: Plugin, stdin: bytes) -> None:
    assert_cni_error(*plugin("ADD", stdin)[:2], 6)


def test_environment_errors_are_code_4(plugin: Plugin, tmp_path: Path) -> None:
    conf = netconf(tmp_path / "unused.sock", "pods")
    err = assert_cni_error(*plugin("ADD", conf, container=None)[:2], 4)
    assert err["msg"].startswith("CNI_CONTAINERID:")
    assert_cni_error(*plugin("DEL", conf, container=None)[:2], 4)
    assert assert_cni_error(*plugin("ADD", conf, netns=None)[:2], 4)["msg"].startswith("CNI_NETNS:")
    assert assert_cni_error(*plugin("ADD", conf, ifname="")[:2], 4)["msg"].startswith("CNI_IFNAME:")
    assert assert_cni_error(*plugin("", conf)[:2], 4)["msg"].startswith("CNI_COMMAND:")
    err = assert_cni_error(*plugin("FROBNICATE", conf)[:2], 4)
    assert "FROBNICATE" in err["msg"]
    assert_cni_error(*plugin("ADD", conf, container="bad/id")[:2], 4)
    assert_cni_error(*plugin("ADD", conf, ifname="eth0:1")[:2], 4)
    assert_cni_error(*plugin("ADD", conf, args="IP")[:2], 4)
    assert_cni_error(*plugin("ADD", conf, args="IP=not-an-ip")[:2], 4)
