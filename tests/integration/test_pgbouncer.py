"""The core semantics through PgBouncer in transaction pooling mode.

A real ``pgbouncer`` (Debian's package) runs on a free loopback port with its own ini
and auth file, ``pool_mode = transaction`` and fewer server connections than the
dsipam engine opens, so transactions of different client connections share server
connections. A real ``dsipam serve`` with ``DSIPAM_DB_PGBOUNCER=1`` talks only to it;
the migrations ran directly against PostgreSQL, as docs/operations.md prescribes.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
from grpc_helpers import REQUIRE, V4, V6, expect_error, families, ips, pool
from support import ADMIN_URL, ServerProcess, free_port, psql, scratch_database, spawn_server

from dsipam.v1 import ipam_pb2 as pb
from dsipam.v1 import ipam_pb2_grpc

C = grpc.StatusCode
SERVER_POOL_SIZE = 3  # PgBouncer's server connections per database: fewer than the engine's client connections
ENGINE_POOL = ("--db-pool-size", "8", "--db-max-overflow", "4")


def _pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


@dataclass
class Bouncer:
    """A running pgbouncer process."""

    port: int
    user: str
    proc: subprocess.Popen
    log_path: Path

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def show(self, what: str) -> list[dict[str, str]]:
        """Rows of ``SHOW <what>`` on the admin console, as dicts."""
        out = subprocess.run(
            ["psql", self.url("pgbouncer"), "-X", "-A", "-F", "\t", "-P", "footer=off", "-c", f"SHOW {what}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        header = out[0].split("\t")
        return [dict(zip(header, line.split("\t"), strict=True)) for line in out[1:] if line]


@contextlib.contextmanager
def run_pgbouncer(binary: str, pool_size: int) -> Iterator[Bouncer]:
    """Starts pgbouncer in transaction mode in front of the test PostgreSQL; stops it and removes its files."""
    admin = urlsplit(ADMIN_URL)
    user = admin.username or "postgres"
    server = f"host={admin.hostname or '127.0.0.1'} port={admin.port or 5432} user={user}"
    if admin.password:
        server += f" password={admin.password}"
    run_as = None
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        run_as = "postgres"
        pw = pwd.getpwnam(run_as)
    workdir = Path(tempfile.mkdtemp(prefix="dsipam-pgbouncer-"))
    port = free_port()
    ini = workdir / "pgbouncer.ini"
    log_path = workdir / "pgbouncer.log"
    ini.write_text(
        f"""[databases]
* = {server}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / "userlist.txt"}
admin_users = {user}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 200
server_lifetime = 3600
stats_period = 1
logfile = {log_path}
pidfile = {workdir / "pgbouncer.pid"}
"""
    )
    (workdir / "userlist.txt").write_text(f'"{user}" ""\n')
    if run_as is not None:
        for p in (workdir, *workdir.iterdir()):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    proc = subprocess.Popen(
        [binary, str(ini)], user=run_as, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=workdir
    )
    bouncer = Bouncer(port, user, proc, log_path)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {proc.returncode}:\n{_read(log_path)}")
            try:
                bouncer.show("VERSION")
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not accept connections:\n{_read(log_path)}") from None
                time.sleep(0.1)
        yield bouncer
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no log)"


@pytest.fixture(scope="module")
def bouncer() -> Iterator[Bouncer]:
    binary = _pgbouncer_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed (Debian package pgbouncer; .ci/run installs it)")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    with run_pgbouncer(binary, SERVER_POOL_SIZE) as b:
        yield b


@pytest.fixture(scope="module")
def bounced(bouncer: Bouncer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServerProcess]]:
    """(database name, server): a migrated database and a dsipam server that reaches it only through pgbouncer."""
    with scratch_database("dsipam_pgb") as direct_url:
        name = direct_url.rsplit("/", 1)[1]
        server = spawn_server(
            bouncer.url(name), tmp_path_factory.mktemp("pgb"), extra_env={"DSIPAM_DB_PGBOUNCER": "1"}, args=ENGINE_POOL
        )
        try:
            yield name, server
        finally:
            server.terminate()


@pytest.fixture
def stub(bounced: tuple[str, ServerProcess]) -> Iterator[ipam_pb2_grpc.IpamServiceStub]:
    _, server = bounced
    assert server.proc.poll() is None, f"server died:\n{server.log()}"
    with grpc.insecure_channel(server.target) as channel:
        yield ipam_pb2_grpc.IpamServiceStub(channel)


def alloc(stub: ipam_pb2_grpc.IpamServiceStub, name: str, owner: str) -> pb.AllocateResponse:
    return stub.Allocate(pb.AllocateRequest(pool=name, owner=owner, ip_family_policy=REQUIRE))


def usage(stub: ipam_pb2_grpc.IpamServiceStub, name: str) -> dict[int, tuple[int, int]]:
    return {u.family: (u.size, u.allocated) for u in stub.GetPool(pb.GetPoolRequest(name=name)).usage}


def fsck(url: str, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsipam.server", "fsck", name, "--database-url", url, *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_server_reaches_postgresql_only_through_transaction_pooling(bouncer: Bouncer, bounced, stub) -> None:
    db, _ = bounced
    stub.CreatePool(pool("probe", "198.18.9.0/28"))
    config = {row["key"]: row["value"] for row in bouncer.show("CONFIG")}
    assert config["pool_mode"] == "transaction"
    clients = [c for c in bouncer.show("CLIENTS") if c["database"] == db]
    assert clients, "the server holds no client connection to pgbouncer"
    # Every dsipam backend that PostgreSQL sees for this database came from pgbouncer's small server pool.
    backends = int(
        psql(ADMIN_URL, f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND application_name = 'dsipam'")
    )
    assert backends <= SERVER_POOL_SIZE


def test_dual_stack_allocate_idempotent_release(stub) -> None:
    stub.CreatePool(pool("pods", pb.IpRange(cidr="198.18.0.0/24", gateway="198.18.0.1"), "fd00::/120"))
    first = alloc(stub, "pods", "c1/eth0")
    assert first.created and families(first.allocation) == [V4, V6]
    again = alloc(stub, "pods", "c1/eth0")
    assert not again.created and ips(again.allocation) == ips(first.allocation)
    assert ips(stub.GetAllocation(pb.GetAllocationRequest(pool="pods", owner="c1/eth0"))) == ips(first.allocation)
    assert usage(stub, "pods") == {V4: (253, 1), V6: (255, 1)}
    released = stub.Release(pb.ReleaseRequest(pool="pods", owner="c1/eth0")).released
    assert sorted(a.ip for a in released) == sorted(ips(first.allocation))
    expect_error(
        stub.GetAllocation, pb.GetAllocationRequest(pool="pods", owner="c1/eth0"), C.NOT_FOUND, "ALLOCATION_NOT_FOUND"
    )
    assert usage(stub, "pods") == {V4: (253, 0), V6: (255, 0)}
    assert alloc(stub, "pods", "c2/eth0").created


def test_exhaustion_rolls_back_the_first_family(stub) -> None:
    # 2 IPv4 and 3 IPv6 addresses; no cooldown, so a released pair is free again at once
    stub.CreatePool(pool("tiny", "198.18.1.0/30", "fd00:1::/126", cooldown=0))
    pairs = [ips(alloc(stub, "tiny", f"o{i}").allocation) for i in range(2)]
    assert len({a for p in pairs for a in p}) == 4
    expect_error(lambda _: alloc(stub, "tiny", "o2"), None, C.RESOURCE_EXHAUSTED, "POOL_EXHAUSTED")
    assert usage(stub, "tiny") == {V4: (2, 2), V6: (3, 2)}  # no IPv6 address was kept for the failed pair
    stub.Release(pb.ReleaseRequest(pool="tiny", owner="o0"))
    assert set(ips(alloc(stub, "tiny", "o2").allocation)) == set(pairs[0])


def test_concurrent_allocates_no_duplicates_and_fsck_clean(bouncer: Bouncer, bounced, stub) -> None:
    db, _ = bounced
    name = f"race{uuid.uuid4().hex[:6]}"
    stub.CreatePool(
        pool(name, pb.IpRange(cidr="198.18.4.0/26", block_size=16), pb.IpRange(cidr="fd00:4::/122", block_size=16))
    )
    owners = [f"pod{i}/eth0" for i in range(48)]
    queries_before = _query_count(bouncer, db)

    def one(owner: str) -> tuple[str, tuple[str, ...]]:
        return owner, tuple(ips(alloc(stub, name, owner).allocation))

    with ThreadPoolExecutor(16) as ex:  # every owner twice, concurrently: idempotent retries race the first call
        results = list(ex.map(one, owners + owners[::-1]))
    by_owner: dict[str, set[tuple[str, ...]]] = {}
    for owner, pair in results:
        by_owner.setdefault(owner, set()).add(pair)
    assert all(len(pairs) == 1 for pairs in by_owner.values()), "an owner got two different pairs"
    pairs = [next(iter(p)) for p in by_owner.values()]
    v4 = [p[0] for p in pairs]
    v6 = [p[1] for p in pairs]
    assert len(pairs) == 48 and len(set(v4)) == 48 and len(set(v6)) == 48
    assert usage(stub, name) == {V4: (62, 48), V6: (63, 48)}
    # The calls' statements went through pgbouncer (its counters are refreshed every stats_period). Not
    # one statement per call: the fast path answers concurrent Allocates with one statement per batch
    # (at most 64 requests), so the 96 calls and the GetPool took at least 3.
    assert _wait_for(lambda: _query_count(bouncer, db) - queries_before >= 3, 15), bouncer.show("STATS")
    servers = [s for s in bouncer.show("SERVERS") if s["database"] == db]
    assert 0 < len(servers) <= SERVER_POOL_SIZE
    through = fsck(bouncer.url(db), name, "--db-pgbouncer")
    assert through.returncode == 0 and f"fsck {name}: clean" in through.stdout, through.stdout + through.stderr
    direct = fsck(ADMIN_URL.rsplit("/", 1)[0] + f"/{db}", name)
    assert direct.returncode == 0 and f"fsck {name}: clean" in direct.stdout, direct.stdout + direct.stderr


def _query_count(bouncer: Bouncer, db: str) -> int:
    rows = [r for r in bouncer.show("STATS") if r["database"] == db]
    return int(rows[0]["total_query_count"]) if rows else 0


def _wait_for(condition, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
