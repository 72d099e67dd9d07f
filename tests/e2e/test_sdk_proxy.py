"""The SDK and the CLI through a gRPC proxy in front of the real server: TLS, mutual TLS and
bearer tokens (the proxy terminates TLS and records the metadata it receives), and responses
lost after the server did the work (the proxy forwards a call, then fails it with UNAVAILABLE)."""

from __future__ import annotations

import collections
import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import dsipam.client as sdk
from dsipam.client import AsyncIpamClient, IpamClient, RetryPolicy, TlsConfig

DUAL = ["198.18.0.0/24", "fd00::/120"]
DSIPAM = str(Path(sys.executable).with_name("dsipam"))

WAIT = 30.0  # deadline of the tests' calls: generous, for a loaded machine


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


class Proxy:
    """A unary gRPC proxy to ``upstream`` that records each call's method and metadata.

    ``lose``: methods whose first call is forwarded and then answered with UNAVAILABLE (the
    server did the work; the client never hears of it). ``refuse``: methods whose first call
    is answered with UNAVAILABLE without being forwarded.
    """

    def __init__(self, upstream: str, *, credentials: grpc.ServerCredentials | None = None,
                 lose: tuple[str, ...] = (), refuse: tuple[str, ...] = ()) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.lose = set(lose)
        self.refuse = set(refuse)
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((self._Handler(self),))
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    class _Handler(grpc.GenericRpcHandler):
        def __init__(self, proxy: Proxy) -> None:
            self.proxy = proxy

        def service(self, details: Any) -> Any:
            method = details.method
            return grpc.unary_unary_rpc_method_handler(lambda request, context: self.proxy.forward(method, request,
                                                                                                     context))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def count(self, name: str) -> int:
        return sum(1 for method, _ in self.calls if method.endswith("/" + name))

    def forward(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        name = method.rsplit("/", 1)[-1]
        with self.lock:
            self.calls.append((method, metadata))
            refuse = name in self.refuse
            lose = name in self.lose
            self.refuse.discard(name)
            self.lose.discard(name)
        if refuse:
            context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: upstream connection reset")
        forward = [(k, v) for k, v in metadata.items() if k == "authorization"]
        try:
            response: bytes = self.channel.unary_unary(method)(request, timeout=context.time_remaining(),
                                                                metadata=forward)
        except grpc.RpcError as exc:
            context.abort_with_status(_Status(exc.code(), exc.details(), exc.trailing_metadata()))
        if lose:
            context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: response lost")
        return response

    def close(self) -> None:
        self.server.stop(0).wait()
        self.channel.close()


def _write_pki(d: Path, server_names: list[str], server_ips: list[str]) -> None:
    """ca.pem, server.pem/key (for the given names and IPs) and client.pem/key, made with cryptography."""
    now = dt.datetime.now(dt.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def save(name: str, cert: x509.Certificate, private: ec.EllipticCurvePrivateKey) -> None:
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def builder(subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(issuer).public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1)))

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dsipam sdk test CA")])
    ca = (builder("dsipam sdk test CA", ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    save("ca", ca, ca_key)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
    for name, usage, extra in (("server", ExtendedKeyUsageOID.SERVER_AUTH, sans),
                               ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [])):
        private = key()
        b = builder(name, ca_name, private.public_key()).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if extra:
            b = b.add_extension(x509.SubjectAlternativeName(extra), critical=False)
        save(name, b.sign(ca_key, hashes.SHA256()), private)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for the name dsipam.test only, and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _write_pki(d, ["dsipam.test"], [])
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def _server_credentials(pki: dict[str, Path], *, mutual: bool) -> grpc.ServerCredentials:
    pair = (pki["server.key"].read_bytes(), pki["server.pem"].read_bytes())
    if mutual:
        return grpc.ssl_server_credentials([pair], root_certificates=pki["ca.pem"].read_bytes(),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


@pytest.fixture
def tls_proxy(target: str, pki: dict[str, Path]) -> Iterator[Proxy]:
    proxy = Proxy(target, credentials=_server_credentials(pki, mutual=False))
    yield proxy
    proxy.close()


@pytest.fixture
def mtls_proxy(target: str, pki: dict[str, Path]) -> Iterator[Proxy]:
    proxy = Proxy(target, credentials=_server_credentials(pki, mutual=True))
    yield proxy
    proxy.close()


ONCE = RetryPolicy(max_attempts=2, initial_backoff=0.01)


# -- TLS, mutual TLS, tokens: SDK ----------------------------------------------------------


def test_tls_with_a_ca_file_and_a_server_name(tls_proxy: Proxy, pki: dict[str, Path]) -> None:
    tls = TlsConfig(ca_file=pki["ca.pem"], server_name="dsipam.test")
    with IpamClient(tls_proxy.target, tls=tls, timeout=WAIT) as ipam:
        ipam.create_pool("tls", DUAL)
        assert ipam.allocate("tls", "a", policy="require").allocation.ipv6 is not None
    assert tls_proxy.count("CreatePool") == 1 and tls_proxy.count("Allocate") == 1
    # the certificate names dsipam.test, not 127.0.0.1: without the override the handshake fails
    with IpamClient(tls_proxy.target, tls=TlsConfig(ca_file=pki["ca.pem"]), retry=ONCE, timeout=WAIT) as ipam:
        with pytest.raises(sdk.ServiceUnavailable):
            ipam.list_pools()
    # and plaintext against a TLS port fails too
    with IpamClient(tls_proxy.target, retry=ONCE, timeout=3) as ipam:
        with pytest.raises(sdk.ServiceUnavailable):
            ipam.list_pools()
    assert tls_proxy.count("ListPools") == 0


async def test_mutual_tls_needs_the_client_certificate(mtls_proxy: Proxy, pki: dict[str, Path]) -> None:
    tls = TlsConfig(ca_file=str(pki["ca.pem"]), cert_file=str(pki["client.pem"]), key_file=str(pki["client.key"]),
                    server_name="dsipam.test")
    async with AsyncIpamClient(mtls_proxy.target, tls=tls, timeout=WAIT) as ipam:
        await ipam.create_pool("mtls", DUAL)
        assert [p.name for p in await ipam.list_pools()] == ["mtls"]
    no_cert = TlsConfig(ca_file=str(pki["ca.pem"]), server_name="dsipam.test")
    async with AsyncIpamClient(mtls_proxy.target, tls=no_cert, retry=ONCE, timeout=WAIT) as ipam:
        with pytest.raises(sdk.ServiceUnavailable):
            await ipam.list_pools()
    assert mtls_proxy.count("ListPools") == 1
    with pytest.raises(sdk.InvalidArgument, match="cert_file and key_file go together"):
        IpamClient(mtls_proxy.target, tls=TlsConfig(cert_file=pki["client.pem"]), timeout=WAIT)
    with pytest.raises(sdk.InvalidArgument, match="ca_file: cannot read"):
        IpamClient(mtls_proxy.target, tls=TlsConfig(ca_file="/nonexistent/ca.pem"), timeout=WAIT)


def test_bearer_token_on_every_call_and_token_files_are_reread(tls_proxy: Proxy, pki: dict[str, Path],
                                                               tmp_path: Path) -> None:
    tls = TlsConfig(ca_file=pki["ca.pem"], server_name="dsipam.test")
    with IpamClient(tls_proxy.target, tls=tls, token="s3cret", metadata={"x-request-source": "test"},
                    timeout=WAIT) as ipam:
        ipam.create_pool("tok", DUAL)
        ipam.allocate("tok", "a")
    assert [md.get("authorization") for _, md in tls_proxy.calls] == ["Bearer s3cret"] * 2
    assert all(md.get("x-request-source") == "test" for _, md in tls_proxy.calls)
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    with IpamClient(tls_proxy.target, tls=tls, token_file=token_file, timeout=WAIT) as ipam:
        ipam.get_pool("tok")
        token_file.write_text("rotated\n")
        ipam.get_pool("tok")
    assert [md.get("authorization") for _, md in tls_proxy.calls[2:]] == ["Bearer first", "Bearer rotated"]
    with IpamClient(tls_proxy.target, tls=tls, timeout=WAIT) as ipam:  # no token, no header
        ipam.get_pool("tok")
    assert "authorization" not in tls_proxy.calls[-1][1]


# -- responses lost after the server did the work ---------------------------------------------


def test_lost_responses_are_retried_safely(target: str) -> None:
    proxy = Proxy(target, lose=("CreatePool", "Allocate", "Release", "DeletePool"))
    try:
        with IpamClient(proxy.target, retry=RetryPolicy(initial_backoff=0.01), timeout=WAIT) as ipam:
            pool = ipam.create_pool("lost", DUAL, labels={"a": "b"})  # created, answer lost, retried
            assert pool.name == "lost" and dict(pool.labels) == {"a": "b"}
            assert proxy.count("CreatePool") == 2 and proxy.count("GetPool") == 1

            got = ipam.allocate("lost", "o", policy="require")  # allocated, answer lost, retried
            assert got.created is False  # the retry found the owner's pair: no second pair was taken
            assert proxy.count("Allocate") == 2
            usage = ipam.get_pool("lost").usage
            assert [u.allocated for u in usage] == [1, 1]

            assert ipam.release("lost", "o") == ()  # released by the lost attempt; the retry finds nothing
            assert proxy.count("Release") == 2
            ipam.delete_pool("lost")  # deleted, answer lost; the retry's NOT_FOUND means done
            assert proxy.count("DeletePool") == 2
            with pytest.raises(sdk.PoolNotFound):
                ipam.get_pool("lost")
    finally:
        proxy.close()


def test_lost_responses_of_pool_changes_are_retried_safely(target: str) -> None:
    """Each change was made by the attempt whose answer was lost; the retry reports success."""
    lost = ("UpdatePool", "ReserveAddresses", "UnreserveAddresses", "AddPoolRange", "RemovePoolRange", "ReleaseNode")
    with IpamClient(target, timeout=WAIT) as direct:
        direct.create_pool("changes", "198.18.0.0/24", cooldown=0)
        direct.allocate("changes", "o", node="node-a")
        direct.release("changes", "o")
    proxy = Proxy(target, lose=lost)
    try:
        with IpamClient(proxy.target, retry=RetryPolicy(initial_backoff=0.01), timeout=WAIT) as ipam:
            assert ipam.update_pool("changes", labels={"x": "y"}, cooldown=1).cooldown == dt.timedelta(seconds=1)
            pool = ipam.reserve_addresses("changes", ["198.18.0.9", "198.18.0.16/30"])
            assert set(map(str, pool.reservations)) == {"198.18.0.9/32", "198.18.0.16/30"}
            pool = ipam.unreserve_addresses("changes", "198.18.0.16/30")  # the retry finds it unreserved
            assert [str(r) for r in pool.reservations] == ["198.18.0.9/32"]
            pool = ipam.add_pool_range("changes", sdk.Range("fd00::/120", first="fd00::10"))  # the retry: overlap
            assert [str(r.cidr) for r in pool.ranges] == ["198.18.0.0/24", "fd00::/120"]
            pool = ipam.remove_pool_range("changes", "fd00::/120")  # the retry: RANGE_NOT_FOUND
            assert [str(r.cidr) for r in pool.ranges] == ["198.18.0.0/24"]
            freed = ipam.release_node("changes", "node-a")  # the lost attempt freed the block
            assert freed.released == () and freed.kept == ()
            for name in lost:
                assert proxy.count(name) == 2, name
            assert ipam.get_pool("changes").labels == {"x": "y"}
    finally:
        proxy.close()


def test_a_retried_create_that_finds_a_different_pool_fails(target: str) -> None:
    with IpamClient(target, timeout=WAIT) as ipam:
        ipam.create_pool("taken", ["198.18.8.0/24"])
    proxy = Proxy(target, refuse=("CreatePool",))
    try:
        with IpamClient(proxy.target, retry=RetryPolicy(initial_backoff=0.01), timeout=WAIT) as ipam:
            with pytest.raises(sdk.PoolAlreadyExists) as caught:
                ipam.create_pool("taken", DUAL)
            assert caught.value.attempts == 2 and proxy.count("GetPool") == 1
            with pytest.raises(sdk.PoolNotFound) as missing:  # a first-attempt NOT_FOUND is reported
                ipam.delete_pool("absent")
            assert missing.value.attempts == 1
    finally:
        proxy.close()


# -- the CLI's TLS and token options, as flags and as DSIPAM_* variables -------------------------


def _dsipam(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}
    base["DSIPAM_TIMEOUT"] = str(WAIT)
    return subprocess.run([DSIPAM, *args], capture_output=True, text=True, timeout=60, env={**base, **(env or {})})


def test_cli_tls_and_token_flags_and_env(mtls_proxy: Proxy, pki: dict[str, Path], tmp_path: Path) -> None:
    flags = ["--target", mtls_proxy.target, "--ca-file", str(pki["ca.pem"]), "--cert-file", str(pki["client.pem"]),
             "--key-file", str(pki["client.key"]), "--server-name", "dsipam.test", "--token", "flag-token"]
    out = _dsipam(*flags, "pool", "create", "clitls", "--range", "198.18.6.0/24", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["name"] == "clitls"
    assert mtls_proxy.calls[-1][1]["authorization"] == "Bearer flag-token"

    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    env = {"DSIPAM_TARGET": mtls_proxy.target, "DSIPAM_CA_FILE": str(pki["ca.pem"]),
           "DSIPAM_CERT_FILE": str(pki["client.pem"]), "DSIPAM_KEY_FILE": str(pki["client.key"]),
           "DSIPAM_SERVER_NAME": "dsipam.test", "DSIPAM_TOKEN_FILE": str(token_file)}
    out = _dsipam("pool", "list", "-o", "json", env=env)
    assert out.returncode == 0, out.stderr
    assert [p["name"] for p in json.loads(out.stdout)["pools"]] == ["clitls"]
    assert mtls_proxy.calls[-1][1]["authorization"] == "Bearer file-token"

    # flags win over the environment
    out = _dsipam("--token", "flag-wins", "pool", "show", "clitls", env=env)
    assert out.returncode == 0 and mtls_proxy.calls[-1][1]["authorization"] == "Bearer flag-wins"

    # without the client certificate the handshake fails: a one-line error, exit 1
    no_cert = {k: v for k, v in env.items() if k not in ("DSIPAM_CERT_FILE", "DSIPAM_KEY_FILE")}
    out = _dsipam("--timeout", "2", "pool", "list", env=no_cert)
    assert out.returncode == 1
    assert out.stderr.startswith("dsipam: cannot reach") and len(out.stderr.strip().splitlines()) == 1

    # an unreadable CA file is a mistake on the command line: exit 2
    out = _dsipam("--ca-file", str(tmp_path / "missing.pem"), "pool", "list", env=env)
    assert out.returncode == 2 and "ca_file: cannot read" in out.stderr
