"""Automatic failover as operators run PostgreSQL: a real Patroni 3.0 cluster (three PostgreSQL 15
members, one etcd; tests/patroni.py) under allocation load from the SDK, with the history of
every call checked as Jepsen does it (tests/history.py).

The server and ``dsipam migrate`` reach the cluster through a multi-host URL with
``target_session_attrs=read-write``. Faults: a planned switchover (``patronictl switchover``), a
SIGKILL of the primary's postmaster (Patroni fails over to the synchronous standby), the old
primary rejoining as a replica and a second failover back to it, and etcd stopping (SIGSTOP: the
primary's Patroni loses the DCS and demotes itself). A cluster with ``synchronous_mode_strict``
shows that an acknowledged write is on the standby by construction: with the standby gone,
writes wait rather than being acknowledged by the primary alone.

After each fault run: the history checker (no address held by two owners over overlapping
intervals, every acknowledged allocation visible until its release, unknown outcomes possibly
taken), ``dsipam fsck`` clean, no call answered INTERNAL (the server's own per-code counter),
and no error counted or traceback logged by the server. Timings are measured by bench/failover.py,
not asserted here. Run with ``-s`` to see a ``FAILOVER`` line per run (calls, codes, windows).

The shared PostgreSQL on 127.0.0.1:5432 is never touched. Patroni missing: the tests skip,
or fail under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from failover_load import AllocLoad, HealthRecorder, final_state
from history import ALLOCATE, OK, READ, RELEASE, History, check, windows
from patroni import PatroniCluster, create_dsipam_database, patroni_cluster, require
from support import ServerProcess, metric_sum, spawn_server

from dsipam.client import IpamClient

# Health pings every 0.5 s; everything else as a production server.
SERVER_ENV = {"DSIPAM_DB_HEALTH_INTERVAL": "0.5"}
# While no primary accepts connections, asyncpg's pool (the fast path's) retries its connection
# floor and logs each failure at WARNING with the traceback: the outage these tests cause.
OUTAGE_TRACEBACKS = ("asyncpg.pool Failed to restore the pool connection floor",)
# Far longer than any run: no address is handed out again within a test, so that an overlap of
# two owners' intervals can only be a lost or doubled allocation (tests/history.py, "Soundness").
COOLDOWN = 900.0
CALL_TIMEOUT = 10.0

pytestmark = pytest.mark.timeout(600)


@dataclass
class Served:
    cluster: PatroniCluster
    url: str
    server: ServerProcess


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One cluster (synchronous_mode: true) and one dsipam server for the module's faults."""
    require()
    with patroni_cluster() as cluster:
        url = create_dsipam_database(cluster)  # dsipam migrate through the multi-host URL
        server = spawn_server(url, tmp_path_factory.mktemp("patroni"), extra_env=SERVER_ENV)
        server.expected_traceback_lines = OUTAGE_TRACEBACKS
        try:
            yield Served(cluster, url, server)
        finally:
            server.terminate()
            pids = cluster.pids()
    # The fixture leaves nothing behind: every process group killed, the directory deleted.
    time.sleep(0.3)
    assert not [pid for pid in pids if _alive(pid)], pids
    assert not cluster.root.exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def create_pool(target: str, name: str) -> None:
    with IpamClient(target, timeout=60) as client:
        client.create_pool(name, ["198.18.0.0/16", "fd00:fa11::/112"], cooldown=COOLDOWN, network=name)


def fsck(url: str, pool: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dsipam.server", "fsck", pool, "--database-url", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stdout + out.stderr
    return out.stdout.strip().splitlines()[-1]


def internal_answers(server: ServerProcess) -> float:
    text = server.metrics_text()
    assert text is not None, "metrics not readable"
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dsipam_rpc_requests_total{") and 'code="INTERNAL"' in line)


def unavailable_answers(server: ServerProcess) -> float:
    text = server.metrics_text() or ""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dsipam_rpc_requests_total{") and 'code="UNAVAILABLE"' in line)


def reconnects(server: ServerProcess) -> float:
    return metric_sum(server.metrics_text() or "", "dsipam_db_reconnects_total")


def wait_stable(cluster: PatroniCluster, timeout: float = 90.0) -> str:
    """Until the cluster has a leader and a streaming synchronous standby; returns the leader."""
    deadline = time.monotonic() + timeout
    while True:
        roles = cluster.roles()
        leader = [n for n, r in roles.items() if r == "leader"]
        if len(leader) == 1 and "sync_standby" in roles.values() and cluster.members[leader[0]].in_recovery() is False:
            return leader[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no leader with a synchronous standby: {roles}\n{cluster.logs()}")
        time.sleep(0.2)


def verify(served: Served, pool: str, history: History, load: AllocLoad, name: str,
           faults: list[tuple[str, float]]) -> None:
    """The end of every fault run: the history checker on the final state, fsck, no INTERNAL,
    no error counted or logged by the server."""
    stats = load.stop()
    assert not stats.bugs, stats.bugs[:5]
    final = final_state(served.server.target, pool)
    ops = history.snapshot()
    report = check(ops, final, cooldown=COOLDOWN)
    ends = [at for _, at in faults[1:]] + [float("inf")]
    figures = "; ".join(
        f"{what}: first ok Allocate after {w['first_ok']:.2f}s, longest gap between ok Allocates {w['gap']:.2f}s"
        for (what, at), until in zip(faults, ends, strict=True) for w in [windows(ops, at, until=until)])
    print(f"\nFAILOVER {name}: {report.summary()}; calls answered after retries {dict(stats.retried)}; "
          f"final codes {dict(stats.codes)}; {figures}", flush=True)
    report.assert_valid()
    assert report.counts.get("allocate ok", 0) > 0 and report.counts.get("release ok", 0) > 0
    # Every owner the final state lists was seen by its client: nothing allocated behind their backs.
    assert "INTERNAL" not in stats.codes, stats.codes
    assert internal_answers(served.server) == 0
    verdict = fsck(served.url, pool)
    print(f"FAILOVER {name}: fsck {verdict}", flush=True)
    served.server.check_errors(who=name)


def abort(load: AllocLoad, health: HealthRecorder) -> None:
    """Stops the load after a failed step (the failure is what the test reports)."""
    health.stop()
    with contextlib.suppress(Exception):
        load.stop(timeout=60)


def run_load(served: Served, pool: str, seed: int) -> tuple[History, AllocLoad, HealthRecorder]:
    create_pool(served.server.target, pool)
    history = History()
    load = AllocLoad(served.server.target, history, pool, tasks=6, owners=12, timeout=CALL_TIMEOUT, seed=seed)
    health = HealthRecorder(served.server.target).start()
    load.start()
    load.wait_ok(30)
    return history, load, health


def test_planned_switchover_under_load(served: Served) -> None:
    """1. patronictl switchover under steady load: no call fails beyond the SDK's retries."""
    cluster = served.cluster
    old = wait_stable(cluster)
    history, load, health = run_load(served, "switchover", seed=1)
    try:
        at = time.monotonic()
        cluster.switchover()
        new = wait_stable(cluster)
        assert new != old
        load.wait_ok(60, since=time.monotonic())
    except BaseException:
        abort(load, health)
        raise
    health.stop()
    verify(served, "switchover", history, load, "switchover", [("switchover", at)])
    failed = [op for op in history.snapshot() if op.outcome != OK]
    assert not failed, [str(op) for op in failed[:5]]
    assert health.status() == "SERVING"


def test_failover_by_sigkill_rejoin_and_failover_back(served: Served) -> None:
    """2. SIGKILL of the primary's postmaster: Patroni fails over to the synchronous standby.
    3. The old primary rejoins as a replica (Patroni runs pg_rewind when it diverged) and a second
    failover, back to it, loses nothing either."""
    cluster = served.cluster
    first = wait_stable(cluster)
    history, load, health = run_load(served, "failover", seed=2)
    faults = []
    try:
        reconnects_before = reconnects(served.server)
        at = time.monotonic()
        cluster.members[first].kill_postmaster()
        faults.append((f"kill {first}", at))
        second = wait_stable(cluster)
        assert second != first
        load.wait_ok(60, since=time.monotonic())
        # The old primary is the synchronous standby again: it rejoined (rewound when it had diverged).
        cluster.wait_roles({first: "sync_standby", second: "leader"})
        cluster.wait_replicating(first)
        load.wait_ok(30, since=time.monotonic())
        at = time.monotonic()
        cluster.members[second].kill_postmaster()
        faults.append((f"kill {second}", at))
        back = wait_stable(cluster)
        assert back == first
        load.wait_ok(60, since=time.monotonic())
    except BaseException:
        abort(load, health)
        raise
    health.stop()
    verify(served, "failover", history, load, "failover and failover back", faults)
    assert unavailable_answers(served.server) > 0  # the in-flight calls of each kill, retried by the SDK
    rewinds = {m.name: m.log(10**7).count("running pg_rewind from") for m in cluster.members.values()}
    print(f"FAILOVER failover: pg_rewind runs by member (Patroni's log): {rewinds}; "
          f"reconnects counted {reconnects(served.server) - reconnects_before:g}", flush=True)


def test_etcd_lost_the_primary_demotes_and_nothing_is_written(served: Served) -> None:
    """4. etcd stops answering (SIGSTOP, as behind a partition): the primary's Patroni cannot renew
    its leader key, demotes itself after retry_timeout, and no member is writable until etcd is
    back. The server reports NOT_SERVING meanwhile, answers nothing ok (it never connects to a
    read-only member), and SERVING again once a primary is elected."""
    cluster = served.cluster
    leader = wait_stable(cluster)
    history, load, health = run_load(served, "partition", seed=3)
    demoted = resumed = 0.0
    try:
        at = time.monotonic()
        cluster.pause_etcd()
        try:
            deadline = time.monotonic() + 60
            while cluster.members[leader].in_recovery() is not True or cluster.primaries():
                assert time.monotonic() < deadline, f"{leader} never demoted:\n{cluster.logs()}"
                time.sleep(0.1)
            demoted = time.monotonic()
            unavailable_before = unavailable_answers(served.server)
            health.wait("NOT_SERVING", since=at, timeout=30)
            # Calls keep failing while no member is writable: long enough for every load task to try.
            time.sleep(3)
            assert not cluster.primaries()
            unavailable_during = unavailable_answers(served.server) - unavailable_before
        finally:
            resumed = time.monotonic()
            cluster.resume_etcd()
        wait_stable(cluster)
        health.wait("SERVING", since=resumed, timeout=60)
        load.wait_ok(60, since=time.monotonic())
    except BaseException:
        abort(load, health)
        raise
    health.stop()
    verify(served, "partition", history, load, "etcd lost", [("etcd paused", at)])
    print(f"FAILOVER etcd lost: demoted {demoted - at:.1f}s after etcd stopped; no primary for "
          f"{resumed - demoted:.1f}s (until etcd resumed); {unavailable_during:g} UNAVAILABLE answers meanwhile",
          flush=True)
    ops = history.snapshot()
    # Nothing answered ok while no member was writable (1 s for answers already on their way).
    answered = [op for op in ops if op.outcome == OK and demoted + 1.0 <= op.complete <= resumed]
    assert not answered, [str(op) for op in answered[:5]]
    assert unavailable_during > 0, "no call reached the server while no member was writable"
    not_serving = [t for t, s in health.changes if s == "NOT_SERVING"]
    assert not_serving and at <= not_serving[0] <= resumed


def test_synchronous_mode_strict_acknowledged_means_replicated(served: Served) -> None:
    """2 with synchronous_mode_strict (switched on in the DCS with patronictl edit-config). With both
    replicas gone (Patroni and PostgreSQL killed), the primary acknowledges no write: writes wait
    instead of going on without a copy (without strict mode, Patroni empties
    synchronous_standby_names and the primary writes alone). The replicas come back, writes resume,
    then the primary's postmaster is SIGKILLed and the synchronous standby takes over: every
    acknowledged allocation is there, by construction."""
    cluster = served.cluster
    cluster.set_dcs(synchronous_mode_strict=True)
    try:
        leader = wait_stable(cluster)
        replicas = [n for n in cluster.members if n != leader]
        history, load, health = run_load(served, "strict", seed=4)
        faults = []
        try:
            for name in replicas:  # the nosync one too: strict mode's "*" would let it acknowledge
                cluster.members[name].kill_all()  # returns once its postmaster is gone
            blocked_from = time.monotonic()
            time.sleep(4)  # two Patroni loops: the strict primary keeps waiting for a standby
            back_at = time.monotonic()
            for name in replicas:
                cluster.members[name].start()
            wait_stable(cluster)
            standby = next(n for n, r in cluster.roles().items() if r == "sync_standby")
            load.wait_ok(30, since=time.monotonic())
            at = time.monotonic()
            cluster.members[leader].kill_postmaster()
            faults.append((f"kill {leader}", at))
            assert wait_stable(cluster) == standby
            load.wait_ok(60, since=time.monotonic())
        except BaseException:
            abort(load, health)
            raise
        health.stop()
        verify(served, "strict", history, load, "synchronous_mode_strict", faults)
        ops = history.snapshot()
        writes = [op for op in ops if op.kind in (ALLOCATE, RELEASE) and op.outcome == OK
                  and op.invoke >= blocked_from and op.complete <= back_at]
        assert not writes, [str(op) for op in writes[:5]]
        waited = [op for op in ops if op.kind in (ALLOCATE, RELEASE) and op.invoke < back_at
                  and op.complete > blocked_from + 1]
        assert waited, "no write was tried while the primary had no standby"
        reads = [op for op in ops if op.kind == READ and op.outcome == OK
                 and op.invoke >= blocked_from and op.complete <= back_at]
        print(f"FAILOVER strict: no write acknowledged in the {back_at - blocked_from:.1f}s without a standby "
              f"({len(waited)} writes waited); {len(reads)} reads answered meanwhile", flush=True)
    finally:
        cluster.set_dcs(synchronous_mode_strict=False)
