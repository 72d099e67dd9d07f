"""A real Patroni cluster for fault tests: one etcd and three Patroni members, each PostgreSQL 15
on its own loopback port and data directory, in a temporary directory; never the shared
PostgreSQL on 127.0.0.1:5432.

Debian's ``patroni`` (3.0) runs on ``/usr/bin/python3``: it is started with ``PATH=/usr/bin:/bin``
(a pyenv ``python3`` earlier on PATH cannot import it), as the ``postgres`` user through
``setpriv`` (PostgreSQL refuses root), with the ``etcd3`` DCS section (etcd 3.4 answers the v2
API only with ``--enable-v2``). Facts checked on this kind of machine: ../shared/patroni.md.

Layout: members ``m1``, ``m2`` and ``m3``. ``m1`` bootstraps and leads; ``m2`` is its synchronous
standby; ``m3`` is tagged ``nofailover`` and ``nosync`` (a reporting or disaster-recovery replica
that follows the leader but is never promoted nor waited for), so that the synchronous standby,
and so every failover target, is always the other one of ``m1``/``m2``: a failover and a second
one back to the first primary are both deterministic. ``primary_start_timeout: 0`` makes a
crash of the primary's postmaster a failover (Patroni's default restarts it in place);
``use_pg_rewind`` with ``wal_log_hints`` and a ``rewind`` user lets a diverged old primary
rejoin as a replica. No watchdog (none on this machine): see docs/operations.md for what that
allows when only a Patroni process stops.

Every process runs in a process group of its own (Patroni's, each postmaster's); :meth:`close`
SIGKILLs them all and deletes the directory, even after a failure. Missing binaries make the
tests skip with the reason, or fail under ``CI=true`` (:func:`require`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pgcluster import find_bindir  # noqa: E402
from support import free_port  # noqa: E402

PATRONI = Path("/usr/bin/patroni")
PATRONICTL = Path("/usr/bin/patronictl")
PLAIN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
MEMBERS = ("m1", "m2", "m3")

# The DCS settings that shape the failover windows (docs/operations.md, "Patroni"): Patroni
# requires loop_wait + 2 * retry_timeout <= ttl.
TTL, LOOP_WAIT, RETRY_TIMEOUT = 10, 2, 5


def missing() -> str | None:
    """Why the Patroni tests cannot run here, or None."""
    for path in (PATRONI, PATRONICTL):
        if not os.access(path, os.X_OK):
            return f"no {path} (apt-get install patroni)"
    if shutil.which("etcd") is None:
        return "no etcd on PATH (apt-get install etcd-server)"
    if shutil.which("setpriv") is None:
        return "no setpriv (util-linux)"
    try:
        find_bindir()
    except RuntimeError as exc:
        return str(exc)
    if os.geteuid() != 0:
        return "the Patroni fixture runs PostgreSQL as the postgres user: run the tests as root"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user"
    return None


def require() -> None:
    """Skips the calling test (fails it under ``CI=true``) when the cluster cannot run here."""
    import pytest

    why = missing()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the Patroni tests cannot run: {why}")
    pytest.skip(why)


def _get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:  # Patroni answers 503 with a JSON body on many endpoints
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None


@dataclass
class Member:
    cluster: PatroniCluster
    name: str
    pg_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def dir(self) -> Path:
        return self.cluster.root / self.name

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def config(self) -> Path:
        return self.dir / "patroni.yml"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/{db}"

    def write_config(self) -> None:
        tags = {"nofailover": True, "nosync": True} if self.name == MEMBERS[-1] else {}
        cfg = {
            "scope": self.cluster.scope,
            "namespace": "/dsipam-tests/",
            "name": self.name,
            "log": {"level": "INFO", "dir": str(self.dir / "log"), "file_num": 2, "file_size": 20_000_000},
            "restapi": {"listen": f"127.0.0.1:{self.api_port}", "connect_address": f"127.0.0.1:{self.api_port}"},
            "etcd3": {"hosts": f"127.0.0.1:{self.cluster.etcd_port}"},
            "bootstrap": {
                "dcs": self.cluster.dcs,
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "data-checksums"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg_port}",
                "connect_address": f"127.0.0.1:{self.pg_port}",
                "data_dir": str(self.data_dir),
                "bin_dir": str(self.cluster.bindir),
                "pgpass": str(self.dir / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": "postgres"},
                    "replication": {"username": "replicator", "password": "replicator"},
                    "rewind": {"username": "rewinder", "password": "rewinder"},
                },
                "parameters": {"unix_socket_directories": str(self.dir)},
                "pg_hba": [
                    "local all all trust",
                    "host replication replicator 127.0.0.1/32 trust",
                    "host all all 127.0.0.1/32 trust",
                ],
            },
            "watchdog": {"mode": "off"},
            "tags": {"nofailover": False, "nosync": False, **tags},
        }
        self.dir.mkdir(exist_ok=True)
        (self.dir / "log").mkdir(exist_ok=True)
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.cluster.own(self.dir)
        self.cluster.own(self.dir / "log")
        self.cluster.own(self.config)

    # -- processes ---------------------------------------------------------------------------

    def start(self) -> None:
        """Starts this member's Patroni (which starts, bootstraps or clones its PostgreSQL)."""
        self.starts += 1
        out = open(self.dir / f"patroni-{self.starts}.out", "w")
        self.proc = subprocess.Popen(
            ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", str(PATRONI), str(self.config)],
            env=PLAIN_ENV, cwd=self.dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        out.close()

    def postmaster_pid(self) -> int | None:
        """The running postmaster's PID (from postmaster.pid), or None."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            return None

    def kill_postmaster(self) -> int:
        """SIGKILL of this member's postmaster alone (its backends notice and exit); Patroni lives on."""
        pid = self.postmaster_pid()
        if pid is None:
            raise RuntimeError(f"{self.name}: no postmaster running")
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_patroni(self, sig: int = signal.SIGKILL) -> None:
        """Signals this member's Patroni process group (SIGSTOP pauses it, SIGCONT resumes it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            if sig == signal.SIGKILL:
                self.proc.wait(10)

    def kill_all(self) -> None:
        """SIGKILL of Patroni and of the postmaster's process group: nothing of the member lives on."""
        self.kill_patroni(signal.SIGKILL)
        pid = self.postmaster_pid()
        if pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.postmaster_pid() is not None and time.monotonic() < deadline:
                time.sleep(0.05)

    # -- state -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        """Patroni's ``GET /patroni`` (role, state, timeline ...), or None when it does not answer."""
        try:
            _code, body = _get_json(f"{self.api}/patroni", timeout=1.0)
        except (OSError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def psql(self, sql: str, db: str = "postgres", timeout: float = 10.0) -> str:
        out = subprocess.run(
            [str(self.cluster.bindir / "psql"), self.url(db) + "?connect_timeout=3", "-v", "ON_ERROR_STOP=1",
             "-tAc", sql],
            capture_output=True, text=True, check=True, timeout=timeout,
        )
        return out.stdout.strip()

    def in_recovery(self) -> bool | None:
        """True on a replica, False on a primary, None when PostgreSQL does not answer."""
        try:
            return self.psql("SELECT pg_is_in_recovery()", timeout=5) == "t"
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return None

    def log(self, tail: int = 6000) -> str:
        parts = []
        for p in sorted(self.dir.glob("patroni-*.out")) + sorted((self.dir / "log").glob("*.log")):
            parts.append(f"--- {self.name}/{p.name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)


class PatroniCluster:
    """etcd and three Patroni members in a temporary directory; see :func:`patroni_cluster`."""

    def __init__(self, *, strict: bool = False, ttl: int = TTL, loop_wait: int = LOOP_WAIT,
                 retry_timeout: int = RETRY_TIMEOUT) -> None:
        why = missing()
        if why is not None:
            raise RuntimeError(why)
        self.bindir = find_bindir()
        self.strict = strict
        self.scope = f"dsipam-{uuid.uuid4().hex[:8]}"
        self.root = Path(tempfile.mkdtemp(prefix="dsipam-patroni-"))
        self.pw = pwd.getpwnam("postgres")
        self.own(self.root)
        os.chmod(self.root, 0o700)
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.etcd: subprocess.Popen | None = None
        self.etcd_paused = False
        self.dcs: dict[str, Any] = {
            "ttl": ttl,
            "loop_wait": loop_wait,
            "retry_timeout": retry_timeout,
            "maximum_lag_on_failover": 1_048_576,
            "primary_start_timeout": 0,
            "synchronous_mode": True,
            "synchronous_mode_strict": strict,
            "postgresql": {
                "use_pg_rewind": True,
                "use_slots": True,
                "parameters": {
                    "max_connections": 100,
                    "shared_buffers": "32MB",
                    "wal_level": "replica",
                    "hot_standby": "on",
                    "wal_log_hints": "on",
                    "max_wal_senders": 10,
                    "max_replication_slots": 10,
                    "wal_keep_size": "128MB",
                    "log_min_messages": "warning",
                    "fsync": "on",
                },
            },
        }
        self.members = {name: Member(self, name) for name in MEMBERS}

    def own(self, path: Path) -> None:
        os.chown(path, self.pw.pw_uid, self.pw.pw_gid)

    # -- life cycle --------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> None:
        """etcd, then ``m1`` (bootstraps and leads), then ``m2`` and ``m3`` (clone it); returns once
        there is a leader, a synchronous standby and a streaming replica."""
        etcd_dir = self.root / "etcd"
        etcd_dir.mkdir()
        self.etcd = subprocess.Popen(
            ["etcd", "--name=dsipam-test", f"--data-dir={etcd_dir / 'data'}",
             f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
             f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
             f"--listen-peer-urls=http://127.0.0.1:{self.etcd_peer_port}",
             f"--initial-advertise-peer-urls=http://127.0.0.1:{self.etcd_peer_port}",
             f"--initial-cluster=dsipam-test=http://127.0.0.1:{self.etcd_peer_port}"],
            stdout=open(etcd_dir / "etcd.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._wait(lambda: _get_json(f"http://127.0.0.1:{self.etcd_port}/health")[0] == 200, 30, "etcd healthy")
        for member in self.members.values():
            member.write_config()
        self.members["m1"].start()
        self.wait_leader("m1", timeout)
        self.members["m2"].start()
        self.members["m3"].start()
        self.wait_roles({"m1": "leader", "m2": "sync_standby", "m3": "replica"}, timeout)

    def close(self) -> None:
        """SIGKILLs every process of the cluster (Patroni groups, postmaster groups, etcd) and
        deletes the directory. Safe to call after any failure."""
        if self.etcd is not None and self.etcd.poll() is None and self.etcd_paused:
            with contextlib.suppress(OSError):
                os.killpg(self.etcd.pid, signal.SIGCONT)
        for member in self.members.values():
            try:
                member.kill_all()
            except Exception:  # noqa: BLE001 - keep killing the others; the sweep below is the last resort
                pass
        if self.etcd is not None and self.etcd.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.etcd.pid, signal.SIGKILL)
            self.etcd.wait(10)
        self._sweep()
        shutil.rmtree(self.root, ignore_errors=True)

    def _sweep(self) -> None:
        """SIGKILLs any process left whose command line names this cluster's directory (a
        postmaster started while Patroni was being killed, a pg_rewind)."""
        mark = str(self.root)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if mark in cmdline and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    os.kill(int(entry.name), signal.SIGKILL)

    # -- faults ------------------------------------------------------------------------------

    def pause_etcd(self) -> None:
        """SIGSTOP of etcd: the DCS stops answering, as behind a network partition (connections
        hang rather than being refused)."""
        assert self.etcd is not None
        os.killpg(self.etcd.pid, signal.SIGSTOP)
        self.etcd_paused = True

    def resume_etcd(self) -> None:
        assert self.etcd is not None
        os.killpg(self.etcd.pid, signal.SIGCONT)
        self.etcd_paused = False

    def patronictl(self, *args: str, timeout: float = 60.0) -> str:
        out = subprocess.run(
            ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", str(PATRONICTL),
             "-c", str(self.members["m1"].config), *args],
            env=PLAIN_ENV, capture_output=True, text=True, timeout=timeout, cwd=self.root,
        )
        if out.returncode != 0:
            raise RuntimeError(f"patronictl {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def set_dcs(self, **settings: Any) -> None:
        """Changes the cluster's dynamic configuration (``patronictl edit-config --set``) and waits
        two HA loops, by which every member has applied it."""
        args = ["edit-config", self.scope, "--force", "--quiet"]
        for key, value in settings.items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        self.patronictl(*args)
        self._wait(lambda: all(_get_json(f"{self.members['m1'].api}/config")[1].get(k) == v
                               for k, v in settings.items()), 30, f"DCS config {settings}")
        time.sleep(2 * self.dcs["loop_wait"] + 0.5)

    def pids(self) -> list[int]:
        """Every process of the cluster known now: Patroni, postmasters, etcd."""
        out = [m.proc.pid for m in self.members.values() if m.proc is not None and m.proc.poll() is None]
        out += [pid for m in self.members.values() if (pid := m.postmaster_pid()) is not None]
        if self.etcd is not None and self.etcd.poll() is None:
            out.append(self.etcd.pid)
        return out

    def switchover(self, candidate: str | None = None) -> None:
        """``patronictl switchover --force`` (to ``candidate``, else Patroni's choice: the sync standby)."""
        args = ["switchover", self.scope, "--force"]
        if candidate:
            args += ["--candidate", candidate]
        self.patronictl(*args)

    # -- state -------------------------------------------------------------------------------

    def url(self, db: str = "postgres") -> str:
        """The multi-host URL over every member that only connects to the writable primary."""
        hosts = ",".join(f"127.0.0.1:{m.pg_port}" for m in self.members.values())
        return f"postgresql://postgres@{hosts}/{db}?target_session_attrs=read-write"

    def roles(self) -> dict[str, str]:
        """Member name -> role (leader, sync_standby, replica) with state ``running``/``streaming``,
        from ``GET /cluster`` of the first member that answers; {} when none does."""
        for member in self.members.values():
            try:
                code, body = _get_json(f"{member.api}/cluster", timeout=1.0)
            except (OSError, ValueError):
                continue
            if code == 200 and isinstance(body, dict):
                return {m["name"]: m["role"] for m in body.get("members", [])
                        if m.get("state") in ("running", "streaming")}
        return {}

    def leader(self) -> Member | None:
        """The member whose PostgreSQL is a writable primary right now, by asking each one."""
        found = [m for m in self.members.values() if m.in_recovery() is False]
        return found[0] if len(found) == 1 else None

    def primaries(self) -> list[str]:
        """Members whose PostgreSQL answers and is not in recovery (more than one: split brain)."""
        return [m.name for m in self.members.values() if m.in_recovery() is False]

    def _wait(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not reached in {timeout:g}s; roles {self.roles()}\n{self.logs()}")
            time.sleep(0.2)

    def wait_leader(self, name: str, timeout: float = 60.0) -> None:
        """Until ``name`` leads in the DCS and its PostgreSQL accepts writes."""
        self._wait(lambda: self.roles().get(name) == "leader" and self.members[name].in_recovery() is False,
                   timeout, f"{name} leader")

    def wait_roles(self, want: dict[str, str], timeout: float = 90.0) -> None:
        self._wait(lambda: all(self.roles().get(k) == v for k, v in want.items()), timeout, f"roles {want}")

    def wait_replicating(self, name: str, timeout: float = 90.0) -> None:
        """Until ``name`` is a replica streaming from the current leader (in pg_stat_replication)."""
        def streaming() -> bool:
            leader = self.leader()
            if leader is None or leader.name == name:
                return False
            return leader.psql(
                f"SELECT count(*) FROM pg_stat_replication WHERE application_name = '{name}' "
                "AND state = 'streaming'") == "1"
        self._wait(streaming, timeout, f"{name} streaming")

    def logs(self, tail: int = 3000) -> str:
        out = [m.log(tail) for m in self.members.values()]
        etcd_log = self.root / "etcd" / "etcd.log"
        if etcd_log.exists():
            out.append(f"--- etcd.log\n{etcd_log.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)


def create_dsipam_database(cluster: PatroniCluster, name: str = "dsipam") -> str:
    """Creates the database on the leader and migrates it with ``dsipam migrate`` through the
    multi-host URL; returns that URL."""
    leader = cluster.leader()
    assert leader is not None, f"no leader: {cluster.roles()}"
    leader.psql(f"CREATE DATABASE {name}")
    url = cluster.url(name)
    out = subprocess.run([sys.executable, "-m", "dsipam.server", "migrate", "--database-url", url],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"dsipam migrate through {url} failed:\n{out.stdout}\n{out.stderr}")
    return url


@contextlib.contextmanager
def patroni_cluster(**settings: Any) -> Iterator[PatroniCluster]:
    """A started :class:`PatroniCluster` (``settings``: its keyword arguments); everything killed and
    deleted afterwards, even on failure."""
    cluster = PatroniCluster(**settings)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
