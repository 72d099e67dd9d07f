"""Fault tests with real processes: PostgreSQL restarted under load, the server SIGKILLed under
load, PostgreSQL failover to a synchronous streaming replica; and health while the database is down.

Each test runs Allocate/Release load from client threads that retry UNAVAILABLE (and ABORTED)
until they get an answer, keeps what every owner was told, and checks afterwards that the
server's state is exactly that: every owner told "allocated" holds its pair, nothing else is
allocated, and ``dsipam fsck`` finds the blocks and allocations in agreement. Each test prints
a ``FAULT SUMMARY`` line (operations, retries, fsck) — run with ``-s`` to see it.

The database restart and failover use private PostgreSQL servers (tests/pgcluster.py), never
the shared one.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import REQUIRE, pool
from pgcluster import create_dsipam_database, private_cluster
from support import free_port, scratch_database, spawn_server

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

POOL = "faults"
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED}
FAST_HEALTH = {"DSIPAM_DB_HEALTH_INTERVAL": "0.5"}


@dataclass
class Outcome:
    """What the clients saw."""

    ops: int = 0  # acknowledged operations
    retried_ops: int = 0  # operations that needed more than one attempt
    attempts_retried: int = 0  # failed attempts that were tried again
    codes: Counter = field(default_factory=Counter)  # status codes of failed attempts
    answered_by_first_attempt: int = 0  # retries answered "already done": the lost attempt had committed
    errors: list[str] = field(default_factory=list)  # anything that is not a clean, expected answer


class Load:
    """Client threads doing Allocate (REQUIRE_DUAL_STACK) and Release on their own owners,
    retrying each operation until it is acknowledged."""

    def __init__(self, target: str, workers: int = 6, owners: int = 25, seed: int = 7) -> None:
        self.target = target
        self.out = Outcome()
        self.held: dict[str, tuple[str, ...]] = {}  # owner -> the pair it was told it holds
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._work, args=(w, owners, random.Random(seed + w)), daemon=True)
            for w in range(workers)
        ]

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> Outcome:
        self.stopping.set()
        for t in self.threads:
            t.join(180)
            assert not t.is_alive(), "a load thread did not finish"
        return self.out

    def ops(self) -> int:
        with self.lock:
            return self.out.ops

    def unavailable_seen(self) -> int:
        with self.lock:
            return self.out.codes[grpc.StatusCode.UNAVAILABLE.name]

    def wait_ops(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ops() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.ops()} of {count} operations acknowledged; {self.out}")
            if self.out.errors:
                raise AssertionError(f"load failed: {self.out.errors[:5]}")
            time.sleep(0.1)

    def wait_unavailable(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.unavailable_seen():
            if time.monotonic() > deadline:
                raise TimeoutError("no client saw UNAVAILABLE")
            time.sleep(0.05)

    def _call(self, fn, request):  # type: ignore[no-untyped-def]
        """Calls until answered; returns (response, number of failed attempts)."""
        failed = 0
        deadline = time.monotonic() + 150
        while True:
            try:
                return fn(request, timeout=10), failed
            except grpc.RpcError as err:
                code = err.code()
                with self.lock:
                    self.out.codes[code.name] += 1
                if code not in RETRYABLE or time.monotonic() > deadline:
                    raise
                failed += 1
                time.sleep(0.05 + random.random() * 0.1)

    def _work(self, worker: int, owners: int, rng: random.Random) -> None:
        names = [f"w{worker}/o{i}" for i in range(owners)]
        with grpc.insecure_channel(self.target, options=[("grpc.initial_reconnect_backoff_ms", 100),
                                                         ("grpc.max_reconnect_backoff_ms", 500)]) as ch:
            stub = ipam_pb2_grpc.IpamServiceStub(ch)
            while not self.stopping.is_set():
                owner = rng.choice(names)
                try:
                    with self.lock:
                        pair = self.held.get(owner)
                    if pair is None:
                        resp, failed = self._call(
                            stub.Allocate, pb.AllocateRequest(pool=POOL, owner=owner, ip_family_policy=REQUIRE)
                        )
                        got = tuple(a.ip for a in resp.allocation.addresses)
                        if len(got) != 2:
                            raise AssertionError(f"Allocate {owner}: {got} is not a pair")
                        if not resp.created and not failed:
                            raise AssertionError(f"Allocate {owner}: created=False but it held nothing")
                        with self.lock:
                            self.held[owner] = got
                            self.out.answered_by_first_attempt += int(failed > 0 and not resp.created)
                    else:
                        resp, failed = self._call(stub.Release, pb.ReleaseRequest(pool=POOL, owner=owner))
                        released = tuple(sorted(a.ip for a in resp.released))
                        if released and released != tuple(sorted(pair)):
                            raise AssertionError(f"Release {owner}: released {released}, it held {pair}")
                        if not released and not failed:
                            raise AssertionError(f"Release {owner}: released nothing, it held {pair}")
                        with self.lock:
                            del self.held[owner]
                            self.out.answered_by_first_attempt += int(failed > 0 and not released)
                    with self.lock:
                        self.out.ops += 1
                        self.out.retried_ops += int(failed > 0)
                        self.out.attempts_retried += failed
                except Exception as exc:  # noqa: BLE001 - reported by the test
                    with self.lock:
                        self.out.errors.append(f"{owner}: {exc!r}"[:500])
                    return


def create_pool(target: str) -> None:
    with grpc.insecure_channel(target) as ch:
        # Large ranges: released addresses may wait out a cooldown before they are handed out again.
        ipam_pb2_grpc.IpamServiceStub(ch).CreatePool(pool(POOL, "198.18.0.0/18", "fd00:fa::/114"), timeout=30)


def server_state(target: str) -> dict[str, tuple[str, ...]]:
    """Every allocation of the pool, from ListAllocations."""
    out: dict[str, tuple[str, ...]] = {}
    token = ""
    with grpc.insecure_channel(target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        while True:
            for attempt in range(20):  # like every client: UNAVAILABLE (a pooled connection to the dead
                try:                   # primary, found stale on first use) is retried
                    resp = stub.ListAllocations(
                        pb.ListAllocationsRequest(pool=POOL, page_size=500, page_token=token), timeout=30)
                    break
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == 19:
                        raise
                    time.sleep(0.25)
            for a in resp.allocations:
                assert a.owner not in out
                out[a.owner] = tuple(x.ip for x in a.addresses)
            token = resp.next_page_token
            if not token:
                return out


def fsck(url: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dsipam.server", "fsck", POOL, "--database-url", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stdout + out.stderr
    return out.stdout.strip().splitlines()[-1]


def check_end_state(target: str, url: str, load: Load, out: Outcome) -> str:
    """The server holds exactly what the clients were told; fsck is clean. Returns fsck's verdict."""
    assert not out.errors, out.errors[:5]
    state = server_state(target)
    assert state == load.held, (
        f"owners the clients think hold a pair but the server does not: {sorted(set(load.held) - set(state))[:5]}; "
        f"allocations nobody was told about: {sorted(set(state) - set(load.held))[:5]}; "
        f"different pairs: {[o for o in state if o in load.held and state[o] != load.held[o]][:5]}"
    )
    addresses = [ip for pair in state.values() for ip in pair]
    assert len(addresses) == len(set(addresses)), "an address is held twice"
    # Every owner told "allocated" gets the same pair again (idempotent Allocate).
    with grpc.insecure_channel(target) as ch:
        stub = ipam_pb2_grpc.IpamServiceStub(ch)
        for owner, pair in load.held.items():
            resp = stub.Allocate(pb.AllocateRequest(pool=POOL, owner=owner, ip_family_policy=REQUIRE), timeout=30)
            assert (tuple(a.ip for a in resp.allocation.addresses), resp.created) == (pair, False), owner
    return fsck(url)


def summary(name: str, out: Outcome, verdict: str, held: int) -> None:
    codes = ", ".join(f"{k}={v}" for k, v in sorted(out.codes.items()))
    print(f"\nFAULT SUMMARY {name}: {out.ops} operations acknowledged, {out.retried_ops} needed retries "
          f"({out.attempts_retried} failed attempts: {codes}; {out.answered_by_first_attempt} retries found the "
          f"lost attempt had committed), {held} owners hold pairs at the end; fsck: {verdict}", flush=True)


def health(target: str, service: str = "") -> int:
    try:
        with grpc.insecure_channel(target) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
    except grpc.RpcError:
        return -1


def wait_health(target: str, status: int, timeout: float = 30.0) -> None:
    """Waits until the server's health ("") is ``status``; the service's follows it."""
    deadline = time.monotonic() + timeout
    while health(target) != status:
        if time.monotonic() > deadline:
            raise TimeoutError(f"health of {target} is {health(target)}, not {status}")
        time.sleep(0.1)
    assert health(target, "dsipam.v1.IpamService") == status
    # "liveness" only says the process serves: it stays SERVING while the database is away.
    assert health(target, "liveness") == health_pb2.HealthCheckResponse.SERVING


# While the database is down, asyncpg's pool (the fast path's) retries its connection floor and
# logs each failure at WARNING with the traceback: an outage these tests cause, not a bug.
OUTAGE_TRACEBACKS = ("asyncpg.pool Failed to restore the pool connection floor",)


@pytest.mark.timeout(420)
def test_database_restart_under_load(tmp_path):
    """Fault 1: PostgreSQL is restarted while Allocate/Release load runs; health follows the database."""
    with private_cluster() as cluster:
        pg = cluster.primary()
        url = create_dsipam_database(pg)
        server = spawn_server(url, tmp_path, extra_env=FAST_HEALTH)
        server.expected_traceback_lines = OUTAGE_TRACEBACKS
        try:
            create_pool(server.target)
            load = Load(server.target).start()
            try:
                load.wait_ops(150)
                pg.stop("fast")
                load.wait_unavailable()
                wait_health(server.target, health_pb2.HealthCheckResponse.NOT_SERVING)
                pg.start()
                wait_health(server.target, health_pb2.HealthCheckResponse.SERVING)
                load.wait_ops(load.ops() + 150)
            finally:
                out = load.stop()
            assert out.codes[grpc.StatusCode.UNAVAILABLE.name] > 0
            verdict = check_end_state(server.target, url, load, out)
            summary("database restart", out, verdict, len(load.held))
            assert server.proc.poll() is None, server.log()
        finally:
            server.terminate()


@pytest.mark.timeout(420)
def test_server_sigkill_under_load(tmp_path):
    """Fault 2: the server is SIGKILLed mid-load and started again on the same port."""
    with scratch_database("dsipam_kill") as url:
        port = free_port()
        server = spawn_server(url, tmp_path, port=port)
        try:
            create_pool(server.target)
            load = Load(server.target).start()
            try:
                load.wait_ops(150)
                server.kill()  # SIGKILL: no drain, in-flight transactions cut off
                load.wait_unavailable()
                server = spawn_server(url, tmp_path, port=port)
                load.wait_ops(load.ops() + 150)
            finally:
                out = load.stop()
            assert out.codes[grpc.StatusCode.UNAVAILABLE.name] > 0
            verdict = check_end_state(server.target, url, load, out)
            summary("server SIGKILL", out, verdict, len(load.held))
        finally:
            server.terminate()


@pytest.mark.timeout(480)
def test_postgres_failover_to_synchronous_replica(tmp_path):
    """Fault 3: the primary crashes under load and its synchronous replica is promoted; the server
    follows through a multi-host URL with target_session_attrs=read-write; nothing acknowledged is lost."""
    with private_cluster() as cluster:
        primary = cluster.primary()
        create_dsipam_database(primary)
        standby = cluster.standby(primary)
        cluster.make_synchronous(primary, standby)
        # libpq's multi-host form with host and port lists, which SQLAlchemy and asyncpg read alike.
        url = (f"postgresql://postgres@/dsipam?host=127.0.0.1,127.0.0.1&port={primary.port},{standby.port}"
               "&target_session_attrs=read-write")
        server = spawn_server(url, tmp_path, extra_env=FAST_HEALTH)
        server.expected_traceback_lines = OUTAGE_TRACEBACKS
        try:
            create_pool(server.target)
            load = Load(server.target).start()
            try:
                load.wait_ops(150)
                primary.stop("immediate")  # a crash
                load.wait_unavailable()
                standby.promote()
                standby.wait_for("SELECT pg_is_in_recovery()", "f")
                load.wait_ops(load.ops() + 150)
            finally:
                out = load.stop()
            assert out.codes[grpc.StatusCode.UNAVAILABLE.name] > 0
            assert not primary.running()
            verdict = check_end_state(server.target, url, load, out)
            # The promoted replica, read directly, holds every acknowledged allocation.
            rows = standby.psql(
                "SELECT count(*) FROM ipam_allocations a JOIN ipam_pools p ON p.id = a.pool_id "
                f"WHERE p.name = '{POOL}'", "dsipam")
            assert int(rows) == len(load.held)
            summary("PostgreSQL failover", out, verdict, len(load.held))
        finally:
            server.terminate()
