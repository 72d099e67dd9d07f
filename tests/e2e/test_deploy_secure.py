"""The Kubernetes configuration end to end, without Kubernetes: a real server run with the
manifests' settings (the ConfigMap, the auth config of the Secret with real token hashes,
TLS on TCP and the probe socket), the Deployment's probe commands against it, and the CNI
DaemonSet's installer output (conflist with token and CA) driving the real plugin through
ADD and DEL over TLS.

Paths that the manifests fix on a node (/run/dsipam, /etc/dsipam-cni, ...) are mapped into
a temporary directory; the certificate is a throw-away one made with openssl.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from support import free_port

from dsipam.server import security
from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for a test certificate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
SHIM_TOKENS = {node: f"dsipam_shim-{node}-" + os.urandom(8).hex() for node in ("node-1", "node-2")}  # one per node
ADMIN_TOKEN = "dsipam_admin-" + os.urandom(8).hex()
SERVER_NAME = "dsipam.dsipam-system.svc"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _one(name: str, kind: str, resource: str) -> dict:
    (found,) = [d for d in _docs(name) if d["kind"] == kind and d["metadata"]["name"] == resource]
    return found


@dataclass
class Deployed:
    tcp: str
    socket: str
    cert: Path
    proc: subprocess.Popen
    log: Path
    tmp: Path

    def stub(self, token: str) -> Iterator[ipam_pb2_grpc.IpamServiceStub]:
        creds = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(self.cert.read_bytes()), grpc.access_token_call_credentials(token)
        )
        options = (("grpc.ssl_target_name_override", SERVER_NAME),)
        with grpc.secure_channel(self.tcp, creds, options=options) as channel:
            yield ipam_pb2_grpc.IpamServiceStub(channel)


def _probe(command: list[str], socket: str) -> subprocess.CompletedProcess[str]:
    """Runs a probe command of the Deployment, with the socket path mapped and the image's script."""
    assert command[0] == "dsipam-healthcheck"
    manifest_socket = command[1]
    args = [socket if a == manifest_socket else a for a in command[1:]]
    script = ROOT / "deploy" / "docker" / "healthcheck.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def deployed(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    tmp = tmp_path_factory.mktemp("deploy-secure")
    cert, key = tmp / "tls.crt", tmp / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=dsipam",
         "-addext", f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    # The manifest's auth config, with hashes of tokens this test knows.
    auth = yaml.safe_load(_one("config.yaml", "Secret", "dsipam-auth")["stringData"]["auth.yaml"])
    nodes = [entry.get("node") for entry in auth["tokens"] if entry["role"] == "shim"]
    assert sorted(nodes) == sorted(SHIM_TOKENS), nodes  # the manifest's per-node shim entries
    for entry in auth["tokens"]:
        token = SHIM_TOKENS[entry["node"]] if entry["role"] == "shim" else ADMIN_TOKEN
        entry["hash"] = security.hash_token(token)
    (tmp / "auth.yaml").write_text(yaml.safe_dump(auth))
    # The server's environment: the ConfigMap, then what the Deployment adds, with paths mapped.
    settings = dict(_one("config.yaml", "ConfigMap", "dsipam-settings")["data"])
    tcp = f"127.0.0.1:{free_port()}"
    (manifest_socket,) = [a for a in settings["DSIPAM_LISTEN"].split(",") if a.startswith("unix://")]
    socket = f"unix://{tmp}/dsipam.sock"
    settings["DSIPAM_LISTEN"] = f"{tcp},{socket}"
    env = {k: v for k, v in os.environ.items() if k != "DSIPAM_INSECURE"}
    env.update(settings)
    env.update(
        {
            "DSIPAM_DATABASE_URL": db_url,
            "DSIPAM_AUTH_CONFIG": str(tmp / "auth.yaml"),
            "DSIPAM_TLS_CERT": str(cert),
            "DSIPAM_TLS_KEY": str(key),
            "DSIPAM_LOG_LEVEL": "WARNING",
        }
    )
    log = tmp / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsipam.server", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    server = Deployed(tcp, socket, cert, proc, log, tmp)
    try:
        startup = _one("server.yaml", "Deployment", "dsipam")["spec"]["template"]["spec"]["containers"][0]
        command = startup["startupProbe"]["exec"]["command"]
        assert command[1] == manifest_socket
        deadline = time.monotonic() + 30
        while _probe(command, socket).returncode != 0:
            assert proc.poll() is None, f"server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"startup probe never passed:\n{log.read_text()}"
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_probes_pass_and_the_probe_socket_opens_no_api(deployed: Deployed) -> None:
    container = _one("server.yaml", "Deployment", "dsipam")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        done = _probe(container[probe]["exec"]["command"], deployed.socket)
        assert done.returncode == 0 and "SERVING" in done.stdout, (probe, done.stdout, done.stderr)
    with grpc.insecure_channel(deployed.socket) as channel:
        with pytest.raises(grpc.RpcError) as exc:
            ipam_pb2_grpc.IpamServiceStub(channel).ListPools(pb.ListPoolsRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(deployed.tcp) as channel:  # the TCP port speaks TLS only
        with pytest.raises(grpc.RpcError):
            ipam_pb2_grpc.IpamServiceStub(channel).ListPools(pb.ListPoolsRequest(), timeout=5)


@pytest.fixture(params=["compiled", "python"])
def compiled(request: pytest.FixtureRequest) -> Path | None:
    """The plugin the installer puts on the node: the ConfigMap's default, the compiled plugin
    (this value), or the Python plugin (None: DSIPAM_CNI_PLUGIN=python)."""
    return request.getfixturevalue("compiled_plugin") if request.param == "compiled" else None


def _bundle(tmp: Path, compiled: Path | None = None) -> Path:
    """The image's cni-bundle layout, from this interpreter and the packages the plugin imports
    (and bin/dsipam-cni, the compiled plugin, when given)."""
    bundle = tmp / "bundle"
    if compiled is not None:
        (bundle / "bin").mkdir(parents=True)
        shutil.copy2(compiled, bundle / "bin" / "dsipam-cni")
    (bundle / "python" / "bin").mkdir(parents=True)
    (bundle / "python" / "bin" / "python3.11").symlink_to(Path(sys.executable).resolve())
    (bundle / "python" / "lib").symlink_to(Path(sysconfig.get_config_var("LIBDIR")), target_is_directory=True)
    site = bundle / "site-packages"
    (site / "dsipam").mkdir(parents=True)
    import google.protobuf

    purelib = Path(grpc.__file__).resolve().parent.parent
    (site / "grpc").symlink_to(purelib / "grpc", target_is_directory=True)
    (site / "google").symlink_to(Path(google.protobuf.__file__).resolve().parent.parent, target_is_directory=True)
    import typing_extensions

    (site / "typing_extensions.py").symlink_to(Path(typing_extensions.__file__).resolve())
    (site / "dsipam" / "cni").symlink_to(ROOT / "clients" / "cni" / "dsipam" / "cni", target_is_directory=True)
    (site / "dsipam" / "v1").symlink_to(ROOT / "clients" / "python" / "dsipam" / "v1", target_is_directory=True)
    return bundle


def _install(deployed: Deployed, tmp: Path, token: str, node: str = "node-1", compiled: Path | None = None) -> Path:
    """Runs the installer for ``node`` with a Secret holding that node's token (key token.<node>)
    and another node's, as the DaemonSet mounts dsipam-cni-credentials."""
    creds = tmp / "credentials"
    creds.mkdir(parents=True)
    (creds / f"token.{node}").write_text(token + "\n")
    (creds / "token.some-other-node").write_text("dsipam_not-this-nodes-token\n")
    shutil.copy(deployed.cert, creds / "ca.crt")
    cni = _one("cni.yaml", "ConfigMap", "dsipam-cni")["data"]
    daemonset = _one("cni.yaml", "DaemonSet", "dsipam-cni")["spec"]["template"]["spec"]["containers"][0]
    ds_env = {e["name"]: e["value"] for e in daemonset["env"] if "value" in e}
    (tmp / "conflist.template").write_text(cni["conflist.template"])
    env = {
        "PATH": os.environ["PATH"],
        **{k: v for k, v in cni.items() if k.startswith("DSIPAM_")},
        "DSIPAM_CNI_TLS_SERVER_NAME": ds_env["DSIPAM_CNI_TLS_SERVER_NAME"],
        "DSIPAM_CNI_HOST_ROOT": str(tmp / "node"),
        "DSIPAM_CNI_BUNDLE_SRC": str(_bundle(tmp, compiled)),
        "DSIPAM_CNI_WRAPPER_SRC": str(ROOT / "deploy" / "docker" / "dsipam-cni.sh"),
        "DSIPAM_CNI_TEMPLATE": str(tmp / "conflist.template"),
        "DSIPAM_CNI_CREDENTIALS": str(creds),
        "DSIPAM_CNI_SERVER": deployed.tcp,
        "NODE_NAME": node,
    }
    assert cni["DSIPAM_CNI_PLUGIN"] == "compiled"  # the ConfigMap's default
    if compiled is None:
        env["DSIPAM_CNI_PLUGIN"] = "python"
    done = subprocess.run(
        ["sh", str(ROOT / "deploy" / "docker" / "install-cni.sh"), "--once"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp / "node/etc/dsipam-cni/token").read_text() == token + "\n"  # only its own node's token
    return tmp / "node"


def _plugin(node: Path, command: str, container: str) -> tuple[int, dict]:
    """Runs the installed plugin as the runtime would, with node paths mapped into the fake root."""
    installed = node / "opt/cni/bin/dsipam-cni"
    if installed.read_bytes()[:4] == b"\x7fELF":  # the compiled plugin
        argv = [str(installed)]
    else:
        wrapper = installed.read_text().replace("'/opt/dsipam-cni/", f"'{node}/opt/dsipam-cni/")
        (node / "dsipam-cni.local").write_text(wrapper)
        argv = ["sh", str(node / "dsipam-cni.local")]
    conflist = json.loads((node / "etc/cni/net.d" / "90-dsipam.conflist").read_text())
    conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}
    ipam = conf["ipam"]
    ipam["tokenFile"] = str(node) + ipam["tokenFile"]
    ipam["tls"]["ca"] = str(node) + ipam["tls"]["ca"]
    env = {
        "PATH": "/usr/bin:/bin",
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_NETNS": f"/var/run/netns/{container}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(node / "opt/cni/bin"),
    }
    done = subprocess.run(
        argv, input=json.dumps(conf), env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {"stderr": done.stderr}


def test_installed_plugin_allocates_over_tls_with_the_node_token(
    deployed: Deployed, tmp_path: Path, clean_db: str, compiled: Path | None
) -> None:
    for admin in deployed.stub(ADMIN_TOKEN):
        admin.CreatePool(
            pb.CreatePoolRequest(pool=pb.Pool(name="pods", ranges=[pb.IpRange(cidr="198.18.6.0/24"),
                                                                    pb.IpRange(cidr="fd00:6::/120")]))
        )  # fmt: skip
        node = _install(deployed, tmp_path, SHIM_TOKENS["node-1"], compiled=compiled)
        rc, result = _plugin(node, "ADD", "c-secure-1")
        assert rc == 0, result
        got = sorted(ip["address"].split("/")[0] for ip in result["ips"])
        held = admin.GetAllocation(pb.GetAllocationRequest(pool="pods", owner="c-secure-1/eth0"))
        assert sorted(a.ip for a in held.addresses) == got and len(got) == 2
        assert {a.family for a in held.addresses} == {pb.IP_FAMILY_IPV4, pb.IP_FAMILY_IPV6}
        rc, result = _plugin(node, "DEL", "c-secure-1")
        assert rc == 0, result
        with pytest.raises(grpc.RpcError) as exc:
            admin.GetAllocation(pb.GetAllocationRequest(pool="pods", owner="c-secure-1/eth0"))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_another_nodes_plugin_cannot_release_a_pod(deployed: Deployed, tmp_path: Path, clean_db: str,
                                                   compiled: Path | None) -> None:
    """node-2's installed plugin, with node-2's token, cannot DEL (release) node-1's pod."""
    for admin in deployed.stub(ADMIN_TOKEN):
        admin.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name="pods", ranges=[pb.IpRange(cidr="198.18.7.0/24"),
                                                                                 pb.IpRange(cidr="fd00:7::/120")])))
        node1 = _install(deployed, tmp_path / "n1", SHIM_TOKENS["node-1"], "node-1", compiled)
        node2 = _install(deployed, tmp_path / "n2", SHIM_TOKENS["node-2"], "node-2", compiled)
        rc, result = _plugin(node1, "ADD", "c-node1")
        assert rc == 0, result
        rc, result = _plugin(node2, "DEL", "c-node1")
        assert rc != 0 and "PERMISSION_DENIED" in json.dumps(result), result
        held = admin.GetAllocation(pb.GetAllocationRequest(pool="pods", owner="c-node1/eth0"))
        assert held.node == "node-1" and [a.ip for a in held.addresses] == [ip["address"].split("/")[0]
                                                                            for ip in result_ips(node1)]
        assert _plugin(node1, "DEL", "c-node1")[0] == 0


def result_ips(node: Path) -> list[dict]:
    """The IPs of c-node1 from node's plugin: ADD again is idempotent and answers what the pod holds."""
    rc, result = _plugin(node, "ADD", "c-node1")
    assert rc == 0, result
    return result["ips"]


def test_a_wrong_node_token_is_refused(deployed: Deployed, tmp_path: Path, compiled: Path | None) -> None:
    node = _install(deployed, tmp_path, "dsipam_not-a-known-token", compiled=compiled)
    rc, result = _plugin(node, "ADD", "c-secure-2")
    assert rc != 0 and result.get("code") == 106, result  # the plugin's code for authentication failures
