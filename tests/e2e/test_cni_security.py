"""The plugin against a server with authentication on and TLS on its TCP listener.

The server's auth config has a ``shim`` token for node n1, one for node n2, a ``controller`` and
an ``admin`` token, and no role for the unix socket, so every call needs a token. The certificate is a throw-away self-signed one made
with ``openssl``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support import free_port, install_plugin
from test_cni_plugin import Plugin, allocation, assert_cni_error, netconf

from dsipam.server.security import hash_token
from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

SHIM_TOKEN = "dsipam_test-shim-" + os.urandom(8).hex()
SHIM_TOKEN_N2 = "dsipam_test-shim-n2-" + os.urandom(8).hex()
CONTROLLER_TOKEN = "dsipam_test-controller-" + os.urandom(8).hex()

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for a test certificate")


class SecureServer:
    def __init__(self, tcp: str, sock: Path, cert: Path, proc: subprocess.Popen, log: Path) -> None:
        self.tcp, self.sock, self.cert, self.proc, self.log = tcp, sock, cert, proc, log

    def stub(self, token: str) -> Iterator[ipam_pb2_grpc.IpamServiceStub]:
        creds = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(self.cert.read_bytes()), grpc.access_token_call_credentials(token))
        with grpc.secure_channel(self.tcp, creds) as channel:
            yield ipam_pb2_grpc.IpamServiceStub(channel)


@pytest.fixture(scope="module")
def secure_server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureServer]:
    tmp = tmp_path_factory.mktemp("cni-secure")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    auth = tmp / "auth.json"
    auth.write_text(json.dumps({
        "tokens": [{"name": "shim", "role": "shim", "node": "n1", "hash": hash_token(SHIM_TOKEN)},  # node n1's shim
                   {"name": "shim-n2", "role": "shim", "node": "n2", "hash": hash_token(SHIM_TOKEN_N2)},
                   {"name": "controller", "role": "controller", "hash": hash_token(CONTROLLER_TOKEN)},
                   {"name": "admin", "role": "admin", "hash": hash_token(CONTROLLER_TOKEN + "-admin")}],
        "unix_socket_role": "none",
    }))
    tcp, sock, log = f"127.0.0.1:{free_port()}", tmp / "dsipam.sock", tmp / "server.log"
    env = {**os.environ, "DSIPAM_DATABASE_URL": db_url, "DSIPAM_LOG_LEVEL": "WARNING"}
    env.pop("DSIPAM_INSECURE", None)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dsipam.server", "serve", "--listen", tcp, "--listen",
                                 f"unix://{sock}", "--tls-cert", str(cert), "--tls-key", str(key),
                                 "--auth-config", str(auth)], env=env, stdout=out, stderr=subprocess.STDOUT)
    server = SecureServer(tcp, sock, cert, proc, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"server exited:\n{log.read_text()}"
            try:
                for stub in server.stub(CONTROLLER_TOKEN):
                    stub.ListPools(pb.ListPoolsRequest(), timeout=2)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"server not up:\n{log.read_text()}") from None
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module", params=["python", "compiled"])
def plugin(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Plugin:
    """The Python plugin's launcher, or the compiled plugin (TLS through grpc-go)."""
    compiled = request.getfixturevalue("compiled_plugin") if request.param == "compiled" else None
    return Plugin(install_plugin(tmp_path_factory.mktemp(f"cni-secure-bin-{request.param}"), compiled))


@pytest.fixture
def pool(secure_server: SecureServer) -> Iterator[str]:
    name = f"cni-sec-{os.urandom(4).hex()}"
    for stub in secure_server.stub(CONTROLLER_TOKEN + "-admin"):
        stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name=name, ranges=[
            pb.IpRange(cidr="198.18.4.0/24", gateway="198.18.4.1"), pb.IpRange(cidr="fd00:4::/120")])))
    yield name
    for stub in secure_server.stub(CONTROLLER_TOKEN + "-admin"):
        stub.DeletePool(pb.DeletePoolRequest(name=name, force=True))


def held(server: SecureServer, pool: str, owner: str) -> pb.Allocation | None:
    for stub in server.stub(CONTROLLER_TOKEN):
        return allocation(stub, pool, owner)
    return None


def test_unix_socket_with_a_shim_token(plugin: Plugin, secure_server: SecureServer, pool: str) -> None:
    sock = secure_server.sock
    err = assert_cni_error(*plugin("ADD", netconf(sock, pool))[:2], 106)  # no token, no role on the socket
    assert "UNAUTHENTICATED" in err["details"]
    assert_cni_error(*plugin("ADD", netconf(sock, pool, token="dsipam_wrong"))[:2], 106)

    conf = netconf(sock, pool, token=SHIM_TOKEN, node="n1")
    rc, out, _ = plugin("ADD", conf, container="tok")
    assert rc == 0 and isinstance(out, dict) and len(out["ips"]) == 2
    assert held(secure_server, pool, "tok/eth0") is not None
    assert plugin("CHECK", {**conf, "prevResult": out}, container="tok")[:2] == (0, None)
    assert plugin("DEL", conf, container="tok")[:2] == (0, None)
    assert held(secure_server, pool, "tok/eth0") is None


def test_status_and_gc_with_shim_and_controller_tokens(plugin: Plugin, secure_server: SecureServer, pool: str,
                                                       tmp_path: Path) -> None:
    sock = secure_server.sock
    # a shim may not read the pool: STATUS still tells that the service answers
    assert plugin("STATUS", netconf(sock, pool, version="1.1.0", token=SHIM_TOKEN))[:2] == (0, None)
    assert_cni_error(*plugin("STATUS", netconf(sock, pool, version="1.1.0"))[:2], 50)  # unauthenticated

    # n1's pods of this network (one live, one leaked), n1's pod of another network, n2's pod
    assert plugin("ADD", netconf(sock, pool, token=SHIM_TOKEN, node="n1"), container="live")[0] == 0
    assert plugin("ADD", netconf(sock, pool, token=SHIM_TOKEN, node="n1"), container="leak")[0] == 0
    other_net = {**netconf(sock, pool, token=SHIM_TOKEN, node="n1"), "name": "other-net"}
    assert plugin("ADD", other_net, container="othernet")[0] == 0
    assert plugin("ADD", netconf(sock, pool, token=SHIM_TOKEN_N2, node="n2"), container="n2pod")[0] == 0

    # GC with n1's shim token, read from a file, and the default gcScope (node): one GarbageCollect
    # confined to n1 and this network, which a shim may call (no ListAllocations)
    token_file = tmp_path / "token"
    token_file.write_text(SHIM_TOKEN + "\n")
    gc = netconf(sock, pool, version="1.1.0", tokenFile=str(token_file), node="n1", gcGrace=0)
    gc["cni.dev/valid-attachments"] = [{"containerID": "live", "ifname": "eth0"}]
    assert "gcScope" not in gc["ipam"]
    assert plugin("GC", gc)[:2] == (0, None)
    assert {o: held(secure_server, pool, f"{o}/eth0") is not None for o in ("live", "leak", "othernet", "n2pod")} \
        == {"live": True, "leak": False, "othernet": True, "n2pod": True}

    # the same GC naming node n2 with n1's token: refused, nothing released
    gc_n2 = netconf(sock, pool, version="1.1.0", token=SHIM_TOKEN, node="n2", gcGrace=0)
    gc_n2["cni.dev/valid-attachments"] = []
    err = assert_cni_error(*plugin("GC", gc_n2)[:2], 106)
    assert "PERMISSION_DENIED" in err["details"]
    assert held(secure_server, pool, "n2pod/eth0") is not None


def test_tls_over_tcp_with_the_grpc_transport(plugin: Plugin, secure_server: SecureServer, pool: str) -> None:
    tls = {"ca": str(secure_server.cert)}
    conf = netconf(secure_server.tcp, pool, tls=tls, token=SHIM_TOKEN, node="n1")
    rc, out, err = plugin("ADD", conf, container="tls")
    assert rc == 0, (out, err)
    assert isinstance(out, dict) and len(out["ips"]) == 2
    assert held(secure_server, pool, "tls/eth0") is not None
    assert plugin("DEL", conf, container="tls")[:2] == (0, None)
    assert held(secure_server, pool, "tls/eth0") is None

    # a certificate the client does not trust: the service cannot be reached safely
    other = netconf(secure_server.tcp, pool, tls={"ca": "/etc/ssl/certs/ca-certificates.crt"}, token=SHIM_TOKEN,
                    node="n1")
    if Path("/etc/ssl/certs/ca-certificates.crt").exists():
        assert_cni_error(*plugin("ADD", other, container="tls2")[:2], 11)
    # cleartext to the TLS port fails; a token over cleartext TCP is refused before sending it
    assert_cni_error(*plugin("ADD", netconf(secure_server.tcp, pool, timeout=1), container="tls3")[:2], 11)
    err = assert_cni_error(*plugin("ADD", netconf(secure_server.tcp, pool, token=SHIM_TOKEN))[:2], 7)
    assert err["msg"].startswith("ipam.token:")
    assert_cni_error(*plugin("ADD", netconf(secure_server.tcp, pool, tls=tls, transport="native"))[:2], 7)
    assert_cni_error(*plugin("ADD", netconf(secure_server.tcp, pool, tls={"ca": "/nonexistent.pem"}))[:2], 7)
