"""The ``dsipam`` command: serve, migrate and fsck, plus the admin commands of the SDK
(pool, alloc, release, gc; see dsipam.client._cli), which take connection options before or after the subcommand."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys

from dsipam.client._cli import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Parser,
    add_client_commands,
    add_client_options,
    prepare_argv,
    run,
)

from .settings import DEFAULT_LISTEN, SettingError, Settings

# Status lines `dsipam serve` prints on stdout; in text logs the same records would say them twice.
_PRINTED_STATUS = frozenset({"dsipam listening on %s", "authentication is off (--insecure)",
                             "shutting down: health NOT_SERVING, finishing in-flight calls (grace %ss)"})


class _ServeLogFilter(logging.Filter):
    """Drops the status lines printed on stdout from text logs, where they would be said twice."""

    def __init__(self, text: bool) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.text and record.name == "dsipam.server" and record.msg in _PRINTED_STATUS)


def _setup_logging(level: str, fmt: str = "text", *, serve: bool = False) -> None:
    if fmt == "text" and level == "WARNING" and not serve:  # migrate, fsck
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    else:
        from .observability import setup_logging

        setup_logging(level, fmt)
        if serve:
            only = _ServeLogFilter(text=fmt == "text")
            for handler in logging.getLogger().handlers:
                handler.addFilter(only)
    # Alembic's INFO lines (plugin set-up, "Context impl", one per revision) are noise at start-up:
    # `dsipam serve` and `dsipam migrate` print which revisions they applied themselves.
    if logging.getLogger("alembic").getEffectiveLevel() < logging.WARNING:
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _run_loop(coro, use_uvloop: bool):  # type: ignore[no-untyped-def]
    if use_uvloop:
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:
            pass
    return asyncio.run(coro)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.listen:
        settings.listen = args.listen
    if args.database_url:
        settings.database_url = args.database_url
    if settings.database_url:
        check_database_url(settings.database_url, "--database-url" if args.database_url else "DSIPAM_DATABASE_URL")
    if args.log_level:
        settings.log_level = args.log_level.upper()
    if args.db_pool_size is not None:
        settings.db_pool_size = args.db_pool_size
    if args.db_max_overflow is not None:
        settings.db_max_overflow = args.db_max_overflow
    if args.data_dir:
        settings.data_dir = args.data_dir
    if args.db_pgbouncer:
        settings.db_pgbouncer = True
    if args.workers is not None:
        settings.workers = args.workers
    if settings.db_pgbouncer:  # every engine of this process (store, migrations) reads it
        _use_pgbouncer()
    _apply_security_flags(args, settings)
    from .store._watch import configured_token_keys

    configured_token_keys(settings)  # a bad key is refused before anything starts (read again at start)
    _check_serve_settings(settings)
    if not settings.auth_config and not settings.insecure:
        exposed = [a for a in settings.listen or [DEFAULT_LISTEN] if not is_loopback(a)]
        if exposed:  # without a database URL too: the private PostgreSQL does not make it insecure there
            raise SystemExit(f"dsipam: serve: refusing to listen on {exposed[0]} (not a loopback address) without "
                             "authentication: give --auth-config (see docs/security.md), or --insecure to mean it")
    worker = os.environ.get("DSIPAM_WORKER_INDEX")
    if not settings.reuse_port and not worker:
        for address in settings.listen or [DEFAULT_LISTEN]:
            _check_bindable(address)
    if worker and settings.metrics_listen:  # one metrics port per worker: base port + index
        host, _, port = settings.metrics_listen.rpartition(":")
        settings.metrics_listen = f"{host}:{int(port) + int(worker)}"
    _setup_logging(settings.log_level, settings.log_format, serve=True)
    embedded = None
    if not settings.database_url:
        from .embedded import start_embedded

        embedded = start_embedded(settings.data_dir)
        settings.database_url = embedded.url
        settings.migrate = True
        if not settings.auth_config:  # loopback only (checked above): a developer's machine, announced as insecure
            settings.insecure = True
        how = "uses the private PostgreSQL another dsipam serve started" if embedded.shared else \
            f"started a private PostgreSQL ({embedded.bindir})"
        print(f"dsipam: {how} on 127.0.0.1:{embedded.port}; data in {embedded.pgdata}", flush=True)
    try:
        if not worker:  # the parent of --workers checked for its workers
            _prepare_schema(settings.database_url, settings.migrate or args.migrate)
        if settings.workers > 1 and not worker:
            return _run_workers(settings)
        from .app import serve

        _run_loop(serve(settings), settings.uvloop)
    finally:
        if embedded is not None:
            if embedded.stop():
                print("dsipam: private PostgreSQL stopped", flush=True)
            else:
                print(f"dsipam: private PostgreSQL left running for {embedded.others} other dsipam serve "
                      f"process(es)", flush=True)
    return 0


def _check_serve_settings(settings: Settings) -> None:
    """Refuses, before anything starts, the settings that would otherwise fail half-way through
    start-up (listen addresses, the metrics address, the log level and format)."""
    from .app import normalise_listen

    for address in settings.listen:
        normalise_listen(address)
    if settings.metrics_listen:
        _, sep, port = settings.metrics_listen.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit() and int(port) <= 65535):
            raise SettingError(f"--metrics-listen {settings.metrics_listen!r}: expected host:port")
    if settings.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise SettingError(f"--log-level {settings.log_level!r}: expected DEBUG, INFO, WARNING or ERROR")
    if settings.log_format not in ("text", "json"):
        raise SettingError(f"--log-format {settings.log_format!r}: expected text or json")


def is_loopback(address: str) -> bool:
    """Whether a listen address is reachable from this machine only: a unix socket, localhost,
    127.0.0.0/8 or ::1."""
    import ipaddress

    if address.startswith("unix:") or address.startswith("unix-abstract:"):
        return True
    host = address[1:].split("]", 1)[0] if address.startswith("[") else address.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_bindable(address: str) -> None:
    """Refuses a TCP listen address another process holds, in one line, before anything starts
    (gRPC would say it in a C-core log line and a RuntimeError later)."""
    import errno
    import socket

    if address.startswith("unix:") or ":" not in address:
        return
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (ValueError, OSError):
        return  # gRPC reports what it makes of it
    if port == 0:
        return
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                raise CommandError(f"serve: cannot listen on {address}: {exc.strerror}") from None


def _prepare_schema(url: str, migrate: bool) -> None:
    """Migrates (when asked) and checks that the database's schema is the one this server needs:
    a database that is not migrated, or migrated only part of the way, is refused before serving."""
    from .domain import DatabaseUnavailable
    from .migrate import schema_state, upgrade

    log = logging.getLogger("dsipam.server")
    try:
        state = schema_state(url)
    except DatabaseUnavailable as exc:
        if migrate or "does not exist" in str(exc.__cause__):  # a missing database will not come up by itself
            raise
        # It may come up later: serve NOT_SERVING / UNAVAILABLE until then (one log line per change).
        cause = str(exc.__cause__ or exc).splitlines()[0] if str(exc.__cause__ or exc) else repr(exc.__cause__)
        log.error("database %s unreachable at start-up (%s): its schema is not checked", _shown(url), cause)
        return
    if migrate and not state.up_to_date and state.known:
        upgrade(url)
        print(f"dsipam: database migrated from {state.current or 'an empty schema'} to {state.head}", flush=True)
        return
    if state.behind:
        where = "has no dsipam schema" if state.current is None else f"is at schema revision {state.current}"
        raise SystemExit(f"dsipam: serve: the database {_shown(url)} {where}; this server needs {state.head}: "
                         f"run 'dsipam migrate --database-url {_shown(url)}' first, or start with --migrate")
    if not state.known:
        log.warning("database %s is at schema revision %s, which this server does not know (a newer dsipam "
                    "migrated it; this server needs %s); serving anyway", _shown(url), state.current, state.head)


def _shown(url: str) -> str:
    """The URL without its secrets, for messages: the password of the authority and the values of
    the ``password`` and ``sslpassword`` parameters (dburl.SECRET_PARAMETERS)."""
    from urllib.parse import unquote, urlsplit

    from .dburl import SECRET_PARAMETERS

    try:
        parts = urlsplit(url)
    except ValueError:
        return repr(url)
    rest, hash_, fragment = url.partition("#")  # split as urlsplit splits
    head, question, query = rest.partition("?")
    if parts.password is not None:
        head = head.replace(f":{parts.password}@", ":***@", 1)
    words = query.split("&")
    for i, word in enumerate(words):
        key, eq, _ = word.partition("=")
        if eq and unquote(key.replace("+", " ")) in SECRET_PARAMETERS:
            words[i] = f"{key}=***"
    return head + question + "&".join(words) + hash_ + fragment


def _run_workers(settings: Settings) -> int:
    """Runs ``settings.workers`` server processes sharing each TCP port (SO_REUSEPORT): the
    kernel spreads connections over them. Each has its own connection pools; PostgreSQL's row
    locks keep them correct together. SIGTERM/SIGINT are passed on; when one worker dies, the
    others are stopped and the exit code is non-zero (let the supervisor restart the set)."""
    import signal
    import subprocess
    import time

    for address in settings.listen or ["127.0.0.1:50051"]:
        if not address.startswith("unix:") and address.rsplit(":", 1)[-1] == "0":
            raise SystemExit(f"dsipam: --workers {settings.workers} needs a fixed port, not {address}")
    env = dict(os.environ)
    env.update({"DSIPAM_DATABASE_URL": settings.database_url, "DSIPAM_REUSE_PORT": "1", "DSIPAM_MIGRATE": "0"})
    if settings.insecure:
        env["DSIPAM_INSECURE"] = "1"
    argv = [a for a in sys.argv[1:] if a != "--migrate"]
    children = []
    for index in range(settings.workers):
        children.append(subprocess.Popen([sys.executable, "-m", "dsipam.server", *argv],
                                         env={**env, "DSIPAM_WORKER_INDEX": str(index)}))
    print(f"dsipam: started {settings.workers} worker processes sharing the listen addresses", flush=True)
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    while any(c.poll() is None for c in children):
        for child in children:
            rc = child.poll()
            if rc is not None and rc != 0 and not stopping:
                print(f"dsipam: worker {child.pid} exited with {rc}; stopping the others", flush=True)
                code = 1
                forward(signal.SIGTERM, None)
        time.sleep(0.2)
    return code or max((c.returncode for c in children), default=0)


def _apply_security_flags(args: argparse.Namespace, settings: Settings) -> None:
    from .settings import parse_mode

    if args.insecure and (args.auth_config or settings.auth_config):
        raise SystemExit("dsipam: --insecure and an auth config contradict each other; give one")
    if args.insecure:
        settings.insecure = True
    for name in ("auth_config", "tls_cert", "tls_key", "tls_client_ca", "metrics_listen", "log_format"):
        value = getattr(args, name)
        if value:
            setattr(settings, name, value)
    if args.max_message_bytes is not None:
        settings.max_message_bytes = args.max_message_bytes
    if args.unix_socket_mode:
        settings.unix_socket_mode = parse_mode(args.unix_socket_mode, "--unix-socket-mode")


def cmd_token(args: argparse.Namespace) -> int:
    from .security import hash_token, parse_role, token_config_entry

    if args.token_command == "new":
        try:
            role = parse_role(args.role, "ROLE")
            default_name = f"{role.label}-{args.node}" if args.node else f"{role.label}-token"
            token, entry = token_config_entry(role, args.name or default_name, args.node)
        except ValueError as exc:
            raise SystemExit(f"dsipam: {exc}") from None
        print(token)  # once, on stdout: stderr often ends up in logs
        print("the token above is not stored: give it to the caller. Its auth config entry (under tokens:):",
              file=sys.stderr)
        print(entry, end="", file=sys.stderr)
        return 0
    token = sys.stdin.readline().strip()
    if not token:
        raise SystemExit("dsipam: token hash: give the token on standard input")
    print(hash_token(token))
    return 0


def _use_pgbouncer() -> None:
    import os

    from .store.db import ENV_DB_PGBOUNCER

    os.environ[ENV_DB_PGBOUNCER] = "1"


def check_database_url(url: str, where: str = "--database-url") -> None:
    """Refuses (exit 2, one line naming ``where``) a database URL that is not one: a scheme other
    than postgresql://, a host that is not one, a port that is not a number from 1 to 65535."""
    from urllib.parse import parse_qsl, urlsplit

    from .dburl import normalise_multihost

    shown = _shown(url)
    shown = repr(shown) if shown != repr(url) else shown

    def bad(why: str) -> CommandError:
        return CommandError(f"{where} {shown}: {why}", EXIT_USAGE)

    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise bad(f"not a URL ({exc})") from None
    if parts.scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
        what = f"the scheme {parts.scheme!r} is not supported" if parts.scheme else "not a URL"
        raise bad(f"{what} (expected postgresql://user@host:port/db)")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise bad("it contains whitespace or control characters")
    try:
        parts = urlsplit(normalise_multihost(url))
        query = parse_qsl(parts.query, keep_blank_values=True)
        hostport = parts.netloc.rpartition("@")[2]
        if hostport.startswith("[") and "]" not in hostport:
            raise ValueError("an IPv6 address in brackets needs its closing ']'")
        ports = [str(parts.port)] if parts.port is not None else []
    except ValueError as exc:
        port = hostport.rpartition("]")[2].rpartition(":")[2] if ":" in hostport else ""
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise bad(f"the port {port!r} is not a number from 1 to 65535") from None
        raise bad(str(exc)) from None
    ports += [p for k, v in query if k == "port" for p in v.split(",")]
    for port in ports:
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise bad(f"the port {port!r} is not a number from 1 to 65535")
    host = parts.hostname or ""
    if host and not host.startswith("/") and not re.fullmatch(r"[A-Za-z0-9_.:%-]+", host):
        raise bad(f"the host {host!r} is neither an IP address nor a host name")
    from .store.db import parse_database_url

    try:
        parse_database_url(url, field="")
    except ValueError as exc:  # a libpq parameter the drivers cannot honour
        raise bad(str(exc).removeprefix(": ")) from None


def _database_url(args: argparse.Namespace) -> str:
    """--database-url, else DSIPAM_DATABASE_URL, else the private PostgreSQL of a running
    ``dsipam serve`` (in --data-dir / DSIPAM_DATA_DIR / the default data directory)."""
    url = args.database_url or os.environ.get("DSIPAM_DATABASE_URL", "")
    if url:
        check_database_url(url, "--database-url" if args.database_url else "DSIPAM_DATABASE_URL")
        return url
    from .embedded import data_dir_of, running_url

    url = running_url(args.data_dir or "") or ""
    if not url:
        raise CommandError(f"no database: give --database-url (or set DSIPAM_DATABASE_URL); no private PostgreSQL "
                           f"of 'dsipam serve' runs in {data_dir_of(args.data_dir or '')}", EXIT_USAGE)
    return url


class CommandError(Exception):
    """A server-side command failed in a way worth one line (exit ``code``)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def cmd_migrate(args: argparse.Namespace) -> int:
    _setup_logging("WARNING")
    if args.db_pgbouncer:
        _use_pgbouncer()
    url = _database_url(args)  # before alembic and SQLAlchemy are imported: a refused URL is refused at once
    from .migrate import check, schema_state, upgrade
    if args.check:
        _check_schema(url, check, schema_state(url))
        print("dsipam: schema matches the models")
        return 0
    before = schema_state(url)
    if before.current is not None and not before.known:
        raise CommandError(f"migrate: the database is at schema revision {before.current}, which this dsipam does "
                           f"not know (a newer dsipam migrated it; this one's newest is {before.head})")
    upgrade(url, args.revision)
    if args.revision == "head" and before.up_to_date:
        print(f"dsipam: database already at {before.head} (head)")
    elif args.revision == "head":
        print(f"dsipam: database migrated from {before.current or 'an empty schema'} to {before.head} (head)")
    else:
        print(f"dsipam: database migrated to {args.revision}")
    return 0


def _check_schema(url: str, check, state) -> None:  # type: ignore[no-untyped-def]
    """``migrate --check``: the database at this dsipam's head revision, and its schema the models'."""
    from alembic.util import AutogenerateDiffsDetected
    from alembic.util import CommandError as AlembicError

    if state.current is None:
        raise CommandError(f"migrate --check: the database {_shown(url)} has no dsipam schema (head is "
                           f"{state.head}): run 'dsipam migrate'")
    if not state.known:
        raise CommandError(f"migrate --check: the database {_shown(url)} is at schema revision {state.current}, "
                           f"which this dsipam does not know (a newer dsipam migrated it; this one's head is "
                           f"{state.head})")
    if not state.up_to_date:
        raise CommandError(f"migrate --check: the database {_shown(url)} is at schema revision {state.current}, "
                           f"not at head {state.head}: run 'dsipam migrate'")
    try:
        check(url)
    except AutogenerateDiffsDetected as exc:
        raise CommandError(f"migrate --check: the schema of {_shown(url)} differs from the models: "
                           f"{str(exc).splitlines()[0]}") from exc
    except AlembicError as exc:
        raise CommandError(f"migrate --check: {_shown(url)}: {str(exc).splitlines()[0]}") from exc


def cmd_fsck(args: argparse.Namespace) -> int:
    if args.db_pgbouncer:
        _use_pgbouncer()
    url = _database_url(args)  # before SQLAlchemy is imported: a refused URL is refused at once
    from .store import Store, create_engine

    async def run() -> list[str]:
        store = Store(create_engine(url, pool_size=1, max_overflow=0))
        try:
            return await store.fsck(args.pool)
        finally:
            await store.close()

    problems = asyncio.run(run())
    for p in problems:
        print(p)
    print(f"fsck {args.pool}: {'clean' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def describe_failure(exc: BaseException, args: argparse.Namespace) -> tuple[int, str]:
    """One line and an exit code for what a server-side command raised: 2 when the command line
    is wrong (a URL that is not one), 1 for everything that went wrong while running."""
    if isinstance(exc, CommandError):
        return exc.code, str(exc)
    import sqlalchemy.exc

    from .domain import DatabaseUnavailable, IpamError

    url = getattr(args, "database_url", None) or os.environ.get("DSIPAM_DATABASE_URL", "")
    where = f" at {_shown(url)}" if url else ""
    if isinstance(exc, DatabaseUnavailable) and isinstance(exc.__cause__, sqlalchemy.exc.DBAPIError) \
            and "does not exist" in str(exc.__cause__):
        exc = exc.__cause__  # a missing database: said below
    elif isinstance(exc, DatabaseUnavailable):
        cause = exc.__cause__
        detail = f": {str(cause).splitlines()[0]}" if cause is not None and str(cause) else ""
        return 1, f"cannot reach the database{where}{detail}"
    if isinstance(exc, IpamError):  # PoolNotFound and the like: the service's own words, named by the command
        field = exc.metadata.get("field", "")
        text = str(exc).removeprefix(f"{field}: ") if field else str(exc)
        return 1, f"{getattr(args, 'command', None) or 'dsipam'}: {text} [{exc.reason}]"
    if isinstance(exc, ValueError | sqlalchemy.exc.ArgumentError) and "URL" in str(exc):
        return 2, f"--database-url {_shown(url)!r}: {exc}" if url else f"--database-url: {exc}"
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        orig = getattr(exc, "orig", None)
        text = str(orig if orig is not None else exc).split("\n")[0]
        text = text.split(": ", 1)[-1] if text.startswith("<class") else text
        if "does not exist" in text and "database" in text:
            return 1, f"{text}{where}: create it (createdb), then run 'dsipam migrate'"
        if getattr(orig, "sqlstate", None) == "42P01" or "UndefinedTable" in repr(orig):
            return 1, f"database error{where}: {text}: is it migrated? run 'dsipam migrate'"
        return 1, f"database error{where}: {text}"
    if isinstance(exc, OSError):
        return 1, f"cannot reach the database{where}: {exc.strerror or exc}"
    if isinstance(exc, RuntimeError) and "bind" in str(exc).lower():
        listen = getattr(args, "listen", None) or [os.environ.get("DSIPAM_LISTEN") or DEFAULT_LISTEN]
        return 1, f"serve: cannot listen on {', '.join(listen)} (in use by another process?): {exc}"
    return 1, f"unexpected error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"


_DATA_DIR_HELP = ("without a URL: the data directory of the private PostgreSQL of a running 'dsipam serve' "
                  "(env DSIPAM_DATA_DIR)")
_PGBOUNCER_HELP = "the URL is PgBouncer in transaction mode: no prepared statements (env DSIPAM_DB_PGBOUNCER=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dsipam", description="Dual-stack IP address management.", allow_abbrev=False)
    add_client_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--listen", action="append", help="host:port or unix:///path (repeatable; env DSIPAM_LISTEN)")
    serve.add_argument("--database-url", help="postgresql://user@host:port/db (env DSIPAM_DATABASE_URL)")
    serve.add_argument("--db-pool-size", type=int, help="database connections kept open (env DSIPAM_DB_POOL_SIZE)")
    serve.add_argument("--db-max-overflow", type=int, help="extra connections under load (env DSIPAM_DB_MAX_OVERFLOW)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (env DSIPAM_LOG_LEVEL)")
    serve.add_argument("--db-pgbouncer", action="store_true", help=_PGBOUNCER_HELP)
    serve.add_argument("--data-dir", help="data directory of the private PostgreSQL (env DSIPAM_DATA_DIR)")
    serve.add_argument("--workers", type=int, help="server processes sharing the port (env DSIPAM_WORKERS; default 1)")
    serve.add_argument("--migrate", action="store_true", help="apply migrations before serving (env DSIPAM_MIGRATE=1)")
    serve.add_argument("--auth-config", help="YAML/JSON file of hashed tokens and client-certificate roles "
                       "(env DSIPAM_AUTH_CONFIG); see docs/security.md")
    serve.add_argument("--insecure", action="store_true",
                       help="switch authentication off (env DSIPAM_INSECURE=1); announced at start")
    serve.add_argument("--tls-cert", help="server certificate (PEM) for the TCP listeners (env DSIPAM_TLS_CERT)")
    serve.add_argument("--tls-key", help="its private key (PEM) (env DSIPAM_TLS_KEY)")
    serve.add_argument("--tls-client-ca", help="CA (PEM) that signs client certificates; makes them required "
                       "(env DSIPAM_TLS_CLIENT_CA)")
    serve.add_argument("--unix-socket-mode", help="file mode of unix socket listeners, octal (default 660; "
                       "env DSIPAM_UNIX_SOCKET_MODE)")
    serve.add_argument("--max-message-bytes", type=int, help="largest request (default 512 KiB; "
                       "env DSIPAM_MAX_MESSAGE_BYTES)")
    serve.add_argument("--metrics-listen", help="host:port of the Prometheus /metrics endpoint; off when unset "
                       "(env DSIPAM_METRICS_LISTEN)")
    serve.add_argument("--log-format", choices=("text", "json"), help="log lines as text or JSON objects "
                       "(env DSIPAM_LOG_FORMAT)")
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--database-url", help="postgresql://user@host:port/db (env DSIPAM_DATABASE_URL; default: "
                         "the private PostgreSQL of a running 'dsipam serve')")
    migrate.add_argument("--db-pgbouncer", action="store_true", help=_PGBOUNCER_HELP)
    migrate.add_argument("--revision", default="head")
    migrate.add_argument("--check", action="store_true", help="fail when models and schema disagree")
    migrate.add_argument("--data-dir", help=_DATA_DIR_HELP)
    migrate.set_defaults(func=cmd_migrate)

    token = sub.add_parser("token", help="make bearer tokens for the auth config")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    new = token_sub.add_parser("new", help="print a new random token (stdout) and its config entry (stderr)")
    new.add_argument("role", metavar="ROLE", help="shim, controller or admin")
    new.add_argument("--name", help="the entry's name in logs")
    new.add_argument("--node", help="the node a shim token serves (required for shim: a shim acts only on its node)")
    token_sub.add_parser("hash", help="print the config hash of a token read from standard input")
    token.set_defaults(func=cmd_token)

    fsck = sub.add_parser("fsck", help="check that a pool's blocks and allocations agree")
    fsck.add_argument("pool")
    fsck.add_argument("--database-url", help="postgresql://user@host:port/db (env DSIPAM_DATABASE_URL; default: "
                      "the private PostgreSQL of a running 'dsipam serve')")
    fsck.add_argument("--db-pgbouncer", action="store_true", help=_PGBOUNCER_HELP)
    fsck.add_argument("--data-dir", help=_DATA_DIR_HELP)
    fsck.set_defaults(func=cmd_fsck)

    for command in (serve, migrate, fsck, new, token_sub.choices["hash"]):  # as the admin commands take it
        command.add_argument("--debug", dest="client_debug", action="store_true", default=argparse.SUPPRESS,
                             help="print the traceback of an error (env DSIPAM_DEBUG=1; also before the command)")
    add_client_commands(sub)
    from dsipam.kube.cli import add_controller_command  # `dsipam controller` (clients/kubernetes)

    add_controller_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(prepare_argv(sys.argv[1:] if argv is None else argv))
    if args.func is run:  # the admin commands report their own errors
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except SettingError as exc:  # a flag or DSIPAM_* variable: the same line as the command line's errors
        if args.client_debug or os.environ.get("DSIPAM_DEBUG", "").lower() in ("1", "true", "yes"):
            raise
        print(f"dsipam: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dsipam: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        if args.client_debug or os.environ.get("DSIPAM_DEBUG", "").lower() in ("1", "true", "yes"):
            raise
        code, message = describe_failure(exc, args)
        print(f"dsipam: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
