"""The server process: graceful SIGTERM, database outages, INTERNAL errors, generated code and migrations."""

import asyncio
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import REQUIRE, error_info, pool
from support import ROOT, spawn_server

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc


def health(target):
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status


def test_sigterm_drains_in_flight_calls(db_url, clean_db, tmp_path):
    server = spawn_server(db_url, tmp_path, extra_env={"DSIPAM_SHUTDOWN_DELAY": "1.5", "DSIPAM_SHUTDOWN_GRACE": "30"})
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            stub.CreatePool(pool("drain", "198.18.0.0/24", "fd00::/120"))
            # Hold every range row so the next Allocate has to wait inside the server.
            locker = subprocess.Popen(["psql", db_url, "-q"], stdin=subprocess.PIPE, text=True)
            locker.stdin.write("BEGIN; SELECT 1 FROM ipam_ranges FOR UPDATE;\n")
            locker.stdin.flush()
            time.sleep(0.5)
            result = {}

            def call():
                try:
                    result["resp"] = stub.Allocate(
                        pb.AllocateRequest(pool="drain", owner="inflight", ip_family_policy=REQUIRE), timeout=30)
                except grpc.RpcError as e:
                    result["err"] = e

            t = threading.Thread(target=call)
            t.start()
            time.sleep(0.5)
            server.proc.terminate()  # SIGTERM while the call is in flight
            time.sleep(0.5)
            assert health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert server.proc.poll() is None  # still draining
            locker.stdin.write("COMMIT;\n")
            locker.stdin.close()
            locker.wait(10)
            t.join(30)
            assert "err" not in result, result.get("err")
            assert len(result["resp"].allocation.addresses) == 2
        assert server.proc.wait(30) == 0
        assert "shutting down" in server.log()
    finally:
        server.kill()


def test_database_unreachable_is_unavailable(tmp_path):
    server = spawn_server("postgresql://postgres@127.0.0.1:9/none", tmp_path, wait_serving=False)  # refused
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Allocate(pb.AllocateRequest(pool="pods", owner="o"), timeout=20)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details().startswith("database:")
            assert error_info(err.value).reason == "DATABASE_UNAVAILABLE"
    finally:
        server.terminate()


def test_unexpected_errors_are_internal_without_internals():
    from dsipam.server.rpc.errors import abort_with

    class Context:
        async def abort(self, code, details, trailing_metadata=()):
            self.code, self.details, self.md = code, details, trailing_metadata

    ctx = Context()
    asyncio.run(abort_with(ctx, RuntimeError("secret connection string postgresql://u:pw@db")))
    assert ctx.code == grpc.StatusCode.INTERNAL
    assert "secret" not in ctx.details and "pw" not in ctx.details


def test_generated_code_is_up_to_date():
    out = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


def test_migrations_match_the_models(db_url):
    out = subprocess.run([sys.executable, "-m", "dsipam.server", "migrate", "--check", "--database-url", db_url],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "No new upgrade operations detected" in out.stdout + out.stderr or "matches" in out.stdout
