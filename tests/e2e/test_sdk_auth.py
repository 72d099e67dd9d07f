"""The SDK and the CLI against a real server that requires TLS and bearer tokens
(``dsipam serve --tls-cert --tls-key --auth-config``): tokens by value and by file, roles
(PERMISSION_DENIED), no or unknown token (UNAUTHENTICATED), neither retried."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dsipam.client as sdk
import grpc
import pytest
from dsipam.client import AsyncIpamClient, IpamClient, RetryPolicy, TlsConfig
from support import free_port, wait_healthy

DSIPAM = str(Path(sys.executable).with_name("dsipam"))
DUAL = ["198.18.0.0/24", "fd00::/120"]


@dataclass
class AuthServer:
    target: str
    ca: Path
    tokens: dict[str, str]  # role -> token
    token_files: dict[str, Path]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _pki(d: Path) -> None:
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=sdk auth CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=dsipam", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=d)


@pytest.fixture(scope="module")
def auth_server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    tmp = tmp_path_factory.mktemp("sdk-auth")
    _pki(tmp)
    tokens: dict[str, str] = {}
    entries = []
    for role in ("shim", "controller", "admin"):
        out = subprocess.run([DSIPAM, "token", "new", role, "--name", f"sdk-{role}"], capture_output=True, text=True,
                             check=True)
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
    with IpamClient(auth_server.target, tls=tls, token=auth_server.tokens["admin"]) as admin:
        admin.create_pool("auth", DUAL)
    with IpamClient(auth_server.target, tls=tls, token=auth_server.tokens["shim"],
                    retry=RetryPolicy(max_attempts=5)) as shim:
        assert shim.allocate("auth", "c1/eth0", policy="require").created
        with pytest.raises(sdk.PermissionDenied) as denied:
            shim.create_pool("other", DUAL)
    err = denied.value
    assert (err.code, err.reason, err.attempts) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", 1)
    assert "CreatePool" in err.message
    for token in (None, "not-a-token"):
        with IpamClient(auth_server.target, tls=tls, token=token, retry=RetryPolicy(max_attempts=5)) as anonymous:
            with pytest.raises(sdk.Unauthenticated) as caught:
                anonymous.get_pool("auth")
        assert caught.value.reason == "UNAUTHENTICATED" and caught.value.attempts == 1


async def test_async_token_file(auth_server: AuthServer, clean_db: str) -> None:
    tls = TlsConfig(ca_file=str(auth_server.ca))
    async with AsyncIpamClient(auth_server.target, tls=tls, token_file=auth_server.token_files["admin"]) as admin:
        await admin.create_pool("auth", DUAL)
        await admin.allocate("auth", "o", policy="require")
    async with AsyncIpamClient(auth_server.target, tls=tls,
                               token_file=auth_server.token_files["controller"]) as controller:
        assert [a.owner async for a in controller.iter_allocations("auth")] == ["o"]
        with pytest.raises(sdk.PermissionDenied):
            await controller.delete_pool("auth", force=True)


def test_cli_with_tls_and_tokens(auth_server: AuthServer, clean_db: str) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}
    env = {**base, "DSIPAM_TARGET": auth_server.target, "DSIPAM_CA_FILE": str(auth_server.ca)}

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
