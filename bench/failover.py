"""Failover windows of dsipam on a real Patroni cluster, as the clients see them.

Starts a Patroni 3.0 cluster (three PostgreSQL 15 members, one etcd; tests/patroni.py), a dsipam
server, and allocation load from the SDK (tests/failover_load.py: asyncio tasks allocating,
releasing and reading, each call through AsyncIpamClient with its default retries). Then, for
several rounds each, injects a fault and measures from the history of every call:

- ``first ok``: from the fault to the completion of the first Allocate invoked after it that
  succeeded (the issue's "kill to the first successful Allocate");
- ``gap``: the longest time between two successful Allocates around the fault (the outage as
  the clients felt it, whenever it began after the fault);
- ``not serving``: how long the server's gRPC health said NOT_SERVING.

Faults: ``switchover`` (patronictl switchover), ``postmaster`` (SIGKILL of the primary's
postmaster; Patroni fails over with primary_start_timeout 0), ``node`` (SIGKILL of the primary's
Patroni and postmaster together: a whole machine gone; the leader key must expire, ``ttl``),
``etcd`` (etcd paused for --etcd-pause seconds: the primary demotes itself, no writes until etcd
returns). After each round the cluster is brought back to a leader with a synchronous standby.

Ways to reach the primary (--via): ``url`` (a multi-host URL with target_session_attrs=read-write)
and ``pgbouncer`` (PgBouncer 1.18 in transaction mode whose [databases] host follows the leader:
a loop here polls each member's Patroni REST API ``GET /primary`` every --follow-interval seconds
and reloads PgBouncer when the leader changes, as a Patroni callback or HAProxy's health check
would).

At the end of each run the history is checked (tests/history.py) and ``dsipam fsck`` must be
clean: the figures are of correct runs only.

    .venv/bin/python bench/failover.py --rounds 5
    .venv/bin/python bench/failover.py --rounds 3 --via pgbouncer --scenarios switchover,postmaster
    .venv/bin/python bench/failover.py --ttl 30 --loop-wait 10 --retry-timeout 10 --scenarios node

Needs root (PostgreSQL runs as the postgres user), patroni, etcd-server and pgbouncer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from failover_load import AllocLoad, HealthRecorder, final_state  # noqa: E402
from history import INF, OK, History, check, windows  # noqa: E402
from patroni import PatroniCluster, create_dsipam_database, missing, patroni_cluster  # noqa: E402
from support import free_port, spawn_server  # noqa: E402

from dsipam.client import IpamClient  # noqa: E402

SCENARIOS = ("switchover", "postmaster", "node", "etcd")
COOLDOWN = 120.0  # longer than any call and release span (the checker verifies it); addresses are reused


class LeaderFollowingBouncer:
    """PgBouncer in front of the cluster, re-pointed at the leader by polling Patroni's REST API."""

    def __init__(self, cluster: PatroniCluster, interval: float) -> None:
        self.cluster, self.interval = cluster, interval
        self.dir = Path(tempfile.mkdtemp(prefix="dsipam-bench-pgbouncer-"))
        self.port = free_port()
        self.leader = ""
        self.switches: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self.proc: subprocess.Popen | None = None

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def _write(self, leader: str) -> None:
        member = self.cluster.members[leader]
        (self.dir / "pgbouncer.ini").write_text(f"""[databases]
dsipam = host=127.0.0.1 port={member.pg_port} user=postgres dbname=dsipam

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir / 'userlist.txt'}
admin_users = postgres
pool_mode = transaction
default_pool_size = 20
max_client_conn = 400
server_connect_timeout = 3
server_login_retry = 1
logfile = {self.dir / 'pgbouncer.log'}
pidfile = {self.dir / 'pgbouncer.pid'}
""")
        self.leader = leader

    def start(self) -> LeaderFollowingBouncer:
        leader = self._poll_leader()
        assert leader, "no leader to point PgBouncer at"
        (self.dir / "userlist.txt").write_text('"postgres" ""\n')
        self._write(leader)
        pw = pwd.getpwnam("postgres")
        for p in (self.dir, *self.dir.iterdir()):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        self.proc = subprocess.Popen([binary, str(self.dir / "pgbouncer.ini")], user="postgres",
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=self.dir)
        time.sleep(1.0)
        self._thread.start()
        return self

    def _poll_leader(self) -> str:
        for name, member in self.cluster.members.items():
            try:
                with urllib.request.urlopen(f"{member.api}/primary", timeout=0.5) as resp:
                    if resp.status == 200:
                        return name
            except OSError:
                continue
        return ""

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            leader = self._poll_leader()
            if leader and leader != self.leader:
                self._write(leader)
                assert self.proc is not None
                self.proc.send_signal(signal.SIGHUP)  # RELOAD: new server connections go to the leader
                self.switches.append((time.monotonic(), leader))

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_stable(cluster: PatroniCluster, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        roles = cluster.roles()
        leaders = [n for n, r in roles.items() if r == "leader"]
        if len(leaders) == 1 and "sync_standby" in roles.values() and cluster.members[leaders[0]].in_recovery() is False:
            return leaders[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster not stable: {roles}")
        time.sleep(0.2)


def fault(cluster: PatroniCluster, scenario: str, leader: str, etcd_pause: float) -> float:
    """Injects ``scenario`` on ``leader``; returns its monotonic time."""
    at = time.monotonic()
    if scenario == "switchover":
        cluster.switchover()
    elif scenario == "postmaster":
        cluster.members[leader].kill_postmaster()
    elif scenario == "node":
        cluster.members[leader].kill_all()
    elif scenario == "etcd":
        cluster.pause_etcd()
        try:
            time.sleep(etcd_pause)
        finally:
            cluster.resume_etcd()
    return at


def run(args: argparse.Namespace, via: str, tmp: Path) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {s: [] for s in args.scenarios}
    with patroni_cluster(ttl=args.ttl, loop_wait=args.loop_wait, retry_timeout=args.retry_timeout) as cluster, \
            contextlib.ExitStack() as stack:
        direct = create_dsipam_database(cluster)
        env = {"DSIPAM_DB_HEALTH_INTERVAL": str(args.health_interval), "DSIPAM_LOG_LEVEL": "WARNING"}
        if via == "pgbouncer":
            bouncer = LeaderFollowingBouncer(cluster, args.follow_interval).start()
            stack.callback(bouncer.stop)
            url = bouncer.url("dsipam")
            env["DSIPAM_DB_PGBOUNCER"] = "1"
        else:
            url = direct
        server = spawn_server(url, tmp, extra_env=env)
        stack.callback(server.kill)
        with IpamClient(server.target, timeout=60) as client:
            client.create_pool("bench", ["198.18.0.0/15", "fd00:fa11::/104"], cooldown=COOLDOWN)
        history = History()
        health = HealthRecorder(server.target, interval=0.05).start()
        load = AllocLoad(server.target, history, "bench", tasks=args.tasks, owners=20, timeout=args.call_timeout,
                         seed=11).start()
        stack.callback(health.stop)
        try:
            load.wait_ok(50)
            for scenario in args.scenarios:
                for r in range(args.rounds):
                    leader = wait_stable(cluster)
                    time.sleep(1.0)  # steady load before the fault
                    at = fault(cluster, scenario, leader, args.etcd_pause)
                    if scenario == "node":
                        deadline = time.monotonic() + 120
                        while not [n for n, role in cluster.roles().items() if role == "leader" and n != leader]:
                            assert time.monotonic() < deadline, "no new leader after the node kill"
                            time.sleep(0.1)
                        load.wait_ok(20, since=time.monotonic(), timeout=120)
                        cluster.members[leader].start()  # the machine comes back: Patroni rewinds it
                    load.wait_ok(20, since=time.monotonic(), timeout=120)
                    wait_stable(cluster)
                    until = time.monotonic()
                    ops = history.snapshot()
                    w = windows(ops, at, until=until)
                    down = not_serving(health.changes, at, until)
                    w["not_serving"] = down
                    # Calls that failed after the SDK's retries (deadline): their callers saw an error.
                    failed = Counter(op.error.split(" ", 1)[0] for op in ops
                                     if op.outcome != OK and at <= op.complete <= until)
                    w["failed_calls"] = sum(failed.values())
                    results[scenario].append(w)
                    print(f"{via:9} {scenario:10} round {r + 1}: first ok Allocate {w['first_ok']:.2f}s, "
                          f"gap {w['gap']:.2f}s, NOT_SERVING {down:.2f}s, calls failed after retries "
                          f"{dict(failed)}", flush=True)
        except BaseException:
            health.stop()
            with contextlib.suppress(Exception):  # the failure above is the one to report
                load.stop(timeout=60)
            raise
        stats = load.stop()
        text = server.metrics_text() or ""
        reconnects = {line.split("{", 1)[1].rsplit("}", 1)[0]: float(line.rsplit(" ", 1)[1])
                      for line in text.splitlines() if line.startswith("dsipam_db_reconnects_total{")}
        print(f"{via}: dsipam_db_reconnects_total {({k: v for k, v in reconnects.items() if v})}", flush=True)
        ops = history.snapshot()
        report = check(ops, final_state(server.target, "bench"), cooldown=COOLDOWN)
        fsck = subprocess.run([sys.executable, "-m", "dsipam.server", "fsck", "bench", "--database-url", direct],
                              capture_output=True, text=True, timeout=300)
        print(f"{via}: history {report.summary()}; calls answered after retries {dict(stats.retried)}; "
              f"final error codes {dict(stats.codes)}; fsck: {fsck.stdout.strip().splitlines()[-1:]}", flush=True)
        report.assert_valid()
        assert fsck.returncode == 0 and "clean" in fsck.stdout, fsck.stdout + fsck.stderr
    return results


def not_serving(changes: list[tuple[float, str]], start: float, end: float) -> float:
    total, since = 0.0, None
    state = next((s for t, s in reversed(changes) if t <= start), "SERVING")
    if state != "SERVING":
        since = start
    for t, s in changes:
        if not start < t <= end:
            continue
        if s != "SERVING" and since is None:
            since = t
        elif s == "SERVING" and since is not None:
            total += t - since
            since = None
    if since is not None:
        total += end - since
    return total


def summary(results: dict[str, dict[str, list[dict[str, float]]]]) -> list[str]:
    lines = ["| via | fault | rounds | first ok Allocate: median (min-max) | longest gap: median (min-max) | "
             "NOT_SERVING: median | calls failed after retries |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for via, by_scenario in results.items():
        for scenario, rounds in by_scenario.items():
            if not rounds:
                continue

            def fig(key: str, rounds: list[dict[str, float]] = rounds) -> str:
                values = [r[key] for r in rounds if r[key] != INF]
                if not values:
                    return "-"
                return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"

            ns = statistics.median(r["not_serving"] for r in rounds)
            failed = sum(r["failed_calls"] for r in rounds)
            lines.append(f"| {via} | {scenario} | {len(rounds)} | {fig('first_ok')} | {fig('gap')} | {ns:.2f} s "
                         f"| {failed:g} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--via", default="url", help="url, pgbouncer or both")
    parser.add_argument("--ttl", type=int, default=10)
    parser.add_argument("--loop-wait", type=int, default=2)
    parser.add_argument("--retry-timeout", type=int, default=5)
    parser.add_argument("--call-timeout", type=float, default=30.0, help="the SDK's deadline per call (retries included)")
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--health-interval", type=float, default=0.5)
    parser.add_argument("--follow-interval", type=float, default=0.5)
    parser.add_argument("--etcd-pause", type=float, default=15.0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    bad = [s for s in args.scenarios if s not in SCENARIOS]
    if bad:
        parser.error(f"--scenarios: {bad} not in {SCENARIOS}")
    why = missing()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    vias = ["url", "pgbouncer"] if args.via == "both" else [args.via]
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; Patroni ttl "
          f"{args.ttl}, loop_wait {args.loop_wait}, retry_timeout {args.retry_timeout}; SDK deadline "
          f"{args.call_timeout}s, health interval {args.health_interval}s", flush=True)
    results = {}
    with tmpdir() as tmp:
        for via in vias:
            results[via] = run(args, via, tmp)
    print("\n".join(summary(results)))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


@contextlib.contextmanager
def tmpdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dsipam-bench-failover-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
