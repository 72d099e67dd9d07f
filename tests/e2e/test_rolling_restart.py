"""Two replicas on one database behind client-side round-robin (the SDK): a rolling restart
under load fails no call beyond the SDK's retries and duplicates nothing; killing one replica
leaves the other serving."""

import subprocess
import sys
import threading
import time
from collections import Counter

import grpc
from support import free_port, psql, spawn_server, wait_healthy

from dsipam.client import IpamClient, IpamError


class CountAttempts(grpc.UnaryUnaryClientInterceptor):
    """Sees every attempt the SDK makes (retries included)."""

    def __init__(self) -> None:
        self.codes: Counter[str] = Counter()
        self.lock = threading.Lock()

    def intercept_unary_unary(self, continuation, client_call_details, request):  # noqa: ANN001, ANN201
        outcome = continuation(client_call_details, request)
        code = outcome.code() if hasattr(outcome, "code") else grpc.StatusCode.OK
        with self.lock:
            self.codes[code.name if code else "OK"] += 1
        return outcome


def test_rolling_restart_and_replica_loss(db_url, clean_db, tmp_path):
    ports = [free_port(), free_port()]
    servers = [spawn_server(db_url, tmp_path, port=p, extra_env={"DSIPAM_SHUTDOWN_DELAY": "0.5"}) for p in ports]
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    counter = CountAttempts()
    held: dict[str, tuple[str, ...]] = {}
    failures: list[str] = []
    calls = Counter()
    stop = threading.Event()
    try:
        with IpamClient(target, timeout=30, interceptors=[counter]) as admin:
            admin.create_pool("roll", ["198.18.0.0/17", "fd00::/113"])

        def load(tag: str) -> None:
            with IpamClient(target, timeout=30, interceptors=[counter]) as ipam:
                i = 0
                while not stop.is_set():
                    owner = f"{tag}-{i}"
                    try:
                        pair = ipam.allocate("roll", owner, policy="require").allocation
                        calls["allocate"] += 1
                        held[owner] = tuple(str(a.ip) for a in pair.addresses)
                        if i % 3 == 0:
                            ipam.release("roll", owner)
                            calls["release"] += 1
                            held.pop(owner)
                    except IpamError as e:
                        failures.append(f"{owner}: {e!r}")
                    i += 1

        threads = [threading.Thread(target=load, args=(f"t{n}",)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        for n, port in enumerate(ports):  # rolling restart: one replica at a time
            assert servers[n].terminate() == 0
            servers[n] = spawn_server(db_url, tmp_path, port=port, extra_env={"DSIPAM_SHUTDOWN_DELAY": "0.5"})
            time.sleep(2)
        during_restart = sum(calls.values())
        servers[0].kill()  # losing a replica: calls go on against the other
        time.sleep(3)
        after_kill = sum(calls.values())
        stop.set()
        for t in threads:
            t.join()
        wait_healthy(servers[1].target)
    finally:
        stop.set()
        for s in servers:
            s.terminate()
    attempts = sum(counter.codes.values())
    total = sum(calls.values())
    retried = attempts - counter.codes["OK"]
    print(f"\nrolling restart: {total} calls ({dict(calls)}) + 1 CreatePool, {attempts} attempts, {retried} "
          f"attempts failed and were retried by the SDK {dict(counter.codes)}, {len(failures)} failures")
    assert failures == []
    assert after_kill > during_restart  # the surviving replica kept serving
    assert total > 100
    # Nothing duplicated, and every owner told "allocated" (and not released) holds its pair.
    dup = psql(db_url, "SELECT count(*) FROM (SELECT ipv4 FROM ipam_allocations WHERE ipv4 IS NOT NULL GROUP BY ipv4 "
                       "HAVING count(*) > 1) d")
    assert dup == "0"
    rows = psql(db_url, "SELECT owner || '=' || host(ipv4) || ',' || host(ipv6) FROM ipam_allocations").split()
    stored = {r.split("=")[0]: tuple(r.split("=")[1].split(",")) for r in rows}
    assert stored == held
    out = subprocess.run([sys.executable, "-m", "dsipam.server", "fsck", "roll", "--database-url", db_url],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
