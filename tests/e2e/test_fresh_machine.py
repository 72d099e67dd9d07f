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
