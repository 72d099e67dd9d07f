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


def install_plugin(bin_dir: Path, compiled: Path | None = None) -> Path:
    """``dsipam-cni install [--compiled BINARY] DIR``: the Python plugin's launcher, or the compiled
    plugin; returns ``DIR/dsipam``, what a runtime runs for ``"type": "dsipam"``."""
    extra = ["--compiled", str(compiled)] if compiled is not None else []
    subprocess.run([sys.executable, "-m", "dsipam.cni", "install", *extra, str(bin_dir)], check=True,
                   capture_output=True)
    return bin_dir / "dsipam"


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
BACKGROUND_ERROR_METRIC = "dsipam_background_errors_total"  # server/dsipam/server/background.py
BACKGROUND_ERROR_LINE = "background error ("  # its ERROR log line
TRACEBACK_LINE = "Traceback (most recent call last)"  # any exception logged with its traceback
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|\{)")  # a log record's first line (text or JSON)
_METRICS_LINE = re.compile(r"dsipam: metrics on http://(\S+)/metrics")


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of counter ``name`` (all labels) in a /metrics page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


@dataclass
class ServerProcess:
    target: str
    proc: subprocess.Popen
    log_path: Path
    # A test that provokes fast-path errors on purpose sets this (and asserts the counter went up);
    # otherwise terminate() fails when the server counted or logged any (see check_fast_path).
    fast_path_errors_expected: bool = False
    # The same for background errors (dsipam_background_errors_total) and for tracebacks in the
    # log (an exception logged with exc_info: INTERNAL answers, background errors, crashes). A
    # traceback is judged by the log line that carries it: with fast_path_errors_expected those of
    # fast-path error lines are expected, with background_errors_expected those of background
    # errors, and a test that provokes others names their lines' text in expected_traceback_lines
    # (an outage test: asyncpg's "Failed to restore the pool connection floor"); tracebacks_expected
    # allows every one.
    background_errors_expected: bool = False
    tracebacks_expected: bool = False
    expected_traceback_lines: tuple[str, ...] = ()
    _checked_errors: float = 0.0  # what check_fast_path has seen (and reported) so far
    _checked_background: float = 0.0
    _checked_log: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_address(self) -> str | None:
        """host:port of /metrics, from the line the server prints once it serves (None: no metrics)."""
        found = _METRICS_LINE.search(self.log())
        return found.group(1) if found else None

    def metrics_text(self) -> str | None:
        """The server's /metrics page; None when it cannot be scraped."""
        address = self.metrics_address()
        if address is None or self.proc.poll() is not None:
            return None
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
                return resp.read().decode()
        except OSError:
            return None

    def fast_path_errors(self) -> float | None:
        """The server's ``dsipam_fast_path_errors_total`` (all kinds); None when it cannot be scraped."""
        text = self.metrics_text()
        return None if text is None else metric_sum(text, FAST_PATH_ERROR_METRIC)

    def background_errors(self) -> float | None:
        """The server's ``dsipam_background_errors_total`` (all tasks); None when it cannot be scraped."""
        text = self.metrics_text()
        return None if text is None else metric_sum(text, BACKGROUND_ERROR_METRIC)

    def fast_path_error_lines(self, since: int = 0) -> list[str]:
        """The fast path's ERROR lines in the log from character ``since`` on."""
        return [line for line in self.log()[since:].splitlines() if FAST_PATH_ERROR_LINE in line]

    def check_fast_path(self, *, errors_before: float | None = None, log_from: int | None = None,
                        errors_now: float | None = None, background_now: float | None = None,
                        who: str = "") -> None:
        """Fails when, since ``errors_before`` / ``log_from`` (default: since the last check, so
        an error is reported once), the server counted or logged a fast-path error, counted a
        background error, or logged a traceback; each unless the test opted out (the flags
        above). A database outage is none of these (the server reports those as
        DatabaseUnavailable, without a traceback)."""
        text = self.log()
        log_from = self._checked_log if log_from is None else log_from
        new_log = text[log_from:]
        self._checked_log = len(text)
        problems = []
        if not self.fast_path_errors_expected:
            if errors_now is None:
                errors_now = self.fast_path_errors()
            errors_before = self._checked_errors if errors_before is None else errors_before
            lines = [line for line in new_log.splitlines() if FAST_PATH_ERROR_LINE in line]
            counted = (errors_now or 0.0) - errors_before
            self._checked_errors = max(self._checked_errors, errors_now or 0.0)
            if counted > 0 or lines:
                shown = "\n".join(lines[:5]) or "(no log line: the log level hides ERROR?)"
                problems.append(f"fast-path errors: {FAST_PATH_ERROR_METRIC} went up by {counted:g}; log:\n{shown}")
        if not self.background_errors_expected:
            if background_now is None:
                background_now = self.background_errors()
            counted = (background_now or 0.0) - self._checked_background
            self._checked_background = max(self._checked_background, background_now or 0.0)
            if counted > 0:
                problems.append(f"background errors: {BACKGROUND_ERROR_METRIC} went up by {counted:g}")
        if not self.tracebacks_expected:
            unexpected = self.unexpected_tracebacks(new_log)
            if unexpected:
                problems.append(f"{len(unexpected)} traceback(s) in the log; the first:\n{unexpected[0]}")
        if problems:
            who = who or os.environ.get("PYTEST_CURRENT_TEST", "?")
            raise AssertionError(f"the server at {self.target} (log {self.log_path}) during {who}: "
                                 + "\n".join(problems))

    check_errors = check_fast_path  # the same check by a name that says what it covers

    def unexpected_tracebacks(self, text: str) -> list[str]:
        """Each traceback in ``text`` (with the log line that carries it, and 40 lines) that the
        flags above do not expect."""
        allowed = list(self.expected_traceback_lines)
        if self.fast_path_errors_expected:
            allowed.append(FAST_PATH_ERROR_LINE)
        if self.background_errors_expected:
            allowed.append(BACKGROUND_ERROR_LINE)
        out = []
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if TRACEBACK_LINE not in line:
                continue
            carrier = line if _LOG_LINE.match(line) else next(  # JSON logs carry it in the record's line
                (lines[j] for j in range(i - 1, -1, -1) if _LOG_LINE.match(lines[j])), "")
            if not any(a in carrier for a in allowed):
                out.append("\n".join([carrier, *lines[i:i + 40]]))
        return out

    def terminate(self, timeout: float = 20.0) -> int:
        text = self.metrics_text()  # scrape while it runs
        errors_now = None if text is None else metric_sum(text, FAST_PATH_ERROR_METRIC)
        background_now = None if text is None else metric_sum(text, BACKGROUND_ERROR_METRIC)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.check_fast_path(errors_now=errors_now, background_now=background_now)
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
