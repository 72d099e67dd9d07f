#!/usr/bin/env python3
"""Restore test: pg_dump under allocation load, pg_restore into a new database, fsck the copy.

    .venv/bin/python scripts/backup_restore_test.py [--admin-url URL] [--clients 4]

1. creates a source database, migrates it, starts ``dsipam serve`` on a free loopback port
   and creates two pools (dual-stack, and IPv6-only);
2. starts --clients threads that Allocate (and now and then Release) without pause;
3. once load is flowing, runs ``pg_dump -Fc`` of the source while the clients keep going,
   and counts the calls that completed during the dump (at least one, or the dump is taken
   again, up to three times);
4. stops the load, creates a new database and ``pg_restore``s the dump into it;
5. on the restored copy: ``dsipam migrate --check`` (schema at head), ``dsipam fsck POOL``
   for every pool (must print "clean"), and an SQL consistency query of its own (set
   bits = allocations + cooling-down addresses, per pool and family); the source is fsck'ed too;
6. drops both databases (--keep-restored keeps the copy and prints its URL) and exits 0
   only when everything above held. The last line is "restore test: OK" or "restore test: FAILED".

Uses the postgresql-client tools (pg_dump, pg_restore, psql) of the server's major version.
docs/operations.md ("Backup and restore") describes the procedure this script rehearses.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

DEFAULT_ADMIN_URL = os.environ.get("DSIPAM_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
POOLS = {
    "pods": ["198.18.0.0/16", "fd00:10::/112"],
    "v6only": ["fd00:20::/112"],
}
REQUIRE = pb.IP_FAMILY_POLICY_REQUIRE_DUAL_STACK
SINGLE = pb.IP_FAMILY_POLICY_SINGLE_STACK

# Set bits of every pool's blocks against the addresses that hold them, per family: no row
# means agreement. A bit is set for an allocation's address and, where the schema has
# cooldowns (migration 0002), for a released address still cooling down.
CONSISTENCY_SQL = """
WITH bits AS (
    SELECT p.name, b.family, sum(b.avail_count - b.free_count) AS used
      FROM ipam_blocks b JOIN ipam_pools p ON p.id = b.pool_id
     GROUP BY p.name, b.family),
holders AS (
    SELECT a.pool_id, f.family
      FROM ipam_allocations a CROSS JOIN LATERAL (VALUES (4, a.ipv4), (6, a.ipv6)) AS f(family, ip)
     WHERE f.ip IS NOT NULL
    {cooldowns}),
held AS (
    SELECT p.name, h.family, count(*) AS used
      FROM holders h JOIN ipam_pools p ON p.id = h.pool_id
     GROUP BY p.name, h.family)
SELECT coalesce(bits.name, held.name) || ' IPv' || coalesce(bits.family, held.family)
       || ': ' || coalesce(bits.used, 0) || ' bits set, ' || coalesce(held.used, 0) || ' holders'
  FROM bits FULL JOIN held ON held.name = bits.name AND held.family = bits.family
 WHERE coalesce(bits.used, 0) <> coalesce(held.used, 0)
"""
COOLDOWN_HOLDERS = "UNION ALL SELECT c.pool_id, c.family FROM ipam_cooldowns c"


def consistency_sql(url: str) -> str:
    """CONSISTENCY_SQL for the schema at ``url``."""
    has_cooldowns = psql(url, "SELECT to_regclass('ipam_cooldowns') IS NOT NULL") == "t"
    return CONSISTENCY_SQL.format(cooldowns=COOLDOWN_HOLDERS if has_cooldowns else "")


def log(message: str) -> None:
    print(f"restore-test: {message}", flush=True)


def psql(url: str, sql: str) -> str:
    done = subprocess.run(
        ["psql", url, "-X", "-v", "ON_ERROR_STOP=1", "-tAc", sql], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"psql: {done.stderr.strip()}")
    return done.stdout.strip()


def db_url(admin_url: str, name: str) -> str:
    return f"{admin_url.rsplit('/', 1)[0]}/{name}"


def dsipam(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsipam.server", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def database(admin_url: str, name: str, keep: bool = False) -> Iterator[str]:
    psql(admin_url, f"CREATE DATABASE {name}")
    try:
        yield db_url(admin_url, name)
    finally:
        if not keep:
            psql(admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def server(url: str, workdir: Path) -> Iterator[str]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"127.0.0.1:{free_port()}"
    log_path = workdir / "server.log"
    # Loopback only, for the length of the test: no authentication (DSIPAM_INSECURE).
    env = {**os.environ, "DSIPAM_DATABASE_URL": url, "DSIPAM_LOG_LEVEL": "WARNING", "DSIPAM_INSECURE": "1"}
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsipam.server", "serve", "--listen", target],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with grpc.insecure_channel(target) as ch:
                    reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield target
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Load:
    """Client threads that allocate and release until stopped (or a bound is reached)."""

    target: str
    clients: int
    max_calls_per_client: int
    max_seconds: float
    calls: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for k in range(self.clients):
            t = threading.Thread(target=self._run, args=(k,), daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def count(self) -> int:
        with self._lock:
            return self.calls

    def _run(self, k: int) -> None:
        rng = random.Random(k)
        deadline = time.monotonic() + self.max_seconds
        held: list[tuple[str, str]] = []
        with grpc.insecure_channel(self.target) as channel:
            stub = ipam_pb2_grpc.IpamServiceStub(channel)
            for i in range(self.max_calls_per_client):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    if held and rng.random() < 0.25:
                        pool, owner = held.pop(rng.randrange(len(held)))
                        stub.Release(pb.ReleaseRequest(pool=pool, owner=owner), timeout=30)
                    else:
                        pool = rng.choice(list(POOLS))
                        owner = f"load{k}-{i}/eth0"
                        policy = REQUIRE if len(POOLS[pool]) == 2 else SINGLE
                        stub.Allocate(pb.AllocateRequest(pool=pool, owner=owner, ip_family_policy=policy), timeout=30)
                        held.append((pool, owner))
                except grpc.RpcError as exc:
                    self.errors.append(f"{exc.code().name}: {exc.details()}")
                    return
                with self._lock:
                    self.calls += 1


def wait_for(predicate, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def fsck(url: str, pool: str) -> tuple[bool, str]:
    done = dsipam("fsck", pool, "--database-url", url)
    out = (done.stdout + done.stderr).strip()
    return done.returncode == 0 and f"fsck {pool}: clean" in done.stdout, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="a database URL with CREATE DATABASE rights")
    parser.add_argument("--clients", type=int, default=4, help="concurrent allocating clients (default 4)")
    parser.add_argument("--warmup-calls", type=int, default=200, help="calls completed before the dump starts")
    parser.add_argument("--max-seconds", type=float, default=120, help="upper bound on the load's duration")
    parser.add_argument("--prefix", default="dsipam_restore", help="prefix of the two database names")
    parser.add_argument("--keep-restored", action="store_true", help="leave the restored copy (its URL is printed)")
    args = parser.parse_args(argv)

    suffix = uuid.uuid4().hex[:8]
    source_name, restored_name = f"{args.prefix}_src_{suffix}", f"{args.prefix}_copy_{suffix}"
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dsipam-restore-") as tmp:
        workdir = Path(tmp)
        dump_path = workdir / "dsipam.dump"
        with database(args.admin_url, source_name) as source:
            migrated = dsipam("migrate", "--database-url", source)
            if migrated.returncode != 0:
                raise SystemExit(f"migrate failed: {migrated.stderr}")
            with server(source, workdir) as target:
                with grpc.insecure_channel(target) as channel:
                    stub = ipam_pb2_grpc.IpamServiceStub(channel)
                    for name, cidrs in POOLS.items():
                        stub.CreatePool(
                            pb.CreatePoolRequest(pool=pb.Pool(name=name, ranges=[pb.IpRange(cidr=c) for c in cidrs]))
                        )
                load = Load(target, args.clients, max_calls_per_client=50_000, max_seconds=args.max_seconds)
                load.start()
                try:
                    if not wait_for(lambda: load.count() >= args.warmup_calls or load.errors, args.max_seconds / 2):
                        problems.append(f"load did not reach {args.warmup_calls} calls")
                    during = 0
                    for attempt in range(3):
                        if load.errors or problems:
                            break
                        before = load.count()
                        started = time.monotonic()
                        dumped = subprocess.run(
                            ["pg_dump", "-Fc", "--no-owner", "--no-privileges", "-f", str(dump_path), source],
                            capture_output=True,
                            text=True,
                            timeout=300,
                        )
                        seconds = time.monotonic() - started
                        during = load.count() - before
                        if dumped.returncode != 0:
                            problems.append(f"pg_dump failed: {dumped.stderr.strip()}")
                            break
                        log(
                            f"pg_dump #{attempt + 1}: {dump_path.stat().st_size} bytes in {seconds:.2f}s, "
                            f"{during} calls completed during the dump"
                        )
                        if during > 0:
                            break
                    if during == 0 and not problems and not load.errors:
                        problems.append("no call completed while pg_dump ran (three tries)")
                finally:
                    load.stop()
                problems.extend(f"load: {e}" for e in load.errors[:5])
                log(f"load: {load.count()} calls by {args.clients} clients")
            for pool in POOLS:
                ok, out = fsck(source, pool)
                log(f"source {out.splitlines()[-1] if out else ''}")
                if not ok:
                    problems.append(f"source fsck {pool}: {out}")

            if not problems:
                with database(args.admin_url, restored_name, keep=args.keep_restored) as restored:
                    started = time.monotonic()
                    done = subprocess.run(
                        [
                            "pg_restore",
                            "--no-owner",
                            "--no-privileges",
                            "--exit-on-error",
                            "-d",
                            restored,
                            str(dump_path),
                        ],
                        capture_output=True,
                        text=True,
                        timeout=600,
                    )
                    if done.returncode != 0:
                        problems.append(f"pg_restore failed: {done.stderr.strip()}")
                    else:
                        log(f"pg_restore into {restored_name}: {time.monotonic() - started:.2f}s")
                        check = dsipam("migrate", "--check", "--database-url", restored)
                        if check.returncode != 0:
                            problems.append(f"restored schema: {check.stdout}{check.stderr}")
                        else:
                            log("restored schema matches the models (migrate --check)")
                        pools = psql(restored, "SELECT name FROM ipam_pools ORDER BY name").splitlines()
                        if sorted(pools) != sorted(POOLS):
                            problems.append(f"restored pools {pools}, expected {sorted(POOLS)}")
                        for pool in pools:
                            ok, out = fsck(restored, pool)
                            log(f"restored {out.splitlines()[-1] if out else ''}")
                            if not ok:
                                problems.append(f"restored fsck {pool}: {out}")
                        mismatches = psql(restored, consistency_sql(restored))
                        if mismatches:
                            problems.extend(f"restored consistency: {m}" for m in mismatches.splitlines())
                        else:
                            log("restored consistency query: bits set = holders for every pool and family")
                        allocations = psql(restored, "SELECT count(*) FROM ipam_allocations")
                        log(f"restored copy holds {allocations} allocations")
                        if args.keep_restored:
                            log(f"kept restored copy: {restored}")

    for p in problems:
        log(f"PROBLEM: {p}")
    print(f"restore test: {'OK' if not problems else 'FAILED'}", flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
