"""Helpers shared by the tests: databases, server processes, free ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("DSIPAM_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _psql(url: str, sql: str) -> str:
    return subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-tAc", sql], check=True, capture_output=True, text=True).stdout


def database_url(name: str) -> str:
    base = ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


@contextlib.contextmanager
def scratch_database(prefix: str = "dsipam_test") -> Iterator[str]:
    """A uniquely named, migrated database, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    _psql(ADMIN_URL, f"CREATE DATABASE {name}")
    url = database_url(name)
    try:
        subprocess.run(
            [sys.executable, "-m", "dsipam.server", "migrate", "--database-url", url],
            check=True,
            capture_output=True,
            text=True,
        )
        yield url
    finally:
        _psql(ADMIN_URL, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def psql(url: str, sql: str) -> str:
    return _psql(url, sql).strip()


def wait_healthy(target: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with grpc.insecure_channel(target) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"server at {target} not healthy: {last}")


def wait_listening(target: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Waits until the server answers health checks at all (SERVING or not)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with grpc.insecure_channel(target) as ch:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                return
        except grpc.RpcError:
            time.sleep(0.1)
    raise TimeoutError(f"server at {target} not listening")


@dataclass
class ServerProcess:
    target: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def spawn_server(db_url: str, tmp: Path, *, port: int | None = None, extra_env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), wait_serving: bool = True) -> ServerProcess:
    """Starts ``dsipam serve`` as a real process on a free loopback port and waits for SERVING."""
    port = port or free_port()
    target = f"127.0.0.1:{port}"
    log_path = tmp / f"server-{port}-{uuid.uuid4().hex[:6]}.log"
    env = dict(os.environ)
    env.update({"DSIPAM_DATABASE_URL": db_url, "DSIPAM_LOG_LEVEL": "WARNING", "DSIPAM_SHUTDOWN_DELAY": "0",
                "DSIPAM_INSECURE": "1",
                **(extra_env or {})})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsipam.server", "serve", "--listen", target, *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(target, proc, log_path)
    try:
        if wait_serving:
            wait_healthy(target, proc=proc)
        else:
            wait_listening(target, proc=proc)
    except Exception:
        server.kill()
        raise RuntimeError(f"server did not start:\n{server.log()}") from None
    return server


@contextlib.contextmanager
def running_server(db_url: str, tmp: Path, **kwargs) -> Iterator[ServerProcess]:  # type: ignore[no-untyped-def]
    server = spawn_server(db_url, tmp, **kwargs)
    try:
        yield server
    finally:
        server.terminate()
