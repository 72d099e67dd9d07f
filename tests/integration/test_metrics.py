"""Prometheus metrics (scraped over HTTP from a real server), JSON logs with request IDs, and the
lock-retry counter after a real deadlock."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_helpers import REQUIRE, SINGLE, V4, pool
from prometheus_client.parser import text_string_to_metric_families
from support import ServerProcess, free_port, spawn_server
from test_auth import md, new_token, write_config

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc


@pytest.fixture(scope="module")
def tokens() -> dict[str, tuple[str, str]]:
    return {role: new_token(role) for role in ("shim", "admin")}


@pytest.fixture(scope="module")
def metrics_server(db_url, tokens, tmp_path_factory) -> Iterator[tuple[ServerProcess, str]]:
    tmp = tmp_path_factory.mktemp("metrics")
    config = write_config(tmp / "auth.yaml", tokens)
    metrics = f"127.0.0.1:{free_port()}"
    server = spawn_server(db_url, tmp, extra_env={
        "DSIPAM_AUTH_CONFIG": str(config), "DSIPAM_METRICS_LISTEN": metrics, "DSIPAM_METRICS_POOL_INTERVAL": "0.2",
        "DSIPAM_LOG_FORMAT": "json", "DSIPAM_LOG_LEVEL": "INFO",
    })
    yield server, metrics
    server.terminate()


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_rpc_counts_latency_pool_gauges_and_db_pool(metrics_server, tokens, clean_db):
    server, address = metrics_server
    admin, shim = tokens["admin"][0], tokens["shim"][0]
    before = scrape(address)
    with grpc.insecure_channel(server.target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        stub.CreatePool(pool("metrics", "198.18.6.0/24", "fd00:c::/120"), metadata=md(admin))
        for i in range(3):
            stub.Allocate(pb.AllocateRequest(pool="metrics", owner=f"c{i}/eth0", ip_family_policy=REQUIRE),
                          metadata=md(shim))
        stub.Allocate(pb.AllocateRequest(pool="metrics", owner="v4only", ip_family_policy=SINGLE, ip_families=[V4]),
                      metadata=md(shim))
        with pytest.raises(grpc.RpcError):
            stub.GetAllocation(pb.GetAllocationRequest(pool="metrics", owner="nobody"), metadata=md(shim))
        with pytest.raises(grpc.RpcError):
            stub.CreatePool(pool("metrics2", "198.18.7.0/24"), metadata=md(shim))
        usage = {u.family: u for u in stub.GetPool(pb.GetPoolRequest(name="metrics"), metadata=md(admin)).usage}
    after = scrape(address)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("dsipam_rpc_requests_total", method="Allocate", code="OK") == 4
    assert delta("dsipam_rpc_requests_total", method="GetAllocation", code="NOT_FOUND") == 1
    assert delta("dsipam_rpc_requests_total", method="CreatePool", code="PERMISSION_DENIED") == 1
    assert delta("dsipam_rpc_requests_total", method="CreatePool", code="OK") == 1
    assert delta("dsipam_rpc_duration_seconds_count", method="Allocate") == 4
    assert delta("dsipam_rpc_duration_seconds_bucket", method="Allocate", le="+Inf") == 4
    assert delta("dsipam_rpc_duration_seconds_sum", method="Allocate") > 0
    # Database pool: connections were checked out (each timed), and none is held now.
    assert delta("dsipam_db_pool_wait_seconds_count") > 0
    # The pool-gauge refresh (every 0.2 s here) checks a connection out for a moment, so one
    # scrape may land inside it; a connection that leaked would stay checked out at every scrape.
    in_use = [sample(after, "dsipam_db_pool_in_use")]
    while in_use[-1] != 0 and len(in_use) < 50:
        time.sleep(0.05)
        in_use.append(sample(scrape(address), "dsipam_db_pool_in_use"))
    assert in_use[-1] == 0, in_use
    assert sample(after, "dsipam_db_pool_size") == 10
    assert sample(after, "dsipam_db_up") == 1
    assert ("dsipam_db_lock_retries_total", (("sqlstate", "40P01"),)) in after

    # Pool gauges follow the pool (refreshed every 0.2 s here) and agree with GetPool.
    want = {
        ("ipv4", "allocated"): 4, ("ipv6", "allocated"): 3,
        ("ipv4", "free"): usage[pb.IP_FAMILY_IPV4].free, ("ipv6", "free"): usage[pb.IP_FAMILY_IPV6].free,
        ("ipv4", "cooldown"): 0, ("ipv6", "cooldown"): 0,
    }
    deadline = time.monotonic() + 20
    while True:
        now = scrape(address)
        got = {k: sample(now, "dsipam_pool_addresses", pool="metrics", family=k[0], state=k[1]) for k in want}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == want
    assert usage[pb.IP_FAMILY_IPV4].free == 254 - 4


def test_json_logs_carry_the_request_id(metrics_server, tokens, clean_db):
    server, _ = metrics_server
    with grpc.insecure_channel(server.target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        with pytest.raises(grpc.RpcError):
            stub.DeletePool(pb.DeletePoolRequest(name="x"),
                            metadata=md(tokens["shim"][0]) + (("x-request-id", "req-7f3a-from-client"),))
        with pytest.raises(grpc.RpcError):
            stub.DeletePool(pb.DeletePoolRequest(name="y"), metadata=md("wrong-token"))
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        denied = [x for x in lines if x.get("method") == "DeletePool"]
        if len(denied) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    by_client = [x for x in denied if x.get("request_id") == "req-7f3a-from-client"]
    assert len(by_client) == 1, denied
    entry = by_client[0]
    assert entry["level"] == "WARNING" and entry["code"] == "PERMISSION_DENIED"
    assert entry["caller"] == "token:shim-test" and entry["logger"] == "dsipam.access"
    generated = [x for x in denied if x.get("code") == "UNAUTHENTICATED"]
    assert len(generated) == 1 and re.fullmatch(r"[0-9a-f]{32}", generated[0]["request_id"])
    assert all(isinstance(x["ts"], str) and x["msg"] for x in lines)


def test_deadlock_is_retried_and_counted(metrics_server, tokens, db_url, clean_db):
    """A deadlock between a server transaction and a psql session: PostgreSQL aborts the server's
    transaction (its wait began first), the store runs it again, and the counter shows it."""
    server, address = metrics_server
    admin, shim = tokens["admin"][0], tokens["shim"][0]
    with grpc.insecure_channel(server.target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        stub.CreatePool(pool("deadlock", "198.18.8.0/24", "fd00:d::/120"), metadata=md(admin))
        stub.Allocate(pb.AllocateRequest(pool="deadlock", owner="x", ip_family_policy=SINGLE, ip_families=[V4]),
                      metadata=md(shim))
        before = sample(scrape(address), "dsipam_db_lock_retries_total", sqlstate="40P01")
        locker = subprocess.Popen(["psql", db_url, "-q", "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, text=True)
        try:
            # Hold the pool's IPv6 range and blocks, so that giving "x" an IPv6 address must wait...
            locker.stdin.write(
                "BEGIN;\n"
                "SELECT 1 FROM ipam_ranges r JOIN ipam_pools p ON p.id = r.pool_id "
                " WHERE p.name = 'deadlock' AND r.family = 6 FOR UPDATE OF r;\n"
                "SELECT 1 FROM ipam_blocks b JOIN ipam_pools p ON p.id = b.pool_id "
                " WHERE p.name = 'deadlock' AND b.family = 6 FOR UPDATE OF b;\n"
            )
            locker.stdin.flush()
            time.sleep(0.5)
            result: dict[str, object] = {}

            def upgrade() -> None:
                try:
                    result["resp"] = stub.Allocate(
                        pb.AllocateRequest(pool="deadlock", owner="x", ip_family_policy=REQUIRE),
                        metadata=md(shim), timeout=60)
                except grpc.RpcError as err:
                    result["err"] = err

            t = threading.Thread(target=upgrade)
            t.start()
            time.sleep(0.5)  # the server now holds x's row and waits for the range
            # ...then ask for x's row: a cycle, found by the server's backend after deadlock_timeout.
            locker.stdin.write(
                "SELECT 1 FROM ipam_allocations a JOIN ipam_pools p ON p.id = a.pool_id "
                " WHERE p.name = 'deadlock' AND a.owner = 'x' FOR UPDATE OF a;\n"
                "COMMIT;\n"
            )
            locker.stdin.close()
            assert locker.wait(30) == 0
            t.join(60)
        finally:
            if locker.poll() is None:
                locker.kill()
        assert "err" not in result, result.get("err")
        assert len(result["resp"].allocation.addresses) == 2  # type: ignore[union-attr]
    after = sample(scrape(address), "dsipam_db_lock_retries_total", sqlstate="40P01")
    assert after - before >= 1
