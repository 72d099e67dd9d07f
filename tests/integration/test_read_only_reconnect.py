"""A server whose connections reach a PostgreSQL that stops taking writes while they stay open:
what a pooler (PgBouncer) or a virtual IP that still points at a demoted primary gives, and
what Patroni's restart-based demotion never does (tests/integration/test_patroni_failover.py).

A private primary (tests/pgcluster.py) is made read-only for every session at once
(``default_transaction_read_only`` and a reload: existing sessions refuse writes with SQLSTATE
25006 from their next transaction on). Under allocation load, the server must answer UNAVAILABLE
(retried by the SDK), never INTERNAL; drop its pooled connections and count each retry in
``dsipam_db_reconnects_total`` with a WARNING, never as an error; report NOT_SERVING while no
connection can write; and serve again, without a restart, once the database takes writes. Both
the fast path and the full path (``DSIPAM_FAST_PATH=0``) are run. The history of every call is
then checked (tests/history.py) and ``dsipam fsck`` must be clean.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import pytest
from failover_load import AllocLoad, HealthRecorder, final_state
from history import ALLOCATE, OK, RELEASE, History, check
from pgcluster import create_dsipam_database, private_cluster
from support import spawn_server

from dsipam.client import IpamClient

COOLDOWN = 900.0
OUTAGE_TRACEBACKS = ("asyncpg.pool Failed to restore the pool connection floor",)


def set_read_only(pg, on: bool) -> None:  # type: ignore[no-untyped-def]
    """default_transaction_read_only for every session, applied by a reload; waits until a new
    session sees it (existing ones apply it at their next command)."""
    value = "on" if on else "off"
    # This session must be able to write whatever the server's default is.
    url = pg.url() + "?options=-c%20default_transaction_read_only%3Doff"
    for sql in (f"ALTER SYSTEM SET default_transaction_read_only = {value}", "SELECT pg_reload_conf()"):
        subprocess.run([str(pg.cluster.bindir / "psql"), url, "-v", "ON_ERROR_STOP=1", "-tAc", sql],
                       check=True, capture_output=True, text=True, timeout=30)
    pg.wait_for("SHOW default_transaction_read_only", value)


def reconnect_counts(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("dsipam_db_reconnects_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels[len("dsipam_db_reconnects_total"):]] = float(value)
    return out


@pytest.mark.timeout(300)
def test_read_only_server_means_unavailable_and_reconnect(tmp_path):
    with private_cluster() as cluster, contextlib.ExitStack() as stack:
        pg = cluster.primary()
        url = create_dsipam_database(pg)
        env = {"DSIPAM_DB_HEALTH_INTERVAL": "0.5"}
        servers = {}
        for name, extra in (("fast", {}), ("full", {"DSIPAM_FAST_PATH": "0"})):
            servers[name] = spawn_server(url, tmp_path, extra_env={**env, **extra})
            stack.callback(servers[name].kill)  # after terminate() below: a no-op
            servers[name].expected_traceback_lines = OUTAGE_TRACEBACKS
        loads, healths, histories = {}, {}, {}
        try:
            for name, server in servers.items():
                with IpamClient(server.target, timeout=30) as client:
                    client.create_pool(f"ro-{name}", ["198.18.0.0/16", "fd00:5eed::/112"], cooldown=COOLDOWN,
                                       network=name)
                histories[name] = History()
                healths[name] = HealthRecorder(server.target).start()
                loads[name] = AllocLoad(server.target, histories[name], f"ro-{name}", tasks=4, owners=10,
                                        timeout=3.0, seed=7).start()
            for load in loads.values():
                load.wait_ok(40)
            set_read_only(pg, True)
            read_only_from = time.monotonic()
            try:
                for health in healths.values():
                    health.wait("NOT_SERVING", since=read_only_from - 1, timeout=30)
                time.sleep(3)  # calls keep failing: each load task gets UNAVAILABLE after its retries
            finally:
                read_only_until = time.monotonic()
                set_read_only(pg, False)
            for health in healths.values():
                health.wait("SERVING", since=read_only_until, timeout=30)
            for load in loads.values():
                load.wait_ok(40, since=time.monotonic())
        except BaseException:
            for health in healths.values():
                health.stop()
            for load in loads.values():
                with contextlib.suppress(Exception):  # the failure above is the one to report
                    load.stop(timeout=60)
            raise
        for health in healths.values():
            health.stop()
        for load in loads.values():
            stats = load.stop()
            assert not stats.bugs, stats.bugs[:3]
        for name, server in servers.items():
            ops = histories[name].snapshot()
            report = check(ops, final_state(server.target, f"ro-{name}"), cooldown=COOLDOWN)
            print(f"\nREAD-ONLY {name}: {report.summary()}; codes {dict(loads[name].stats.codes)}", flush=True)
            report.assert_valid()
            # No write was answered while every session was read-only (the margin: in-flight commits).
            written = [op for op in ops if op.kind in (ALLOCATE, RELEASE) and op.outcome == OK
                       and op.invoke >= read_only_from + 0.5 and op.complete <= read_only_until]
            assert not written, [str(op) for op in written[:3]]
            codes = loads[name].stats.codes
            assert codes and set(codes) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, codes
            text = server.metrics_text() or ""
            internal = [line for line in text.splitlines() if 'code="INTERNAL"' in line and not line.endswith(" 0.0")]
            assert not internal, internal
            counts = reconnect_counts(text)
            assert counts[f'{{path="{name}",reason="read-only"}}'] > 0, counts
            assert counts['{path="health",reason="read-only"}'] > 0, counts
            fsck = subprocess.run([sys.executable, "-m", "dsipam.server", "fsck", f"ro-{name}", "--database-url", url],
                                  capture_output=True, text=True, timeout=60)
            assert fsck.returncode == 0 and "clean" in fsck.stdout, fsck.stdout + fsck.stderr
            server.terminate()  # fails on a counted error or a traceback in the log
            log = server.log()
            assert "takes no writes" in log or "could not write (read-only" in log, log[-3000:]
