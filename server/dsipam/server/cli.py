"""The ``dsipam`` command: serve, migrate and fsck, plus the admin commands of the SDK
(pool, alloc, release, gc; see dsipam.client._cli), which take connection options before the subcommand."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from dsipam.client._cli import Parser, add_client_commands, add_client_options, prepare_argv

from .settings import Settings


def _setup_logging(level: str, fmt: str = "text") -> None:
    if fmt == "text" and level == "WARNING":  # migrate, fsck
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
        return
    from .observability import setup_logging

    setup_logging(level, fmt)


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
    worker = os.environ.get("DSIPAM_WORKER_INDEX")
    if worker and settings.metrics_listen:  # one metrics port per worker: base port + index
        host, _, port = settings.metrics_listen.rpartition(":")
        settings.metrics_listen = f"{host}:{int(port) + int(worker)}"
    _setup_logging(settings.log_level, settings.log_format)
    embedded = None
    if not settings.database_url:
        from .embedded import start_embedded

        embedded = start_embedded(settings.data_dir)
        settings.database_url = embedded.url
        settings.migrate = True
        if not settings.auth_config:  # a developer's machine, on loopback: announced as insecure
            settings.insecure = True
        print(
            f"dsipam: started a private PostgreSQL ({embedded.bindir}) on 127.0.0.1:{embedded.port}; "
            f"data in {embedded.pgdata}",
            flush=True,
        )
    try:
        if settings.migrate or args.migrate:
            from .migrate import upgrade

            upgrade(settings.database_url)
            print("dsipam: database migrated to head", flush=True)
        if settings.workers > 1 and not os.environ.get("DSIPAM_WORKER_INDEX"):
            return _run_workers(settings)
        from .app import serve

        _run_loop(serve(settings), settings.uvloop)
    finally:
        if embedded is not None:
            embedded.stop()
            print("dsipam: private PostgreSQL stopped", flush=True)
    return 0


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
        except ValueError as exc:
            raise SystemExit(f"dsipam: {exc}") from None
        token, entry = token_config_entry(role, args.name or f"{role.label}-token")
        print(f"token (give it to the caller; it is not stored): {token}", file=sys.stderr)
        print(token)
        print("auth config entry (under tokens:):", file=sys.stderr)
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


def _database_url(args: argparse.Namespace) -> str:
    from .store.db import database_url_from_env

    return args.database_url or database_url_from_env()


def cmd_migrate(args: argparse.Namespace) -> int:
    from .migrate import check, upgrade

    _setup_logging("WARNING")
    if args.db_pgbouncer:
        _use_pgbouncer()
    url = _database_url(args)
    if args.check:
        check(url)
        print("dsipam: schema matches the models")
    else:
        upgrade(url, args.revision)
        print(f"dsipam: database migrated to {args.revision}")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from .store import Store, create_engine

    if args.db_pgbouncer:
        _use_pgbouncer()
    url = _database_url(args)

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
    serve.add_argument("--max-message-bytes", type=int, help="largest request or response (default 4 MiB; "
                       "env DSIPAM_MAX_MESSAGE_BYTES)")
    serve.add_argument("--metrics-listen", help="host:port of the Prometheus /metrics endpoint; off when unset "
                       "(env DSIPAM_METRICS_LISTEN)")
    serve.add_argument("--log-format", choices=("text", "json"), help="log lines as text or JSON objects "
                       "(env DSIPAM_LOG_FORMAT)")
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--database-url", help="postgresql://user@host:port/db (env DSIPAM_DATABASE_URL)")
    migrate.add_argument("--db-pgbouncer", action="store_true", help=_PGBOUNCER_HELP)
    migrate.add_argument("--revision", default="head")
    migrate.add_argument("--check", action="store_true", help="fail when models and schema disagree")
    migrate.set_defaults(func=cmd_migrate)

    token = sub.add_parser("token", help="make bearer tokens for the auth config")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    new = token_sub.add_parser("new", help="print a new random token (stdout) and its config entry (stderr)")
    new.add_argument("role", metavar="ROLE", help="shim, controller or admin")
    new.add_argument("--name", help="the entry's name in logs")
    token_sub.add_parser("hash", help="print the config hash of a token read from standard input")
    token.set_defaults(func=cmd_token)

    fsck = sub.add_parser("fsck", help="check that a pool's blocks and allocations agree")
    fsck.add_argument("pool")
    fsck.add_argument("--database-url", help="postgresql://user@host:port/db (env DSIPAM_DATABASE_URL)")
    fsck.add_argument("--db-pgbouncer", action="store_true", help=_PGBOUNCER_HELP)
    fsck.set_defaults(func=cmd_fsck)

    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(prepare_argv(sys.argv[1:] if argv is None else argv))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
