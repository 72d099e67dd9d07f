"""The SDK and the CLI against a real server that requires TLS and bearer tokens
(``dsipam serve --tls-cert --tls-key --auth-config``): tokens by value and by file, roles
(PERMISSION_DENIED), no or unknown token (UNAUTHENTICATED), neither retried."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import free_port, wait_healthy

import dsipam.client as sdk
from dsipam.client import AsyncIpamClient, IpamClient, RetryPolicy, TlsConfig

DSIPAM = str(Path(sys.executable).with_name("dsipam"))
DUAL = ["198.18.0.0/24", "fd00::/120"]

WAIT = 30.0  # deadline of the tests' calls: generous, for a loaded machine


@dataclass
class AuthServer:
    target: str
    ca: Path
    tokens: dict[str, str]  # role -> token
    token_files: dict[str, Path]


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
def auth_server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    tmp = tmp_path_factory.mktemp("sdk-auth")
    _write_pki(tmp, ["localhost"], ["127.0.0.1"])
    tokens: dict[str, str] = {}
    entries = []
    for role in ("shim", "controller", "admin"):
        node = ["--node", "sdk-node"] if role == "shim" else []  # a shim token names its node
        out = subprocess.run([DSIPAM, "token", "new", role, "--name", f"sdk-{role}", *node], capture_output=True,
                             text=True, check=True)
        tokens[role] = out.stdout.strip()
        entries.append(out.stderr.split("auth config entry (under tokens:):\n", 1)[1])
    config = tmp / "auth.yaml"
    config.write_text("tokens:\n" + "".join(entries))
    token_files = {}
    for role, token in tokens.items():
        token_files[role] = tmp / f"{role}.token"
        token_files[role].write_text(token + "\n")
    port = free_port()
    sock = tmp / "dsipam.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}
    env.update({"DSIPAM_DATABASE_URL": db_url, "DSIPAM_LOG_LEVEL": "WARNING", "DSIPAM_SHUTDOWN_DELAY": "0"})
    log = tmp / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsipam.server", "serve", "--listen", f"127.0.0.1:{port}", "--listen",
             f"unix://{sock}", "--tls-cert", str(tmp / "server.pem"), "--tls-key", str(tmp / "server.key"),
             "--auth-config", str(config)],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"unix://{sock}", proc=proc)  # health is open to everybody
        yield AuthServer(f"127.0.0.1:{port}", tmp / "ca.pem", tokens, token_files)
    except Exception:
        raise RuntimeError(log.read_text()) from None
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_sync_tokens_and_roles(auth_server: AuthServer, clean_db: str) -> None:
    tls = TlsConfig(ca_file=auth_server.ca)
    with IpamClient(auth_server.target, tls=tls, token=auth_server.tokens["admin"], timeout=WAIT) as admin:
        admin.create_pool("auth", DUAL)
    with IpamClient(auth_server.target, tls=tls, token=auth_server.tokens["shim"],
                    retry=RetryPolicy(max_attempts=5), timeout=WAIT) as shim:
        assert shim.allocate("auth", "c1/eth0", policy="require").created
        with pytest.raises(sdk.PermissionDenied) as denied:
            shim.create_pool("other", DUAL)
    err = denied.value
    assert (err.code, err.reason, err.attempts) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", 1)
    assert "CreatePool" in err.message
    for token in (None, "not-a-token"):
        with IpamClient(auth_server.target, tls=tls, token=token, retry=RetryPolicy(max_attempts=5),
                        timeout=WAIT) as anonymous:
            with pytest.raises(sdk.Unauthenticated) as caught:
                anonymous.get_pool("auth")
        assert caught.value.reason == "UNAUTHENTICATED" and caught.value.attempts == 1


async def test_async_token_file(auth_server: AuthServer, clean_db: str) -> None:
    tls = TlsConfig(ca_file=str(auth_server.ca))
    async with AsyncIpamClient(auth_server.target, tls=tls, token_file=auth_server.token_files["admin"],
                               timeout=WAIT) as admin:
        await admin.create_pool("auth", DUAL)
        await admin.allocate("auth", "o", policy="require")
    async with AsyncIpamClient(auth_server.target, tls=tls,
                               token_file=auth_server.token_files["controller"], timeout=WAIT) as controller:
        assert [a.owner async for a in controller.iter_allocations("auth")] == ["o"]
        with pytest.raises(sdk.PermissionDenied):
            await controller.delete_pool("auth", force=True)


def test_cli_with_tls_and_tokens(auth_server: AuthServer, clean_db: str) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}
    env = {**base, "DSIPAM_TARGET": auth_server.target, "DSIPAM_CA_FILE": str(auth_server.ca),
           "DSIPAM_TIMEOUT": str(WAIT)}

    def dsipam(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DSIPAM, *args], capture_output=True, text=True, timeout=60, env={**env, **extra})

    made = dsipam("--token-file", str(auth_server.token_files["admin"]), "pool", "create", "cli",
                  "--range", "198.18.10.0/24")
    assert made.returncode == 0, made.stderr
    got = dsipam("alloc", "cli", "o", DSIPAM_TOKEN=auth_server.tokens["shim"])
    assert got.returncode == 0 and "198.18.10." in got.stdout
    denied = dsipam("pool", "delete", "cli", "--force", DSIPAM_TOKEN=auth_server.tokens["shim"])
    assert denied.returncode == 1 and denied.stderr.strip().endswith("[PERMISSION_DENIED]")
    anonymous = dsipam("pool", "list")
    assert anonymous.returncode == 1 and "[UNAUTHENTICATED]" in anonymous.stderr
    assert len(anonymous.stderr.strip().splitlines()) == 1
