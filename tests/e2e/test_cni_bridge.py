"""End to end: Debian's real ``/usr/lib/cni/bridge`` with ``"ipam": {"type": "dsipam"}``.

A dsipam server runs on loopback and on a unix socket, with an auth config that gives each
node its own shim identity (node-a's and node-b's tokens, each naming its node) and an admin
token for the test's own calls. The test makes a parent network namespace (which holds the
bridge, so its forwarding sysctls never touch the root namespace) and two pod namespaces: the
pods of node-a. It runs the bridge plugin inside the parent with CNI_PATH pointing at the
installed ``dsipam`` plugin, configured with node-a's token file, and checks: both pods get
IPv4 and IPv6 on eth0 with default routes and ping each other over both; CHECK passes; a
plugin configured with node-b's token can neither DEL node-a's pod nor collect it in a GC;
node-a's GC with one valid attachment releases the other pod's leaked allocation; DEL frees
the addresses in dsipam, and a repeated DEL succeeds. Everything it creates is removed at
the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from support import install_plugin, spawn_server

from dsipam.server import security
from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

BRIDGE = Path("/usr/lib/cni/bridge")
V4_RANGE, V4_GATEWAY = "198.18.0.0/24", "198.18.0.1"
V6_RANGE, V6_GATEWAY = "fd00:18::/120", "fd00:18::1"
ROOT_SYSCTLS = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding")

_MISSING = [why for missing, why in (
    (os.geteuid() != 0, "network namespaces need root"),
    (not BRIDGE.exists(), "containernetworking-plugins is not installed (.ci/run installs it)"),
    (shutil.which("ip") is None or shutil.which("ping") is None, "needs iproute2 and iputils-ping"),
) if missing]
# Outside CI a machine without these skips; in CI (which installs them) the test must run.
pytestmark = pytest.mark.skipif(bool(_MISSING) and not os.environ.get("CI"), reason="; ".join(_MISSING))


def sh(*args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=60, **kwargs)  # type: ignore[call-overload]


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def set_sysctl(ns: str, key: str, value: str) -> None:
    in_ns(ns, "sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}")


class Topology:
    """Uniquely named namespaces and bridge of one test run."""

    def __init__(self) -> None:
        run = uuid.uuid4().hex[:6]
        self.parent = f"dsipam-{run}-host"
        self.pods = {"a": f"dsipam-{run}-a", "b": f"dsipam-{run}-b"}
        self.containers = {"a": f"pod-a-{run}", "b": f"pod-b-{run}"}
        self.bridge = f"dsbr{run}"

    @property
    def namespaces(self) -> list[str]:
        return [self.parent, *self.pods.values()]

    def create(self) -> None:
        for ns in self.namespaces:
            sh("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
            # namespace-local: no duplicate address detection, so IPv6 is usable at once
            for key in ("net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"):
                set_sysctl(ns, key, "0")

    def remove(self) -> list[str]:
        problems = []
        for ns in self.namespaces:  # the parent takes the bridge and the host ends of the veths with it
            done = sh("ip", "netns", "del", ns, check=False)
            if done.returncode != 0 and "No such file" not in done.stderr:
                problems.append(f"ip netns del {ns}: {done.stderr.strip()}")
        listed = sh("ip", "netns", "list").stdout
        problems += [f"namespace {ns} is still there" for ns in self.namespaces if ns in listed]
        if sh("ip", "link", "show", self.bridge, check=False).returncode == 0:
            problems.append(f"bridge {self.bridge} in the root namespace")
        return problems


@pytest.fixture
def topology() -> Iterator[Topology]:
    before = {path: Path(path).read_text() for path in ROOT_SYSCTLS if Path(path).exists()}
    topo = Topology()
    try:
        topo.create()
        yield topo
    finally:
        problems = topo.remove()
        after = {path: Path(path).read_text() for path in before}
        assert after == before, "the root namespace's forwarding sysctls changed"
        assert not problems, problems


NODES = ("node-a", "node-b")


@dataclass
class Secured:
    target: str
    sock: Path
    admin: str
    token_files: dict[str, Path]  # node -> its shim token file


@pytest.fixture
def dsipam_server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """A server whose auth config has one shim token per node and an admin token."""
    tmp = tmp_path_factory.mktemp("cni-bridge-server")
    sock = tmp / "dsipam.sock"
    admin = security.new_token()
    entries = [{"name": "ops", "role": "admin", "hash": security.hash_token(admin)}]
    token_files = {}
    for node in NODES:
        token = security.new_token()
        entries.append({"name": f"shim-{node}", "role": "shim", "node": node, "hash": security.hash_token(token)})
        token_files[node] = tmp / f"token.{node}"
        token_files[node].write_text(token + "\n")
    config = tmp / "auth.json"
    config.write_text(json.dumps({"tokens": entries}))
    server = spawn_server(db_url, tmp, args=("--listen", f"unix://{sock}"),
                          extra_env={"DSIPAM_AUTH_CONFIG": str(config)})
    try:
        yield Secured(server.target, sock, admin, token_files)
    finally:
        server.terminate()


class AdminStub:
    """The generated stub with the admin token on every call."""

    def __init__(self, channel: grpc.Channel, token: str) -> None:
        self._stub = ipam_pb2_grpc.IpamServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        method = getattr(self._stub, name)
        return lambda request: method(request, metadata=self._metadata, timeout=10)


@pytest.fixture(params=["python", "compiled"])
def cni_bin(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """The installed plugin: the Python plugin's launcher, or the compiled plugin."""
    compiled = request.getfixturevalue("compiled_plugin") if request.param == "compiled" else None
    return install_plugin(tmp_path / "cni-bin", compiled).parent


def run_bridge(topo: Topology, cni_bin: Path, command: str, pod: str, conf: dict) -> tuple[int, dict | None, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": topo.containers[pod],
        "CNI_NETNS": f"/var/run/netns/{topo.pods[pod]}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(cni_bin),
    }
    proc = subprocess.run(["ip", "netns", "exec", topo.parent, str(BRIDGE)], input=json.dumps(conf),
                          env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else None), proc.stderr


def run_dsipam(cni_bin: Path, topo: Topology, command: str, conf: dict) -> tuple[int, dict | None]:
    """The dsipam plugin by itself (the 1.1.1 bridge knows neither GC nor STATUS)."""
    env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": command, "CNI_PATH": str(cni_bin)}
    proc = subprocess.run(["ip", "netns", "exec", topo.parent, str(cni_bin / "dsipam")], input=json.dumps(conf),
                          env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else None)


def eth0(ns: str) -> tuple[set[str], dict[int, str]]:
    """Global addresses (CIDR) on eth0 and the default gateway per IP version."""
    addrs = json.loads(in_ns(ns, "ip", "-j", "addr", "show", "dev", "eth0").stdout)[0]["addr_info"]
    cidrs = {f"{a['local']}/{a['prefixlen']}" for a in addrs if a.get("scope") == "global"}
    gateways = {}
    for version in (4, 6):
        routes = json.loads(in_ns(ns, "ip", f"-{version}", "-j", "route", "show", "default").stdout)
        if routes:
            gateways[version] = routes[0].get("gateway", "")
    return cidrs, gateways


def ping(ns: str, address: str) -> None:
    version = "-6" if ":" in address else "-4"
    deadline = time.monotonic() + 15
    while True:
        done = in_ns(ns, "ping", version, "-c", "1", "-W", "1", address, check=False)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{ns} cannot ping {address}:\n{done.stdout}{done.stderr}")
        time.sleep(0.2)


def held(stub: AdminStub, pool: str, owner: str) -> set[str] | None:
    try:
        alloc = stub.GetAllocation(pb.GetAllocationRequest(pool=pool, owner=owner))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return None
    return {f"{a.ip}/{a.prefix_length}" for a in alloc.addresses}


def test_bridge_with_dsipam_end_to_end(topology: Topology, dsipam_server: Secured, cni_bin: Path) -> None:
    target, sock = dsipam_server.target, dsipam_server.sock
    pool = f"e2e-{uuid.uuid4().hex[:8]}"
    conf = {
        "cniVersion": "1.0.0",
        "name": "dsipam-e2e",
        "type": "bridge",
        "bridge": topology.bridge,
        "isGateway": True,
        "ipMasq": False,
        "ipam": {
            "type": "dsipam",
            "endpoint": f"unix://{sock}",
            "pool": pool,
            "ipFamilyPolicy": "RequireDualStack",
            "ipFamilies": ["IPv4", "IPv6"],
            "defaultRoutes": True,
            "timeout": 10,
            "node": "node-a",  # these pods are node-a's, and so is its token
            "tokenFile": str(dsipam_server.token_files["node-a"]),
        },
    }
    # The same network configured on node-b: node-b's name and token.
    conf_b = {**conf, "ipam": {**conf["ipam"], "node": "node-b", "tokenFile": str(dsipam_server.token_files["node-b"])}}
    with grpc.insecure_channel(target) as channel:
        stub = AdminStub(channel, dsipam_server.admin)
        stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name=pool, ranges=[
            pb.IpRange(cidr=V4_RANGE, gateway=V4_GATEWAY), pb.IpRange(cidr=V6_RANGE, gateway=V6_GATEWAY)])))
        try:
            owners = {pod: f"{topology.containers[pod]}/eth0" for pod in ("a", "b")}
            results = {}
            for pod in ("a", "b"):
                rc, result, err = run_bridge(topology, cni_bin, "ADD", pod, conf)
                assert rc == 0, f"ADD {pod}: {result} {err}"
                assert result is not None
                results[pod] = result

            # Both pods: IPv4 and IPv6 on eth0, default routes for both, as allocated in dsipam.
            addresses = {}
            for pod in ("a", "b"):
                ips = [ip["address"] for ip in results[pod]["ips"]]
                assert len(ips) == 2 and ":" not in ips[0] and ":" in ips[1], ips
                assert held(stub, pool, owners[pod]) == set(ips)
                cidrs, gateways = eth0(topology.pods[pod])
                assert cidrs == set(ips), f"pod {pod}: eth0 has {cidrs}, dsipam gave {ips}"
                assert gateways == {4: V4_GATEWAY, 6: V6_GATEWAY}, f"pod {pod}: default routes {gateways}"
                addresses[pod] = [ip.split("/")[0] for ip in ips]
            assert set(addresses["a"]).isdisjoint(addresses["b"])

            # They reach each other over IPv4 and IPv6.
            for src, dst in (("a", "b"), ("b", "a")):
                for address in addresses[dst]:
                    ping(topology.pods[src], address)

            # CHECK passes (the bridge checks its side, then delegates to dsipam).
            for pod in ("a", "b"):
                rc, out, err = run_bridge(topology, cni_bin, "CHECK", pod, {**conf, "prevResult": results[pod]})
                assert rc == 0, f"CHECK {pod}: {out} {err}"

            # The pods are node-a's: node-b's plugin may not release them (the DEL fails, and the
            # addresses stay held in dsipam, so they cannot be handed to another pod while these
            # may still use them), nor collect them in a GC of the pool.
            for pod in ("a", "b"):
                rc, out, err = run_bridge(topology, cni_bin, "DEL", pod, {**conf_b, "prevResult": results[pod]})
                assert rc != 0 and "PERMISSION_DENIED" in json.dumps(out) + err, f"DEL {pod} by node-b: {out} {err}"
                assert held(stub, pool, owners[pod]) == {ip["address"] for ip in results[pod]["ips"]}
            gc_b = {**conf_b, "cniVersion": "1.1.0", "ipam": {**conf_b["ipam"], "gcGrace": 0},
                    "cni.dev/valid-attachments": []}
            assert run_dsipam(cni_bin, topology, "GC", gc_b) == (0, None)  # nothing of node-b's to collect
            for pod in ("a", "b"):
                assert held(stub, pool, owners[pod]) == {ip["address"] for ip in results[pod]["ips"]}

            # Pod b's sandbox disappears without a DEL: its allocation leaks. Node-a's GC with only
            # pod a valid releases it (GC is spec 1.1.0, which this bridge does not speak: dsipam
            # directly), with node-a's shim token and the default gcScope (node): one GarbageCollect
            # of node-a's allocations of this network, which a shim may run.
            sh("ip", "netns", "del", topology.pods["b"])
            gc = {**conf, "cniVersion": "1.1.0", "ipam": {**conf["ipam"], "gcGrace": 0},
                  "cni.dev/valid-attachments": [{"containerID": topology.containers["a"], "ifname": "eth0"}]}
            assert run_dsipam(cni_bin, topology, "GC", gc) == (0, None)
            assert held(stub, pool, owners["b"]) is None
            assert held(stub, pool, owners["a"]) == {ip["address"] for ip in results["a"]["ips"]}
            status = {**gc, "ipam": conf["ipam"]}
            assert run_dsipam(cni_bin, topology, "STATUS", status) == (0, None)

            # DEL frees the addresses in dsipam; a repeated DEL, and a DEL for the vanished pod, succeed.
            for _ in range(2):
                rc, out, err = run_bridge(topology, cni_bin, "DEL", "a", {**conf, "prevResult": results["a"]})
                assert rc == 0, f"DEL a: {out} {err}"
                assert held(stub, pool, owners["a"]) is None
            rc, out, err = run_bridge(topology, cni_bin, "DEL", "b", conf)
            assert rc == 0, f"DEL b: {out} {err}"
            usage = stub.GetPool(pb.GetPoolRequest(name=pool)).usage
            assert [u.allocated for u in usage] == [0, 0]
        finally:
            stub.DeletePool(pb.DeletePoolRequest(name=pool, force=True))
