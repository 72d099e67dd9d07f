"""The server process: graceful SIGTERM, database outages, INTERNAL errors, generated code and migrations."""

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import REQUIRE, error_info, pool
from support import ADMIN_URL, ROOT, database_url, free_port, psql, spawn_server

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


# -- start-up: the schema check, a database that goes away, the log (issue 17, finding 11) ---------------------


@pytest.fixture
def empty_database():
    name = f"dsipam_test_empty_{uuid.uuid4().hex[:10]}"
    psql(ADMIN_URL, f"CREATE DATABASE {name}")
    yield database_url(name)
    psql(ADMIN_URL, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _serve(*args, env=None, timeout=60):
    base = {k: v for k, v in os.environ.items() if not k.startswith("DSIPAM_")}
    return subprocess.run([sys.executable, "-m", "dsipam.server", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, "DSIPAM_SHUTDOWN_DELAY": "0", **(env or {})})


def test_an_unmigrated_database_is_refused_at_start_up(empty_database):
    port = free_port()
    result = _serve("--listen", f"127.0.0.1:{port}", "--database-url", empty_database, "--insecure")
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "has no dsipam schema" in lines[0] and "dsipam migrate" in lines[0] and "--migrate" in lines[0]
    assert "listening" not in result.stdout
    # migrated part of the way: named with both revisions
    subprocess.run([sys.executable, "-m", "dsipam.server", "migrate", "--database-url", empty_database,
                    "--revision", "0002"], check=True, capture_output=True)
    result = _serve("--listen", f"127.0.0.1:{port}", "--database-url", empty_database, "--insecure")
    assert result.returncode == 1 and "schema revision 0002" in result.stderr, result.stderr
    from dsipam.server.migrate import head_revision

    assert f"needs {head_revision()}" in result.stderr


def test_migrate_flag_migrates_then_serves_with_a_quiet_start(empty_database, tmp_path):
    server = spawn_server(empty_database, tmp_path, args=("--migrate",), extra_env={"DSIPAM_LOG_LEVEL": "INFO"})
    try:
        with grpc.insecure_channel(server.target) as ch:
            ipam_pb2_grpc.IpamServiceStub(ch).CreatePool(pool("m", "198.18.0.0/24"))
    finally:
        server.terminate()
    log = server.log()
    from dsipam.server.migrate import head_revision

    assert f"dsipam: database migrated from an empty schema to {head_revision()}" in log
    assert "alembic" not in log  # no plugin set-up lines, no "Context impl", no line per revision
    assert log.count("listening on") == 1 and log.count("authentication is off") == 1, log
    assert log.count("shutting down") == 1, log
    assert "Traceback" not in log


def test_a_missing_database_is_refused_at_start_up():
    missing = database_url(f"dsipam_missing_{uuid.uuid4().hex[:8]}")
    result = _serve("--listen", f"127.0.0.1:{free_port()}", "--database-url", missing, "--insecure")
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "does not exist" in result.stderr, result.stderr


def test_a_dropped_database_is_not_serving_and_unavailable_with_one_error_line(tmp_path):
    name = f"dsipam_test_drop_{uuid.uuid4().hex[:10]}"
    psql(ADMIN_URL, f"CREATE DATABASE {name}")
    url = database_url(name)
    try:
        subprocess.run([sys.executable, "-m", "dsipam.server", "migrate", "--database-url", url], check=True,
                       capture_output=True)
        server = spawn_server(url, tmp_path, extra_env={"DSIPAM_DB_HEALTH_INTERVAL": "0.5"})
        try:
            psql(ADMIN_URL, f"DROP DATABASE {name} WITH (FORCE)")
            deadline = time.monotonic() + 20
            while health(server.target) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "health stayed SERVING"
                time.sleep(0.2)
            with grpc.insecure_channel(server.target) as ch:
                stub = ipam_pb2_grpc.IpamServiceStub(ch)
                for _ in range(3):
                    with pytest.raises(grpc.RpcError) as err:
                        stub.Allocate(pb.AllocateRequest(pool="pods", owner="o"), timeout=20)
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                    assert error_info(err.value).reason == "DATABASE_UNAVAILABLE"
            time.sleep(5)  # two maintenance rounds and ten health pings later
        finally:
            server.terminate()
        log = server.log()
        assert "Traceback" not in log, log
        # the server's own health watch: one line for the change (the watch listener of store/_watch.py
        # logs its reconnection attempts, with a growing backoff, on its own logger)
        errors = [line for line in log.splitlines() if " ERROR dsipam.server " in line]
        assert len(errors) == 1 and "database unreachable" in errors[0] and "does not exist" in errors[0], log
        assert log.count("maintenance round") <= 1, log
    finally:
        psql(ADMIN_URL, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class _Forwarder:
    """A TCP forwarder to the real PostgreSQL, started late: the database is unreachable on its
    port until then."""

    def __init__(self, port: int) -> None:
        import socket

        self.listener = socket.create_server(("127.0.0.1", port))
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", 5432))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:  # type: ignore[no-untyped-def]
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def test_an_outage_at_start_up_logs_one_error_per_loop_counts_every_attempt_and_one_line_at_its_end(db_url, tmp_path):
    """The token keys were read every second with an ERROR line each, without end; the maintenance
    loop logged every round. Now: one line each when the outage starts and when it ends, every
    failed token-key read counted."""
    from support import metric_sum

    port = free_port()
    url = db_url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")
    assert url != db_url
    server = spawn_server(url, tmp_path, wait_serving=False,
                          extra_env={"DSIPAM_LOG_LEVEL": "INFO", "DSIPAM_DB_HEALTH_INTERVAL": "0.5"})
    forwarder = None
    try:
        time.sleep(5)  # five token-key attempts, two maintenance rounds, ten pings
        assert health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        failures = metric_sum(server.metrics_text() or "", "dsipam_token_key_refresh_failures_total")
        assert failures >= 4, (failures, server.log())
        forwarder = _Forwarder(port)
        deadline = time.monotonic() + 20
        while "token keys read from the database again" not in server.log() or \
                "maintenance resumed" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        assert health(server.target) == health_pb2.HealthCheckResponse.SERVING
        time.sleep(2.5)  # a key refresh and a maintenance round after the end
        assert metric_sum(server.metrics_text() or "", "dsipam_token_key_refresh_failures_total") >= failures
    finally:
        server.terminate()
        if forwarder is not None:
            forwarder.close()
    log = server.log()
    assert "Traceback" not in log, log
    keys = [line for line in log.splitlines() if "token keys not read" in line]
    assert len(keys) == 1 and " ERROR " in keys[0], log
    assert log.count("token keys read from the database again") == 1, log
    assert log.count("maintenance round skipped") == 1 and log.count("maintenance resumed") == 1, log
    assert len([line for line in log.splitlines() if " ERROR dsipam.server database unreachable (" in line]) == 1, log
    assert log.count("watch listener failed") == 1, log  # then DEBUG, with a growing backoff
