"""Private PostgreSQL servers for fault tests: a primary and streaming replicas of their own,
in a temporary directory on free ports, so that tests may stop, crash, restart and promote
them without touching the shared PostgreSQL on 127.0.0.1:5432.

Run as root, the PostgreSQL binaries run as the ``postgres`` user (PostgreSQL refuses root).
Everything is stopped and deleted when the :func:`private_cluster` context ends, even on failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import free_port  # noqa: E402


def find_bindir() -> Path:
    """The directory of initdb, pg_ctl and pg_basebackup."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise RuntimeError("no PostgreSQL server binaries (initdb): apt-get install postgresql")


class PgInstance:
    """One PostgreSQL server (primary or standby) with its own data directory and port."""

    def __init__(self, cluster: PgCluster, name: str, port: int) -> None:
        self.cluster = cluster
        self.name = name
        self.port = port
        self.pgdata = cluster.root / name
        self.logfile = cluster.root / f"{name}.log"

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cluster.run(str(self.cluster.bindir / "pg_ctl"), "-D", str(self.pgdata), *args, check=check)

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.pgdata}"
        self._pg_ctl("-l", str(self.logfile), "-o", opts, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stops the server: ``fast`` (what a restart does) or ``immediate`` (a crash, without a
        shutdown checkpoint: the next start runs crash recovery)."""
        self._pg_ctl("-m", mode, "-w", "-t", "60", "stop")

    def promote(self) -> None:
        self._pg_ctl("-w", "-t", "60", "promote")

    def running(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

    def psql(self, sql: str, db: str = "postgres") -> str:
        out = subprocess.run(
            [str(self.cluster.bindir / "psql"), self.url(db), "-v", "ON_ERROR_STOP=1", "-tAc", sql],
            capture_output=True, text=True, check=True,
        )
        return out.stdout.strip()

    def wait_for(self, sql: str, want: str, db: str = "postgres", timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        got = ""
        while time.monotonic() < deadline:
            try:
                got = self.psql(sql, db)
                if got == want:
                    return
            except subprocess.CalledProcessError as exc:
                got = exc.stderr
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: {sql!r} gave {got!r}, not {want!r}")

    def kill_hard(self) -> None:
        """Last resort at clean-up: SIGKILL the postmaster if pg_ctl could not stop it."""
        pidfile = self.pgdata / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().splitlines()[0]), signal.SIGKILL)


class PgCluster:
    """A temporary directory of PostgreSQL instances; see :func:`private_cluster`."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="dsipam-pg-"))
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.instances: list[PgInstance] = []

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        full = ["runuser", "-u", self.user, "--", *cmd] if self.user else list(cmd)
        out = subprocess.run(full, capture_output=True, text=True, cwd=self.root)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def primary(self, name: str = "primary") -> PgInstance:
        """initdb and start a primary that accepts streaming replicas."""
        pg = PgInstance(self, name, free_port())
        self.run(str(self.bindir / "initdb"), "-D", str(pg.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                 "--no-sync")
        with open(pg.pgdata / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# dsipam fault tests\n"
                "wal_level = replica\nmax_wal_senders = 5\nwal_keep_size = '128MB'\nhot_standby = on\n"
                "max_connections = 60\nshared_buffers = '32MB'\nlog_min_messages = warning\n"
            )
        self.instances.append(pg)
        pg.start()
        return pg

    def standby(self, primary: PgInstance, name: str = "standby") -> PgInstance:
        """pg_basebackup of ``primary`` started as a streaming replica on another port."""
        pg = PgInstance(self, name, free_port())
        self.run(
            str(self.bindir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(pg.pgdata), "-R", "-X", "stream", "--checkpoint=fast", "--no-sync",
        )
        with open(pg.pgdata / "postgresql.auto.conf", "a") as conf:
            conf.write(f"primary_conninfo = 'host=127.0.0.1 port={primary.port} user=postgres application_name={name}'\n")
        self.instances.append(pg)
        pg.start()
        primary.wait_for(
            f"SELECT state FROM pg_stat_replication WHERE application_name = '{name}'", "streaming"
        )
        return pg

    def make_synchronous(self, primary: PgInstance, standby: PgInstance) -> None:
        """From now on a commit on ``primary`` is acknowledged only once ``standby`` has flushed it."""
        primary.psql(f"ALTER SYSTEM SET synchronous_standby_names = '{standby.name}'")
        primary.psql("ALTER SYSTEM SET synchronous_commit = 'on'")
        primary.psql("SELECT pg_reload_conf()")
        primary.wait_for(
            f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{standby.name}'", "sync"
        )

    def close(self) -> None:
        for pg in reversed(self.instances):
            if pg.running():
                try:
                    pg.stop("immediate")
                except RuntimeError:
                    pg.kill_hard()
        shutil.rmtree(self.root, ignore_errors=True)


def create_dsipam_database(pg: PgInstance, name: str = "dsipam") -> str:
    """Creates and migrates a dsipam database on ``pg``; returns its URL."""
    pg.psql(f"CREATE DATABASE {name}")
    url = pg.url(name)
    subprocess.run([sys.executable, "-m", "dsipam.server", "migrate", "--database-url", url],
                   check=True, capture_output=True, text=True)
    return url


@contextlib.contextmanager
def private_cluster() -> Iterator[PgCluster]:
    """A :class:`PgCluster`, stopped and deleted afterwards."""
    cluster = PgCluster()
    try:
        yield cluster
    finally:
        cluster.close()
