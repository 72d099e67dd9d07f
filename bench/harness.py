"""What every benchmark needs: a scratch database, server processes, pools, fills, checks, samplers.

Nothing here changes the service: pools are created through the API, and the only
SQL writes (:func:`fill_pool`, :func:`prepare_blocks`) follow the schema of
``migrations/versions`` so that ``dsipam fsck`` stays clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("DSIPAM_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PYTHON = sys.executable


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def psql(url: str, sql: str) -> str:
    """Runs SQL with psql and returns its unaligned, tuples-only output."""
    done = subprocess.run(
        ["psql", url, "-v", "ON_ERROR_STOP=1", "-qtAc", sql], check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


def database_url(name: str, admin_url: str = ADMIN_URL) -> str:
    return f"{admin_url.rsplit('/', 1)[0]}/{name}"


@contextlib.contextmanager
def scratch_database(prefix: str = "dsipam_bench", admin_url: str = ADMIN_URL, keep: bool = False) -> Iterator[str]:
    """A new database migrated to head with ``dsipam migrate``; dropped afterwards unless ``keep``."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    psql(admin_url, f"CREATE DATABASE {name}")
    url = database_url(name, admin_url)
    try:
        subprocess.run(
            [PYTHON, "-m", "dsipam.server", "migrate", "--database-url", url], check=True, capture_output=True, text=True
        )
        log(f"scratch database {name} migrated")
        yield url
    finally:
        if keep:
            log(f"kept database {url}")
        else:
            psql(admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(target: str, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {target} exited with {proc.returncode}")
        with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
        time.sleep(0.1)
    raise TimeoutError(f"server at {target} not healthy after {timeout}s")


@dataclass
class Servers:
    """``count`` ``dsipam serve`` processes on their own loopback ports, one database."""

    db_url: str
    count: int = 1
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    cpus: tuple[int, ...] = ()  # pin the server processes to these CPUs (empty: no pinning)
    procs: list[subprocess.Popen] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    logdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dsipam-bench-")))

    def start(self) -> Servers:
        env = dict(os.environ)
        env.update({"DSIPAM_DATABASE_URL": self.db_url, "DSIPAM_LOG_LEVEL": "WARNING", "DSIPAM_INSECURE": "1", **self.env})
        for _ in range(self.count):
            port = free_port()
            target = f"127.0.0.1:{port}"
            log_file = open(self.logdir / f"server-{port}.log", "w")  # noqa: SIM115 - closed with the process
            proc = subprocess.Popen(
                [PYTHON, "-m", "dsipam.server", "serve", "--listen", target, *self.args],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=(lambda cpus=self.cpus: os.sched_setaffinity(0, cpus)) if self.cpus else None,
            )
            log_file.close()
            self.procs.append(proc)
            self.targets.append(target)
        for target, proc in zip(self.targets, self.procs, strict=True):
            try:
                wait_healthy(target, proc)
            except Exception:
                self.stop()
                raise RuntimeError(f"server did not start; logs in {self.logdir}") from None
        pinned = f", pinned to CPU {','.join(map(str, self.cpus))}" if self.cpus else ""
        log(f"{self.count} server process(es) on {', '.join(self.targets)} (pids {', '.join(str(p) for p in self.pids)}){pinned}")
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def __enter__(self) -> Servers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- /proc samplers ----------------------------------------------------------------------------


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process, from /proc/PID/status."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return float(sum(parts) - idle), float(sum(parts))


class Sampler:
    """Samples server RSS while a scenario runs, and the CPU used by servers and the whole machine."""

    def __init__(self, pids: Sequence[int], interval: float = 0.2) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.peak_rss = dict.fromkeys(self.pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.cpu0: dict[int, float] = {}
        self.cpu: dict[int, float] = {}
        self.machine0 = (0.0, 0.0)
        self.machine_busy_fraction = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                with contextlib.suppress(OSError):
                    self.peak_rss[pid] = max(self.peak_rss[pid], rss_bytes(pid)[0])
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self.cpu0 = {pid: cpu_seconds(pid) for pid in self.pids}
        self.machine0 = machine_busy()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for pid in self.pids:
            with contextlib.suppress(OSError):
                self.cpu[pid] = cpu_seconds(pid) - self.cpu0[pid]
                self.peak_rss[pid] = max(self.peak_rss[pid], rss_bytes(pid)[0])
        busy, total = machine_busy()
        self.machine_busy_fraction = (busy - self.machine0[0]) / max(total - self.machine0[1], 1.0)


# -- pools through the API ---------------------------------------------------------------------


def create_pool(target: str, name: str, ranges: Sequence[str], block_size: int = 0, network: str | None = None) -> None:
    """CreatePool through the API, one range per CIDR.

    Each benchmark pool is an address space of its own (``network``, default ``bench-<name>``): the
    scenarios' pools overlap one another (s4 and the ceiling pool take all of 198.18.0.0/15), and
    pools of one network may not overlap.
    """
    if network is None:
        network = f"bench-{name}"
    import grpc

    from dsipam.v1 import ipam_pb2 as pb
    from dsipam.v1 import ipam_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        ipam_pb2_grpc.IpamServiceStub(ch).CreatePool(
            pb.CreatePoolRequest(
                pool=pb.Pool(name=name, ranges=[pb.IpRange(cidr=c, block_size=block_size) for c in ranges],
                             **({"network": network} if network else {}))
            ),
            timeout=30,
        )


# -- SQL fills consistent with the schema ------------------------------------------------------


async def _ranges_of(conn, pool: str) -> tuple[int, list]:  # type: ignore[no-untyped-def]
    from dsipam.server.domain import build_range

    rows = await conn.fetch(
        """SELECT p.id AS pool_id, r.id, r.family, host(r.cidr) || '/' || masklen(r.cidr) AS cidr,
                  host(r.first_ip) AS first_ip, host(r.last_ip) AS last_ip, host(r.gateway) AS gateway,
                  r.exclude::text[] AS exclude, r.block_prefix
             FROM ipam_pools p JOIN ipam_ranges r ON r.pool_id = p.id WHERE p.name = $1 ORDER BY r.position""",
        pool,
    )
    if not rows:
        raise ValueError(f"pool {pool!r}: not found or has no ranges")
    out = []
    for r in rows:
        spec = build_range(
            cidr=r["cidr"], first=r["first_ip"] or "", last=r["last_ip"] or "", gateway=r["gateway"] or "",
            exclude=r["exclude"] or (), block_size=1 << ((32 if r["family"] == 4 else 128) - r["block_prefix"]),
        )
        out.append((r["id"], spec))
    return rows[0]["pool_id"], out


def _available(spec) -> list[int]:  # type: ignore[no-untyped-def]
    out: list[int] = []
    for a, b in spec.available:
        out.extend(range(a, b + 1))
    return out


async def _fill(db_url: str, pool: str, fraction: float, seed: int, owner_prefix: str) -> dict[str, int]:
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        pool_id, ranges = await _ranges_of(conn, pool)
        by_family: dict[int, list] = {}
        for rid, spec in ranges:
            by_family.setdefault(int(spec.family), []).append((rid, spec))
        if any(len(v) != 1 for v in by_family.values()):
            raise ValueError("fill: expects one range per family")
        rng = random.Random(seed)
        chosen: dict[int, list[int]] = {}
        sizes = {fam: len(_available(v[0][1])) for fam, v in by_family.items()}
        pairs = int(min(sizes.values()) * fraction)
        for fam, [(_rid, spec)] in by_family.items():
            addrs = _available(spec)
            picked = sorted(rng.sample(range(len(addrs)), pairs))  # free addresses scattered at random
            chosen[fam] = [addrs[i] for i in picked]
        block_rows = []
        for fam, [(rid, spec)] in by_family.items():
            taken = set(chosen[fam])
            base = spec.first_block()
            while base is not None:
                bitmap, free = spec.block_mask(base)
                bits = bytearray(bitmap.encode())
                used = 0
                for i in range(spec.block_size):
                    if base + i in taken:
                        bits[i] = ord("1")
                        used += 1
                block_rows.append((pool_id, rid, fam, spec.block_cidr(base), bits.decode(), free - used, free))
                base = spec.following_block(base)
        fams = sorted(chosen)
        alloc_rows = []
        for k in range(pairs):
            ips = {f: str(ipaddress.ip_address(chosen[f][k])) for f in fams}
            alloc_rows.append((pool_id, f"{owner_prefix}-{k}", ips.get(4), ips.get(6)))
        async with conn.transaction():
            await conn.execute("DELETE FROM ipam_blocks WHERE pool_id = $1", pool_id)
            await conn.executemany(
                "INSERT INTO ipam_blocks (pool_id, range_id, family, base, bitmap, free_count, avail_count) "
                "VALUES ($1, $2, $3, $4::text::cidr, $5::text::varbit, $6, $7)",
                block_rows,
            )
            await conn.executemany(
                "INSERT INTO ipam_allocations (pool_id, owner, ipv4, ipv6) VALUES ($1, $2, $3::text::inet, $4::text::inet)",
                alloc_rows,
            )
            await conn.execute("UPDATE ipam_ranges SET next_block = NULL WHERE pool_id = $1", pool_id)
        await conn.execute("ANALYZE ipam_blocks; ANALYZE ipam_allocations")
        return {"pairs": pairs, "blocks": len(block_rows), **{f"free_v{f}": sizes[f] - pairs for f in sizes}}
    finally:
        await conn.close()


def fill_pool(db_url: str, pool: str, fraction: float, seed: int = 1, owner_prefix: str = "fill") -> dict[str, int]:
    """Creates every block of the pool's two ranges and allocates ``fraction`` of the smaller one as pairs.

    The allocated addresses are chosen at random (the free ones end up scattered over
    all blocks, as after churn); bitmaps, counts and allocation rows agree, and the
    ranges' ``next_block`` is cleared because every block exists.
    """
    return asyncio.run(_fill(db_url, pool, fraction, seed, owner_prefix))


def prepare_blocks(db_url: str, pool: str) -> dict[str, int]:
    """Creates every (empty) block of the pool, as the allocator would lazily; for the pgbench ceiling."""
    return asyncio.run(_fill(db_url, pool, 0.0, 0, "unused"))


# -- correctness -------------------------------------------------------------------------------


@dataclass
class Check:
    """The correctness check run after every benchmark run."""

    pool: str
    allocations: int
    duplicate_v4: int
    duplicate_v6: int
    bitmap_used_v4: int
    bitmap_used_v6: int
    fsck_clean: bool
    fsck_output: str
    expected_allocations: int | None = None

    @property
    def ok(self) -> bool:
        counts_agree = self.expected_allocations is None or self.expected_allocations == self.allocations
        return self.fsck_clean and not self.duplicate_v4 and not self.duplicate_v6 and counts_agree

    def line(self) -> str:
        exp = "" if self.expected_allocations is None else f" (expected {self.expected_allocations})"
        return (
            f"check {self.pool}: {self.allocations} allocations{exp}, duplicates v4={self.duplicate_v4} "
            f"v6={self.duplicate_v6}, bits set v4={self.bitmap_used_v4} v6={self.bitmap_used_v6} (held or cooling), "
            f"fsck {'clean' if self.fsck_clean else 'NOT CLEAN'} -> {'OK' if self.ok else 'FAILED'}"
        )


def check_pool(db_url: str, pool: str, expected_allocations: int | None = None) -> Check:
    """No address held twice (by SQL, not trusting the constraints), and ``dsipam fsck`` clean."""
    row = psql(
        db_url,
        f"""
        WITH p AS (SELECT id FROM ipam_pools WHERE name = '{pool}'),
             a AS (SELECT * FROM ipam_allocations WHERE pool_id = (SELECT id FROM p))
        SELECT (SELECT count(*) FROM a),
               (SELECT count(*) FROM (SELECT ipv4 FROM a WHERE ipv4 IS NOT NULL GROUP BY ipv4 HAVING count(*) > 1) d),
               (SELECT count(*) FROM (SELECT ipv6 FROM a WHERE ipv6 IS NOT NULL GROUP BY ipv6 HAVING count(*) > 1) d),
               (SELECT coalesce(sum(avail_count - free_count), 0) FROM ipam_blocks
                 WHERE pool_id = (SELECT id FROM p) AND family = 4),
               (SELECT coalesce(sum(avail_count - free_count), 0) FROM ipam_blocks
                 WHERE pool_id = (SELECT id FROM p) AND family = 6)
        """,
    )
    n, d4, d6, u4, u6 = (int(x) for x in row.split("|"))
    env = dict(os.environ, DSIPAM_DATABASE_URL=db_url)
    done = subprocess.run(
        [PYTHON, "-m", "dsipam.server", "fsck", pool], env=env, capture_output=True, text=True, timeout=1800
    )
    out = (done.stdout + done.stderr).strip()
    return Check(pool, n, d4, d6, u4, u6, done.returncode == 0, out[-2000:], expected_allocations)


def storage_bytes(db_url: str) -> dict[str, int]:
    """On-disk size (table, indexes and TOAST: ``pg_total_relation_size``) of every ``ipam_*`` table.

    ``allocation_tables`` is ipam_allocations + ipam_blocks; ``tables_total`` every ipam_* table
    (events, cooldowns, pools, ranges, ... included); ``database`` the whole database.
    """
    rows = psql(
        db_url,
        "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'r' AND n.nspname = 'public' AND c.relname LIKE 'ipam\\_%' ORDER BY 1",
    )
    sizes = {name: int(size) for name, size in (line.split("|") for line in rows.splitlines() if line)}
    out = {f"table_{k}": v for k, v in sizes.items()}
    out["allocation_tables"] = sizes.get("ipam_allocations", 0) + sizes.get("ipam_blocks", 0)
    out["tables_total"] = sum(sizes.values())
    out["database"] = int(psql(db_url, "SELECT pg_database_size(current_database())"))
    return out


def machine_info() -> dict[str, str]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f.readline().split(":", 1)[1].strip()
    pg = ""
    with contextlib.suppress(Exception):
        pg = psql(ADMIN_URL, "SHOW server_version")
    import grpc

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": mem,
        "loadavg_at_start": " ".join(os.getloadavg().__repr__().strip("()").split(", ")),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "postgresql": pg,
    }
