"""Authentication and authorisation with real server processes: bearer tokens, roles, TLS,
mutual TLS (a wrong client certificate is refused at the handshake), the unix socket, and
starting only with an auth config or an explicit --insecure.

Certificates are made at test time with the ``cryptography`` package.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import REQUIRE, error_info, pool
from support import ServerProcess, free_port, spawn_server, wait_healthy

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["IpamService"]
SHIM_METHODS = {"Allocate", "Release", "GetAllocation", "GarbageCollect", "GetPool"}  # shims: their node's owners
ADMIN_METHODS = {"CreatePool", "UpdatePool", "DeletePool", "AddPoolRange", "RemovePoolRange", "ReserveAddresses",
                 "UnreserveAddresses"}


# -- certificates ----------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    certs: dict[str, tuple[Path, Path]]  # name -> (cert, key)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, sans: list[x509.GeneralName],
          server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca[0].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca[1], hashes.SHA256()), key


def make_pki(d: Path) -> Pki:
    ca = _ca("dsipam test CA")
    rogue = _ca("dsipam test CA")  # same name, different key: not the CA the server trusts
    (d / "ca.pem").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    server = _leaf(ca, "dsipam-server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                   server=True)
    (d / "server.pem").write_bytes(server[0].public_bytes(serialization.Encoding.PEM))
    _write_key(server[1], d / "server.key")
    certs = {}
    for name, issuer, cn, sans in (
        ("shim", ca, "node-1.shim", []),
        ("controller", ca, "some-controller", [x509.UniformResourceIdentifier("spiffe://dsipam/controller")]),
        ("unmapped", ca, "nobody-knows-me", []),
        ("rogue", rogue, "node-1.shim", []),  # the shim's name, signed by the wrong CA
    ):
        cert, key = _leaf(issuer, cn, sans, server=False)
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        certs[name] = (d / f"{name}.pem", _write_key(key, d / f"{name}.key"))
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", certs)


# -- tokens and servers ----------------------------------------------------------------


def new_token(role: str) -> tuple[str, str]:
    """``dsipam token new ROLE``: the token (stdout) and its config entry (stderr)."""
    node = ["--node", "node-1"] if role == "shim" else []  # a shim token names its node
    out = subprocess.run([sys.executable, "-m", "dsipam.server", "token", "new", role, "--name", f"{role}-test", *node],
                         capture_output=True, text=True, check=True)
    entry = out.stderr.split("auth config entry (under tokens:):\n", 1)[1]
    return out.stdout.strip(), entry


@pytest.fixture(scope="module")
def tokens() -> dict[str, tuple[str, str]]:
    return {role: new_token(role) for role in ("shim", "controller", "admin")}


def write_config(path: Path, tokens: dict[str, tuple[str, str]], clients: str = "", extra: str = "") -> Path:
    path.write_text("tokens:\n" + "".join(entry for _token, entry in tokens.values()) + clients + extra)
    return path


def md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def expect_code(fn, code: grpc.StatusCode) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        fn()
    assert err.value.code() == code, (err.value.code(), err.value.details())
    return err.value


@pytest.fixture(scope="module")
def token_server(db_url, tokens, tmp_path_factory) -> Iterator[ServerProcess]:
    """A plaintext server with token authentication (health and reflection stay open)."""
    tmp = tmp_path_factory.mktemp("auth")
    config = write_config(tmp / "auth.yaml", tokens)
    server = spawn_server(db_url, tmp, extra_env={"DSIPAM_AUTH_CONFIG": str(config)})
    yield server
    server.terminate()


def call_empty(channel: grpc.Channel, method, token: str | None):  # type: ignore[no-untyped-def]
    """Calls ``method`` with an empty request; returns the status code."""
    path = f"/{SERVICE.full_name}/{method.name}"
    request_type = pb.__dict__[method.input_type.name]
    response_type = pb.__dict__[method.output_type.name]
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, request_type.SerializeToString, response_type.FromString)
            for _ in call(request_type(), metadata=md(token), timeout=5):
                break
        else:
            channel.unary_unary(path, request_type.SerializeToString, response_type.FromString)(
                request_type(), metadata=md(token), timeout=5)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


# -- tests -----------------------------------------------------------------------------


def test_shim_token_cannot_create_pools(token_server, tokens, clean_db):
    shim, controller, admin = (tokens[r][0] for r in ("shim", "controller", "admin"))
    with grpc.insecure_channel(token_server.target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        err = expect_code(lambda: stub.CreatePool(pool("authz", "198.18.4.0/24", "fd00:a::/120"), metadata=md(shim)),
                          grpc.StatusCode.PERMISSION_DENIED)
        assert error_info(err).reason == "PERMISSION_DENIED"
        assert "CreatePool" in err.details() and "shim" in err.details()
        expect_code(lambda: stub.CreatePool(pool("authz", "198.18.4.0/24"), metadata=md(controller)),
                    grpc.StatusCode.PERMISSION_DENIED)
        stub.CreatePool(pool("authz", "198.18.4.0/24", "fd00:a::/120"), metadata=md(admin))
        # The shim does its job...
        alloc = stub.Allocate(pb.AllocateRequest(pool="authz", owner="c1/eth0", ip_family_policy=REQUIRE),
                              metadata=md(shim)).allocation
        assert len(alloc.addresses) == 2
        assert stub.GetAllocation(pb.GetAllocationRequest(pool="authz", owner="c1/eth0"), metadata=md(shim)) == alloc
        # ...but may not list, collect or delete.
        expect_code(lambda: stub.ListAllocations(pb.ListAllocationsRequest(pool="authz"), metadata=md(shim)),
                    grpc.StatusCode.PERMISSION_DENIED)
        expect_code(lambda: stub.DeletePool(pb.DeletePoolRequest(name="authz", force=True), metadata=md(shim)),
                    grpc.StatusCode.PERMISSION_DENIED)
        listed = stub.ListAllocations(pb.ListAllocationsRequest(pool="authz"), metadata=md(controller))
        assert [a.owner for a in listed.allocations] == ["c1/eth0"]
        expect_code(lambda: stub.DeletePool(pb.DeletePoolRequest(name="authz", force=True), metadata=md(controller)),
                    grpc.StatusCode.PERMISSION_DENIED)
        assert stub.Release(pb.ReleaseRequest(pool="authz", owner="c1/eth0"), metadata=md(shim)).released
        stub.DeletePool(pb.DeletePoolRequest(name="authz"), metadata=md(admin))
        expect_code(lambda: stub.GetPool(pb.GetPoolRequest(name="authz"), metadata=md(admin)),
                    grpc.StatusCode.NOT_FOUND)


def test_missing_or_unknown_token_is_unauthenticated(token_server, tokens, clean_db):
    with grpc.insecure_channel(token_server.target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        request = pb.AllocateRequest(pool="nopool", owner="c1/eth0")
        err = expect_code(lambda: stub.Allocate(request), grpc.StatusCode.UNAUTHENTICATED)
        assert error_info(err).reason == "UNAUTHENTICATED"
        expect_code(lambda: stub.Allocate(request, metadata=md("dsipam_not-a-real-token")),
                    grpc.StatusCode.UNAUTHENTICATED)
        expect_code(lambda: stub.Allocate(request, metadata=(("authorization", "Basic YWRtaW46YWRtaW4="),)),
                    grpc.StatusCode.UNAUTHENTICATED)
        # A known token whose salt/hash is used as the token is not the token.
        hashed = tokens["admin"][1].split("hash: ", 1)[1].strip()
        expect_code(lambda: stub.ListPools(pb.ListPoolsRequest(), metadata=md(hashed)), grpc.StatusCode.UNAUTHENTICATED)
        # The same request with the shim's token gets past authentication (to the pool lookup).
        expect_code(lambda: stub.Allocate(request, metadata=md(tokens["shim"][0])), grpc.StatusCode.NOT_FOUND)
        # Health and reflection need no token.
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert SERVICE.full_name in names


def test_every_method_needs_its_role(token_server, tokens, clean_db):
    """Each IpamService method of the proto, called with an empty request: a role below the
    method's is PERMISSION_DENIED, and its own role gets past authorisation."""
    with grpc.insecure_channel(token_server.target) as ch:
        for method in SERVICE.methods:
            needs = "shim" if method.name in SHIM_METHODS else "admin" if method.name in ADMIN_METHODS else "controller"
            for role in ("shim", "controller", "admin"):
                code = call_empty(ch, method, tokens[role][0])
                allowed = ["shim", "controller", "admin"].index(role) >= ["shim", "controller", "admin"].index(needs)
                if allowed:
                    assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), (
                        method.name, role, code)
                else:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, role, code)
            assert call_empty(ch, method, None) == grpc.StatusCode.UNAUTHENTICATED, method.name


def test_role_table_default_is_admin():
    from dsipam.server.security import Role, required_role

    assert required_role("/dsipam.v1.IpamService/SomeFutureMethod") is Role.ADMIN
    assert required_role("/other.Service/Method") is Role.ADMIN
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/dsipam.v1.IpamService/Allocate") is Role.SHIM


def _start(args: list[str], env: dict[str, str], tmp: Path) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"server-{uuid.uuid4().hex[:6]}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}
    full_env.update({"DSIPAM_LOG_LEVEL": "WARNING", "DSIPAM_SHUTDOWN_DELAY": "0", **env})
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "dsipam.server", "serve", *args], env=full_env, stdout=f,
                                stderr=subprocess.STDOUT)
    return proc, log


@pytest.fixture
def mtls_server(db_url, tokens, tmp_path) -> Iterator[tuple[str, str, Pki, Path]]:
    """A server with TLS and required client certificates on TCP, and a unix socket for shims."""
    pki = make_pki(tmp_path)
    clients = ("clients:\n  - cn: node-1.shim\n    role: shim\n    node: node-1\n"
               "  - san: spiffe://dsipam/controller\n    role: controller\n")
    config = write_config(tmp_path / "auth.yaml", tokens, clients, "unix_socket_role: shim\nunix_socket_node: node-1\n")
    port = free_port()
    sock = tmp_path / "dsipam.sock"
    proc, log = _start(
        ["--listen", f"127.0.0.1:{port}", "--listen", f"unix://{sock}", "--tls-cert", str(pki.server_cert),
         "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca), "--auth-config", str(config)],
        {"DSIPAM_DATABASE_URL": db_url}, tmp_path)
    try:
        wait_healthy(f"unix://{sock}", proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError(log.read_text()) from None
    try:
        yield f"127.0.0.1:{port}", f"unix://{sock}", pki, log
    finally:
        proc.terminate()
        proc.wait(20)


def tls_channel(target: str, pki: Pki, cert: str | None) -> grpc.Channel:
    pair = pki.certs[cert] if cert else None
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pair[1].read_bytes() if pair else None,
        certificate_chain=pair[0].read_bytes() if pair else None,
    )
    return grpc.secure_channel(target, creds)


def test_mutual_tls_roles_and_handshake(mtls_server, tokens, clean_db):
    target, unix_target, pki, log = mtls_server
    assert "(TLS with client certificates)" in log.read_text()
    admin = tokens["admin"][0]
    # The shim's certificate: Allocate yes, CreatePool no.
    with tls_channel(target, pki, "shim") as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        expect_code(lambda: stub.CreatePool(pool("mtls", "198.18.5.0/24", "fd00:b::/120"), timeout=10),
                    grpc.StatusCode.PERMISSION_DENIED)
        stub.CreatePool(pool("mtls", "198.18.5.0/24", "fd00:b::/120"), metadata=md(admin), timeout=10)
        got = stub.Allocate(pb.AllocateRequest(pool="mtls", owner="c1/eth0", ip_family_policy=REQUIRE), timeout=10)
        assert len(got.allocation.addresses) == 2
    # The controller's certificate, mapped by its URI SAN, may list.
    with tls_channel(target, pki, "controller") as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        owners = [a.owner for a in stub.ListAllocations(pb.ListAllocationsRequest(pool="mtls"), timeout=10).allocations]
        assert owners == ["c1/eth0"]
        expect_code(lambda: stub.DeletePool(pb.DeletePoolRequest(name="mtls"), timeout=10),
                    grpc.StatusCode.PERMISSION_DENIED)
    # A certificate of the right CA that maps to no role: denied, unless a token says who it is.
    with tls_channel(target, pki, "unmapped") as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        err = expect_code(lambda: stub.GetAllocation(pb.GetAllocationRequest(pool="mtls", owner="c1/eth0"), timeout=10),
                          grpc.StatusCode.PERMISSION_DENIED)
        assert "nobody-knows-me" in err.details()
        stub.GetAllocation(pb.GetAllocationRequest(pool="mtls", owner="c1/eth0"), metadata=md(tokens["shim"][0]),
                           timeout=10)
    # A certificate of another CA (with the shim's name), no certificate, or no TLS: refused at the handshake.
    for cert in ("rogue", None):
        with tls_channel(target, pki, cert) as ch:
            err = expect_code(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5),
                              grpc.StatusCode.UNAVAILABLE)
    with grpc.insecure_channel(target) as ch:
        expect_code(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5),
                    grpc.StatusCode.UNAVAILABLE)
    # The unix socket: plaintext, guarded by its file mode, callers are shims.
    sock = Path(unix_target.removeprefix("unix://"))
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    with grpc.insecure_channel(unix_target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        got = stub.Allocate(pb.AllocateRequest(pool="mtls", owner="c2/eth0", ip_family_policy=REQUIRE), timeout=10)
        assert len(got.allocation.addresses) == 2
        expect_code(lambda: stub.ListAllocations(pb.ListAllocationsRequest(pool="mtls"), timeout=10),
                    grpc.StatusCode.PERMISSION_DENIED)
        stub.DeletePool(pb.DeletePoolRequest(name="mtls", force=True), metadata=md(admin), timeout=10)


def test_tls_with_tokens_and_no_client_certificates(db_url, tokens, tmp_path, clean_db):
    pki = make_pki(tmp_path)
    config = write_config(tmp_path / "auth.json", {}, extra="")  # replaced below: JSON works too
    entries = [{"name": f"{r}-test", "role": r, "hash": tokens[r][1].split("hash: ", 1)[1].strip(),
                **({"node": "node-1"} if r == "shim" else {})} for r in tokens]
    config.write_text(json.dumps({"tokens": entries, "unix_socket_role": "none"}))
    port = free_port()
    sock = tmp_path / "s.sock"
    proc, log = _start(["--listen", f"127.0.0.1:{port}", "--listen", f"unix://{sock}", "--tls-cert",
                        str(pki.server_cert), "--tls-key", str(pki.server_key), "--auth-config", str(config)],
                       {"DSIPAM_DATABASE_URL": db_url}, tmp_path)
    try:
        wait_healthy(f"unix://{sock}", proc=proc)
        with tls_channel(f"127.0.0.1:{port}", pki, None) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            expect_code(lambda: stub.ListPools(pb.ListPoolsRequest(), timeout=10), grpc.StatusCode.UNAUTHENTICATED)
            stub.ListPools(pb.ListPoolsRequest(), metadata=md(tokens["controller"][0]), timeout=10)
        with grpc.insecure_channel(f"unix://{sock}") as ch:  # unix_socket_role: none
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            expect_code(lambda: stub.GetAllocation(pb.GetAllocationRequest(pool="p", owner="o"), timeout=10),
                        grpc.StatusCode.UNAUTHENTICATED)
    finally:
        proc.terminate()
        proc.wait(20)
    assert "(TLS)" in log.read_text()


def test_refuses_to_start_without_auth_config_or_insecure(db_url, tmp_path):
    proc, log = _start(["--listen", f"127.0.0.1:{free_port()}"], {"DSIPAM_DATABASE_URL": db_url}, tmp_path)
    assert proc.wait(60) != 0
    assert "refusing to start: no authentication is configured" in log.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokens:\n  - name: x\n    role: superuser\n    hash: sha256:00\n")
    proc, log = _start(["--listen", f"127.0.0.1:{free_port()}", "--auth-config", str(bad)],
                       {"DSIPAM_DATABASE_URL": db_url}, tmp_path)
    assert proc.wait(60) != 0
    assert "tokens[0].role: 'superuser' is not a role" in log.read_text()
    proc, log = _start(["--listen", f"127.0.0.1:{free_port()}", "--auth-config", str(bad), "--insecure"],
                       {"DSIPAM_DATABASE_URL": db_url}, tmp_path)
    assert proc.wait(60) != 0
    assert "--insecure and an auth config contradict" in log.read_text()


def test_insecure_is_announced(db_url, tmp_path):
    server = spawn_server(db_url, tmp_path, args=("--insecure",))
    try:
        with grpc.insecure_channel(server.target) as ch:
            ipam_pb2_grpc.IpamServiceStub(ch).ListPools(pb.ListPoolsRequest(), timeout=10)
    finally:
        server.terminate()
    assert "dsipam: WARNING: authentication is off (--insecure)" in server.log()
