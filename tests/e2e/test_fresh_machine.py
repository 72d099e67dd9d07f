"""README's first command on a fresh machine: `dsipam serve` with no database URL starts a
private PostgreSQL, migrates it and serves on 127.0.0.1:50051 (here: a free port)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import REQUIRE, pool
from support import free_port, wait_healthy

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc


def test_serve_without_database_url_starts_a_private_postgres():
    data = tempfile.mkdtemp(prefix="dsipam-embedded-", dir="/tmp")
    os.chmod(data, 0o755)  # PostgreSQL runs as an unprivileged user when we are root
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DSIPAM_DATABASE_URL"}
    env["DSIPAM_SHUTDOWN_DELAY"] = "0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsipam.server", "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout=90, proc=proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            stub.CreatePool(pool("pods", "198.18.0.0/24", "fd00::/120"))
            resp = stub.Allocate(pb.AllocateRequest(pool="pods", owner="c1/eth0", ip_family_policy=REQUIRE))
            assert len(resp.allocation.addresses) == 2
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "started a private PostgreSQL" in out and data in out
        assert "private PostgreSQL stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pgdata = os.path.join(data, "pgdata")
        if os.path.exists(os.path.join(pgdata, "postmaster.pid")):
            from dsipam.server.embedded import _find_bindir

            subprocess.run(["runuser", "-u", "postgres", "--", str(_find_bindir() / "pg_ctl"), "-D", pgdata,
                            "stop", "-m", "immediate"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def _serve_private(data: str, port: int, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}
    env["DSIPAM_SHUTDOWN_DELAY"] = "0"
    return subprocess.Popen(
        [sys.executable, "-m", "dsipam.server", "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data, *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return out


def _allocate(port: int, owner: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = ipam_pb2_grpc.IpamServiceStub(ch).Allocate(
            pb.AllocateRequest(pool="pods", owner=owner, ip_family_policy=REQUIRE), timeout=30)
        assert len(resp.allocation.addresses) == 2


def test_two_servers_share_the_private_postgres_and_the_last_stops_it():
    """Issue 17 finding 9: a second `dsipam serve` with the same data directory (as root the default
    /var/lib/dsipam is machine-wide) used to restart the first one's PostgreSQL on another port and
    stop it on exit, leaving the first answering DATABASE_UNAVAILABLE. Now it shares it."""
    data = tempfile.mkdtemp(prefix="dsipam-embedded-", dir="/tmp")
    os.chmod(data, 0o755)
    first_port, second_port = free_port(), free_port()
    first = _serve_private(data, first_port)
    second = None
    try:
        wait_healthy(f"127.0.0.1:{first_port}", timeout=90, proc=first)
        with grpc.insecure_channel(f"127.0.0.1:{first_port}") as ch:
            ipam_pb2_grpc.IpamServiceStub(ch).CreatePool(pool("pods", "198.18.0.0/24", "fd00::/120"))
        _allocate(first_port, "a")
        second = _serve_private(data, second_port)
        wait_healthy(f"127.0.0.1:{second_port}", timeout=90, proc=second)
        _allocate(first_port, "b")  # the first still serves
        _allocate(second_port, "c")  # the same database
        # dsipam fsck finds the running private PostgreSQL without a URL
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}
        fsck = subprocess.run([sys.executable, "-m", "dsipam.server", "fsck", "pods", "--data-dir", data],
                              capture_output=True, text=True, timeout=60, env=env)
        assert fsck.returncode == 0 and fsck.stdout.strip().endswith("fsck pods: clean"), fsck.stderr
        out_second = _stop(second)
        assert "uses the private PostgreSQL another dsipam serve started" in out_second
        assert "left running for 1 other" in out_second and "private PostgreSQL stopped" not in out_second
        _allocate(first_port, "d")  # the first one's database outlived the second server
        with grpc.insecure_channel(f"127.0.0.1:{first_port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        out_first = _stop(first)
        assert "started a private PostgreSQL" in out_first and "private PostgreSQL stopped" in out_first
        assert not os.path.exists(os.path.join(data, "pgdata", "postmaster.pid"))
        assert not os.path.exists(os.path.join(data, "postgres.url"))
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        _stop_postgres(data)


def test_a_server_killed_without_notice_does_not_keep_the_postgres_shared():
    """A user that died (SIGKILL) is noticed by its pid: the next server restarts PostgreSQL afresh and
    stops it when it exits."""
    data = tempfile.mkdtemp(prefix="dsipam-embedded-", dir="/tmp")
    os.chmod(data, 0o755)
    port = free_port()
    proc = _serve_private(data, port)
    again = None
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout=90, proc=proc)
        proc.kill()
        proc.wait()
        again = _serve_private(data, port)
        wait_healthy(f"127.0.0.1:{port}", timeout=90, proc=again)
        out = _stop(again)
        assert "started a private PostgreSQL" in out and "private PostgreSQL stopped" in out, out
        assert not os.path.exists(os.path.join(data, "pgdata", "postmaster.pid"))
    finally:
        for p in (proc, again):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        _stop_postgres(data)


def test_private_postgres_mode_is_not_insecure_on_a_non_loopback_address():
    """Issue 13 finding 9: without a database URL, serve switched authentication off on any address."""
    data = tempfile.mkdtemp(prefix="dsipam-embedded-", dir="/tmp")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}
        result = subprocess.run(
            [sys.executable, "-m", "dsipam.server", "serve", "--listen", f"0.0.0.0:{free_port()}", "--data-dir", data],
            capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "loopback" in result.stderr and "--insecure" in result.stderr
        assert "private PostgreSQL" not in result.stdout and not os.path.exists(os.path.join(data, "pgdata"))
    finally:
        _stop_postgres(data)  # had it started one (the old behaviour), stop it


def _stop_postgres(data: str) -> None:
    pgdata = os.path.join(data, "pgdata")
    if os.path.exists(os.path.join(pgdata, "postmaster.pid")):
        from dsipam.server.embedded import _find_bindir

        subprocess.run(["runuser", "-u", "postgres", "--", str(_find_bindir() / "pg_ctl"), "-D", pgdata,
                        "stop", "-m", "immediate"], capture_output=True)
    shutil.rmtree(data, ignore_errors=True)
