"""Helpers shared by the tests: databases, server processes, free ports."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


FAST_PATH_ERROR_METRIC = "dsipam_fast_path_errors_total"
FAST_PATH_ERROR_LINE = "fast path error"  # the fast path's ERROR log line (store/_fast.py)
_METRICS_LINE = re.compile(r"dsipam: metrics on http://(\S+)/metrics")


@dataclass
class ServerProcess:
    target: str
    proc: subprocess.Popen
    log_path: Path
    # A test that provokes fast-path errors on purpose sets this (and asserts the counter went up);
    # otherwise terminate() fails when the server counted or logged any (see check_fast_path).
    fast_path_errors_expected: bool = False
    _checked_errors: float = 0.0  # what check_fast_path has seen (and reported) so far
    _checked_log: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_address(self) -> str | None:
        """host:port of /metrics, from the line the server prints once it serves (None: no metrics)."""
        found = _METRICS_LINE.search(self.log())
        return found.group(1) if found else None

    def fast_path_errors(self) -> float | None:
        """The server's ``dsipam_fast_path_errors_total`` (all kinds); None when it cannot be scraped."""
        address = self.metrics_address()
        if address is None or self.proc.poll() is not None:
            return None
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(FAST_PATH_ERROR_METRIC + "{") or line.startswith(FAST_PATH_ERROR_METRIC + " "))

    def fast_path_error_lines(self, since: int = 0) -> list[str]:
        """The fast path's ERROR lines in the log from character ``since`` on."""
        return [line for line in self.log()[since:].splitlines() if FAST_PATH_ERROR_LINE in line]

    def check_fast_path(self, *, errors_before: float | None = None, log_from: int | None = None,
                        errors_now: float | None = None, who: str = "") -> None:
        """Fails when the server counted or logged a fast-path error since ``errors_before`` /
        ``log_from`` (default: since the last check, so an error is reported once). A database
        outage is not one (the fast path reports those as DatabaseUnavailable)."""
        if self.fast_path_errors_expected:
            return
        if errors_now is None:
            errors_now = self.fast_path_errors()
        errors_before = self._checked_errors if errors_before is None else errors_before
        log_from = self._checked_log if log_from is None else log_from
        text = self.log()
        lines = [line for line in text[log_from:].splitlines() if FAST_PATH_ERROR_LINE in line]
        counted = (errors_now or 0.0) - errors_before
        self._checked_errors, self._checked_log = max(self._checked_errors, errors_now or 0.0), len(text)
        if counted > 0 or lines:
            who = who or os.environ.get("PYTEST_CURRENT_TEST", "?")
            shown = "\n".join(lines[:5]) or "(no log line: the log level hides ERROR?)"
            raise AssertionError(
                f"fast-path errors in the server at {self.target} (log {self.log_path}) during {who}: "
                f"{FAST_PATH_ERROR_METRIC} went up by {counted:g}; log:\n{shown}"
            )

    def terminate(self, timeout: float = 20.0) -> int:
        errors_now = None if self.fast_path_errors_expected else self.fast_path_errors()  # scrape while it runs
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.check_fast_path(errors_now=errors_now)
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
    # Metrics on a port of the system's choosing (printed in the log): the fast-path error check reads
    # them. The pool gauges then read every pool's usage at start and every interval: rarely here.
    env.update({"DSIPAM_DATABASE_URL": db_url, "DSIPAM_LOG_LEVEL": "WARNING", "DSIPAM_SHUTDOWN_DELAY": "0",
                "DSIPAM_INSECURE": "1", "DSIPAM_METRICS_LISTEN": "127.0.0.1:0", "DSIPAM_METRICS_POOL_INTERVAL": "3600",
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
